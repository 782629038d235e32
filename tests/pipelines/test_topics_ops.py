"""``imstream topics inspect | tail | find`` against the real local Kafka, on topics of its own."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from typer.testing import CliRunner

from core.connections import kafka_config
from core.settings import Settings
from pipelines.processes import consumer_groups
from pipelines.topics_cli import topics_app
from pipelines.topics_ops import Filters, Shown, tail
from schemas import events as ev
from schemas.events import encode_event
from schemas.topics import (
    KAFKA_PARTITIONER,
    TopicCatalog,
    conversation_key,
    partition_for_key,
    topic_catalog,
    user_key,
)

#: The logical names the commands are given (the catalog spells them; see tests/schemas).
_NAMES = topic_catalog(Settings())
MESSAGES_IN = _NAMES.messages_in.logical_name
SYNC_EVENTS = _NAMES.sync_events.logical_name
PRESENCE = _NAMES.presence.logical_name


@dataclass(frozen=True)
class Seeded:
    """A catalog of this module's own, with known records in three of its topics."""

    prefix: str
    settings: Settings
    catalog: TopicCatalog
    hello: ev.MessageSent
    """acme/c-1 from alice, client_msg_id m-1: in messages.in and (sequenced) messages.sequenced"""
    from_bob: ev.MessageSent
    """acme/c-2 from bob, client_msg_id m-2"""
    other_tenant: ev.MessageSent
    """globex/c-3 from alice, client_msg_id m-3"""
    old: ev.MessageSent
    """acme/c-1 from alice, client_msg_id m-old, with a record time two hours ago"""
    c1_partition: int
    """The partition of acme/c-1 in messages.in: the old message, hello and the poison record"""

    @property
    def env(self) -> dict[str, str]:
        return {"IM_KAFKA__TOPIC_PREFIX": self.prefix}


def _message(
    tenant: str,
    conversation: str,
    sender: str,
    client_msg_id: str,
    text: str,
) -> ev.MessageSent:
    return ev.MessageSent.new(
        tenant_id=tenant,
        event_id=ev.message_event_id(tenant, sender, client_msg_id),
        actor=ev.Actor(user_id=sender, device_id=f"{sender}-phone"),
        payload=ev.MessageSentPayload(
            conversation_id=conversation, client_msg_id=client_msg_id, body=ev.TextBody(text=text)
        ),
    )


@pytest.fixture(scope="module")
def seeded(local_stack: object, settings: Settings) -> Iterator[Seeded]:
    prefix = f"t_topics_ops_{uuid.uuid4().hex[:8]}."
    kafka = settings.kafka.model_copy(update={"topic_prefix": prefix})
    prefixed = settings.model_copy(update={"kafka": kafka})
    catalog = topic_catalog(prefixed)
    admin = AdminClient(kafka_config(settings))
    wanted = (catalog.messages_in, catalog.messages_sequenced, catalog.sync_events)
    futures = admin.create_topics(
        [NewTopic(topic.name, num_partitions=topic.partitions) for topic in wanted]
    )
    for future in futures.values():
        future.result(timeout=30)

    hello = _message("acme", "c-1", "alice", "m-1", "hello there")
    from_bob = _message("acme", "c-2", "bob", "m-2", "hi from bob")
    other_tenant = _message("globex", "c-3", "alice", "m-3", "other tenant")
    old = _message("acme", "c-1", "alice", "m-old", "long ago")
    sequenced = hello.model_copy(
        update={"payload": hello.payload.model_copy(update={"conversation_seq": 1})}
    )
    sync = ev.SyncRecord(tenant_id="acme", user_id="alice", sync_id=1, event=sequenced)
    now_ms = int(time.time() * 1000)
    producer = Producer(kafka_config(settings, partitioner=KAFKA_PARTITIONER))
    inbound = catalog.messages_in.name
    c1 = conversation_key("acme", "c-1")
    producer.produce(inbound, encode_event(old), c1, timestamp=now_ms - 2 * 3600 * 1000)
    producer.produce(inbound, encode_event(hello), c1, timestamp=now_ms - 3000)
    producer.produce(inbound, encode_event(from_bob), conversation_key("acme", "c-2"))
    producer.produce(inbound, encode_event(other_tenant), conversation_key("globex", "c-3"))
    producer.produce(inbound, b'{"type": "message.sent", "event_id": 42', c1)
    producer.produce(catalog.messages_sequenced.name, encode_event(sequenced), c1)
    producer.produce(catalog.sync_events.name, sync.model_dump_json(), user_key("acme", "alice"))
    assert producer.flush(30) == 0

    c1_partition = partition_for_key(c1, catalog.messages_in.partitions)
    others = (conversation_key("acme", "c-2"), conversation_key("globex", "c-3"))
    # The partition counts below rely on these three keys landing on three partitions.
    assert len({c1_partition, *(partition_for_key(k, 6) for k in others)}) == 3
    group = next(iter(consumer_groups(prefixed)["stream-worker"]))
    committer = Consumer(kafka_config(settings, **{"group.id": group}))
    committer.commit(offsets=[TopicPartition(inbound, c1_partition, 1)], asynchronous=False)
    committer.close()

    yield Seeded(prefix, prefixed, catalog, hello, from_bob, other_tenant, old, c1_partition)
    for future in admin.delete_topics([topic.name for topic in wanted]).values():
        future.result(timeout=30)
    admin.delete_consumer_groups([group])[group].result(timeout=30)


def _invoke(seeded: Seeded, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(topics_app, list(args), env=seeded.env)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, result.stdout, result.stderr


def test_inspect_shows_watermarks_records_and_group_lag(seeded: Seeded) -> None:
    code, out, _ = _invoke(seeded, "inspect", MESSAGES_IN, "--json")
    assert code == 0
    (inspection,) = json.loads(out)
    assert inspection["topic"] == seeded.catalog.messages_in.name
    assert inspection["records"] == 5
    by_partition = {p["partition"]: p for p in inspection["partitions"]}
    assert by_partition[seeded.c1_partition] == {
        "partition": seeded.c1_partition,
        "low": 0,
        "high": 3,
        "records": 3,
    }
    groups = {group["process"]: group for group in inspection["groups"]}
    assert set(groups) == {"stream-worker", "clickhouse-sink"}
    worker = {p["partition"]: p for p in groups["stream-worker"]["partitions"]}
    assert worker[seeded.c1_partition] == {
        "partition": seeded.c1_partition,
        "committed": 1,
        "lag": 2,
    }
    # The other two records are alone in partitions the group never committed on: one record
    # behind counts as caught up (a transaction's commit marker), as in `imstream status`.
    assert groups["stream-worker"]["lag"] == 2
    assert all(p["committed"] is None for p in groups["clickhouse-sink"]["partitions"])
    assert groups["clickhouse-sink"]["lag"] == 3

    code, out, _ = _invoke(seeded, "inspect", seeded.catalog.messages_in.name)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == [
        seeded.catalog.messages_in.name,
        "key=conversation",
        "partitions=6",
        "records=5",
    ]
    row = next(line.split() for line in lines if line.split()[:1] == [str(seeded.c1_partition)])
    assert row == [str(seeded.c1_partition), "0", "3", "3", "1/2", "-/3"]
    assert "  stream-worker: group " in out and ", lag 2" in out


def test_tail_decodes_records_in_time_order_and_shows_poison(seeded: Seeded) -> None:
    code, out, err = _invoke(seeded, "tail", MESSAGES_IN)
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 5
    assert err.strip().endswith("5 record(s) shown")
    assert "m-old" in lines[0] and '"long ago"' in lines[0]
    hello = next(line for line in lines if "client_msg_id=m-1" in line)
    fields = hello.split("  ")
    assert fields[1] == f"{seeded.c1_partition}@1"
    assert fields[2:7] == [
        "acme/c-1",
        "message.sent",
        "tenant=acme",
        "conversation=c-1",
        "user=alice",
    ]
    assert '"hello there"' in fields[7]
    poison = next(line for line in lines if "undecodable" in line)
    assert f"{seeded.c1_partition}@2" in poison
    assert "[malformed-json]" in poison

    code, out, _ = _invoke(seeded, "tail", MESSAGES_IN, "--last", "1")
    assert code == 0
    assert len(out.splitlines()) == 3  # one per partition that holds records
    assert "m-old" not in out


def test_tail_filters_and_json(seeded: Seeded) -> None:
    def shown(*args: str) -> list[str]:
        code, out, _ = _invoke(seeded, "tail", MESSAGES_IN, "--from-beginning", *args)
        assert code == 0
        return out.splitlines()

    assert [("globex" in line) for line in shown("--tenant", "globex")] == [True]
    bob = shown("--user", "bob")
    assert len(bob) == 1 and "client_msg_id=m-2" in bob[0]
    c1 = shown("--tenant", "acme", "--conversation", "c-1")
    assert len(c1) == 2 and all("conversation=c-1" in line for line in c1)
    assert len(shown("--type", "message.sent")) == 4
    assert len(shown("--type", "undecodable", "--type", "message.sent")) == 5
    assert shown("--type", "message.recalled") == []

    code, out, _ = _invoke(seeded, "tail", MESSAGES_IN, "--json", "--user", "bob")
    assert code == 0
    (record,) = [json.loads(line) for line in out.splitlines()]
    assert record["type"] == "message.sent"
    assert record["event_id"] == seeded.from_bob.event_id
    assert record["value"]["payload"]["client_msg_id"] == "m-2"
    assert record["error"] is None

    code, out, _ = _invoke(seeded, "tail", MESSAGES_IN, "--json", "--type", "undecodable")
    (poison,) = [json.loads(line) for line in out.splitlines()]
    assert poison["error"]["code"] == "malformed-json"
    assert poison["value"] == '{"type": "message.sent", "event_id": 42'


def test_tail_decodes_records_that_carry_events(seeded: Seeded) -> None:
    code, out, _ = _invoke(seeded, "tail", SYNC_EVENTS)
    assert code == 0
    (line,) = out.splitlines()
    assert "message.sent" in line and "user=alice" in line and "sync=1" in line
    assert "seq=1" in line


def test_tail_follows_new_records_until_stopped(seeded: Seeded) -> None:
    stop = threading.Event()
    seen: list[Shown] = []

    def follow() -> None:
        filters = Filters(conversation="c-9")
        for record in tail(
            seeded.settings,
            seeded.catalog,
            seeded.catalog.messages_in,
            follow=True,
            filters=filters,
            stop=stop,
        ):
            seen.append(record)

    thread = threading.Thread(target=follow)
    thread.start()
    time.sleep(1.0)
    later = _message("acme", "c-9", "carol", "m-9", "arrives later")
    producer = Producer(kafka_config(seeded.settings, partitioner=KAFKA_PARTITIONER))
    producer.produce(
        seeded.catalog.messages_in.name, encode_event(later), conversation_key("acme", "c-9")
    )
    assert producer.flush(30) == 0
    deadline = time.monotonic() + 20
    while not seen and time.monotonic() < deadline:
        time.sleep(0.1)
    stop.set()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert [record.row.event_id for record in seen] == [later.event_id]


def test_find_by_client_msg_id_event_id_and_sender(seeded: Seeded) -> None:
    code, out, err = _invoke(seeded, "find", "m-1", "--json")
    assert code == 0
    places = [json.loads(line) for line in out.splitlines()]
    assert sorted(place["topic"] for place in places) == [
        seeded.catalog.messages_in.name,
        seeded.catalog.messages_sequenced.name,
    ]
    assert {place["event_id"] for place in places} == {seeded.hello.event_id}
    assert "scanned" in err and "records in" in err and "found m-1 in 2 place(s)" in err

    code, out, _ = _invoke(seeded, "find", seeded.from_bob.event_id)
    assert code == 0
    header = out.splitlines()[0].split()
    assert header[0] == seeded.catalog.messages_in.name
    assert header[3] == "message.sent"
    body = json.loads("\n".join(out.splitlines()[1:]))
    assert body["payload"]["client_msg_id"] == "m-2"

    assert _invoke(seeded, "find", "m-1", "--sender", "alice")[0] == 0
    code, _, err = _invoke(seeded, "find", "m-1", "--sender", "bob")
    assert code == 1
    assert "not found: m-1" in err

    code, out, _ = _invoke(seeded, "find", "m-1", "--topic", SYNC_EVENTS, "--json")
    assert code == 0
    (place,) = [json.loads(line) for line in out.splitlines()]
    assert place["topic"] == seeded.catalog.sync_events.name


def test_find_is_bounded_by_since(seeded: Seeded) -> None:
    code, _, err = _invoke(seeded, "find", "m-old", "--since", "1h")
    assert code == 1
    assert "not found: m-old" in err
    assert _invoke(seeded, "find", "m-old", "--since", "3h")[0] == 0
    iso = (datetime.now(UTC) - timedelta(hours=3)).isoformat()
    assert _invoke(seeded, "find", "m-old", "--since", iso)[0] == 0
    # Only the old one is beyond the bound: the recent message is found with the short one.
    assert _invoke(seeded, "find", "m-1", "--since", "1h")[0] == 0
    code, _, err = _invoke(seeded, "find", "m-1", "--since", "yesterday")
    assert code == 2
    assert "[time-invalid]" in err


def test_unknown_topic_and_unreachable_kafka_are_clear_errors(seeded: Seeded) -> None:
    for args in (["inspect", "im.nope"], ["tail", "im.nope"], ["find", "x", "--topic", "im.nope"]):
        code, _, err = _invoke(seeded, *args)
        assert code == 2, args
        assert "[topic-unknown] 'im.nope' is not a topic of the catalog" in err
    # In the catalog, not on the cluster (this module created only three of its topics).
    code, _, err = _invoke(seeded, "tail", PRESENCE)
    assert code == 2
    assert "not on the cluster: run `imstream topics apply`" in err

    env = {**seeded.env, "IM_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:1"}
    for args in (["inspect"], ["tail", MESSAGES_IN], ["find", "m-1"]):
        result = CliRunner().invoke(topics_app, [*args, "--timeout", "2"], env=env)
        assert result.exit_code == 1, args
        assert "[kafka-unavailable]" in result.stderr
        assert "imstream stack up" in result.stderr
        assert "Traceback" not in result.output
