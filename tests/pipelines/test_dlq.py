"""``imstream dlq list | show | redrive`` on the real local Kafka: dead letters seeded with the
stream stage's own ``dead_letter(...)`` headers, redriven into their source exactly once."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from typer.testing import CliRunner

from core.connections import kafka_config, kafka_producer_config
from core.records import InputRecord, dead_letter
from core.settings import Settings
from pipelines.dlq import (
    REDRIVE_GROUP,
    REDRIVEN_FROM_HEADER,
    DlqError,
    dlq_app,
    parse_since,
    redrive,
)
from schemas.events import (
    SYSTEM_TENANT,
    Actor,
    MessageSent,
    MessageSentPayload,
    OperatorAction,
    OperatorOutcome,
    TextBody,
    encode_event,
    parse_event,
)
from schemas.topics import TopicCatalog, conversation_key, topic_catalog

pytestmark = pytest.mark.stack

FAILED, INVALID = "processing-failed", "schema-invalid"
#: The code of each seeded source record, in order: two codes, interleaved.
CODES = [FAILED, INVALID, FAILED, INVALID, FAILED]
GARBAGE = b"\xff\x00not json"
OPERATOR = "ops-test"
Header = str | bytes | None


@dataclass(frozen=True)
class Seeded:
    """A source record that was dead-lettered: where it was, its key and value, its code."""

    partition: int
    offset: int
    key: bytes
    value: bytes
    code: str


@dataclass
class World:
    settings: Settings
    catalog: TopicCatalog
    env: dict[str, str]
    seeded: list[Seeded]
    source_ends: dict[int, int]
    """The source topic's end offsets once seeded: redriven records land after them."""

    @property
    def dlq(self) -> str:
        return self.catalog.messages_in.name + ".dlq"


def _event(index: int) -> bytes:
    event = MessageSent.new(
        tenant_id="acme",
        actor=Actor(user_id="alice", device_id="alice-phone"),
        payload=MessageSentPayload(
            conversation_id=f"c-{index % 2}",
            client_msg_id=f"m-{index}",
            body=TextBody(text=f"hello {index}"),
        ),
    )
    return encode_event(event)


def _produce(
    settings: Settings, records: list[tuple[str, bytes, bytes | None, list[tuple[str, Header]]]]
) -> list[tuple[int, int]]:
    """Produce ``(topic, key, value, headers)`` in order; their (partition, offset)."""
    placed: list[tuple[int, int]] = []
    producer = Producer(kafka_producer_config(settings, **{"enable.idempotence": True}))
    for topic, key, value, headers in records:

        def delivered(error: object, message: object) -> None:
            assert error is None, error
            placed.append((message.partition(), message.offset()))  # type: ignore[attr-defined]

        producer.produce(topic, key=key, value=value, headers=headers, on_delivery=delivered)
        assert producer.flush(30) == 0
    return placed


def read_from(
    settings: Settings, topic: str, start: dict[int, int]
) -> list[tuple[int, int, bytes | None, bytes | None, dict[str, bytes]]]:
    """Every record of ``topic`` from ``start`` (per partition) to its end: (partition, offset,
    key, value, headers)."""
    consumer = Consumer(
        kafka_config(
            settings, **{"group.id": f"t-read-{uuid.uuid4().hex}", "enable.auto.commit": False}
        )
    )
    try:
        found = []
        for partition, begin in start.items():
            _, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=30)
            if begin >= high:
                continue
            consumer.assign([TopicPartition(topic, partition, begin)])
            while True:
                message = consumer.poll(10)
                assert message is not None and message.error() is None
                raw_headers = message.headers() or []
                pairs = raw_headers.items() if isinstance(raw_headers, dict) else raw_headers
                headers = {name: value for name, value in pairs if isinstance(value, bytes)}
                offset = message.offset()
                assert offset is not None
                found.append((partition, offset, message.key(), message.value(), headers))
                if offset + 1 >= high:
                    break
        return found
    finally:
        consumer.close()


def end_offsets(settings: Settings, topic: str, partitions: int) -> dict[int, int]:
    consumer = Consumer(kafka_config(settings, **{"group.id": f"t-wm-{uuid.uuid4().hex}"}))
    try:
        return {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30)[1]
            for p in range(partitions)
        }
    finally:
        consumer.close()


def operator_actions(world: World) -> list[OperatorAction]:
    records = read_from(world.settings, world.catalog.operator_actions.name, {0: 0})
    events = [parse_event(value or b"") for *_, value, _ in records]
    assert all(isinstance(event, OperatorAction) for event in events)
    return [event for event in events if isinstance(event, OperatorAction)]


@pytest.fixture
def world(settings: Settings, kafka_admin: AdminClient, unique_name: str) -> Iterator[World]:
    """A topic prefix of this test's own with the inbound messages topic, its dead-letter topic
    and the operator-actions topic; five records dead-lettered the way the stream stage does."""
    prefix = f"{unique_name}."
    prefixed = settings.model_copy(
        update={"kafka": settings.kafka.model_copy(update={"topic_prefix": prefix})}
    )
    catalog = topic_catalog(prefixed)
    dlq = catalog.dead_letter_of(catalog.messages_in)
    topics = [catalog.messages_in, dlq, catalog.operator_actions]
    futures = kafka_admin.create_topics(
        [NewTopic(t.name, num_partitions=t.partitions, replication_factor=1) for t in topics]
    )
    for future in futures.values():
        future.result(timeout=30)
    try:
        values = [_event(i) for i in range(len(CODES))]
        values[3] = GARBAGE  # an undecodable one: `show` falls back to hex
        keys = [conversation_key("acme", f"c-{i % 2}") for i in range(len(CODES))]
        placed = _produce(
            prefixed,
            [(catalog.messages_in.name, k, v, []) for k, v in zip(keys, values, strict=True)],
        )
        seeded = [
            Seeded(p, o, k, v, code)
            for (p, o), k, v, code in zip(placed, keys, values, CODES, strict=True)
        ]
        dead = [
            dead_letter(
                catalog,
                catalog.messages_in,
                InputRecord(catalog.messages_in.name, s.partition, s.offset, s.key, s.value),
                s.code,
                f"boom {i}",
            )
            for i, s in enumerate(seeded)
        ]
        _produce(
            prefixed,
            [(d.topic, d.key or b"", d.value, list(d.headers or [])) for d in dead],
        )
        yield World(
            settings=prefixed,
            catalog=catalog,
            env={"IM_KAFKA__TOPIC_PREFIX": prefix},
            seeded=seeded,
            source_ends=end_offsets(
                prefixed, catalog.messages_in.name, catalog.messages_in.partitions
            ),
        )
    finally:
        group = prefix + REDRIVE_GROUP
        listed = kafka_admin.list_consumer_groups().result(timeout=30).valid
        if group in {g.group_id for g in listed}:
            kafka_admin.delete_consumer_groups([group])[group].result(timeout=30)
        names = [t.name for t in topics]
        for future in kafka_admin.delete_topics(names, operation_timeout=30).values():
            future.result(timeout=30)


def redriven(world: World) -> list[tuple[int, bytes | None, bytes | None, dict[str, bytes]]]:
    """What was published into the source topic since seeding: (partition, key, value,
    headers)."""
    found = read_from(world.settings, world.catalog.messages_in.name, world.source_ends)
    return [(p, key, value, headers) for p, _, key, value, headers in found]


def as_seeded(
    records: list[tuple[int, bytes | None, bytes | None, dict[str, bytes]]],
) -> list[tuple[int, bytes | None, bytes | None]]:
    return sorted((p, key, value) for p, key, value, _ in records)


def expected(world: World, *codes: str) -> list[tuple[int, bytes | None, bytes | None]]:
    return sorted((s.partition, s.key, s.value) for s in world.seeded if s.code in codes)


def invoke(world: World, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(dlq_app, list(args), env=world.env)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


def test_list_counts_each_dead_letter_topic_by_code(world: World) -> None:
    code, output = invoke(world, "list", "--json")
    assert code == 0, output
    summaries = {entry["topic"]: entry for entry in json.loads(output)}
    assert list(summaries) == [t.name for t in world.catalog.dead_letters]
    ours = summaries[world.dlq]
    assert ours["exists"] is True
    assert ours["count"] == 5
    assert ours["by_code"] == {FAILED: 3, INVALID: 2}
    assert ours["oldest"] is not None and ours["oldest"] <= ours["newest"]
    others = [entry for name, entry in summaries.items() if name != world.dlq]
    assert {entry["exists"] for entry in others} == {False}  # the fixture created only ours

    code, table = invoke(world, "list")
    assert code == 0
    row = next(line for line in table.splitlines() if line.startswith(world.dlq + " "))
    assert f"{FAILED}=3, {INVALID}=2" in row
    assert "5 dead letter(s) in 1 topic(s)" in table


def test_show_decodes_the_reason_headers_key_and_value(world: World) -> None:
    code, output = invoke(world, "show", world.dlq, "--code", INVALID, "--json")
    assert code == 0, output
    shown = [json.loads(line) for line in output.splitlines()]
    invalid = [s for s in world.seeded if s.code == INVALID]
    assert len(shown) == len(invalid) == 2
    for entry, seed in zip(shown, invalid, strict=True):
        assert entry["code"] == INVALID
        assert entry["message"].startswith("boom ")
        assert entry["source"] == {
            "topic": world.catalog.messages_in.name,
            "partition": seed.partition,
            "offset": seed.offset,
        }
        assert entry["key"] == seed.key.decode()
    assert shown[0]["value"]["payload"]["client_msg_id"] == "m-1"
    assert shown[1]["value"] == {"hex": GARBAGE.hex()}

    code, text = invoke(
        world, "show", world.catalog.messages_in.logical_name, "--offset", "0:3", "--limit", "1"
    )
    assert code == 0, text
    assert f"{world.dlq}[0]@3" in text
    assert f"code:    {INVALID}" in text
    assert "reason:  boom 3" in text
    assert f"value:   hex:{GARBAGE.hex()}" in text
    assert "1 dead letter(s) shown" in text


def test_dry_run_writes_nothing(world: World) -> None:
    code, output = invoke(world, "redrive", world.dlq, "--dry-run", "--operator", OPERATOR)
    assert code == 0, output
    planned = [line for line in output.splitlines() if line.startswith("would redrive ")]
    assert len(planned) == 5
    assert all(f"→ {world.catalog.messages_in.name}[" in line for line in planned)
    assert "dry run: " in output and "would redrive 5 of 5 matching" in output
    assert redriven(world) == []
    assert operator_actions(world) == []
    consumer = Consumer(
        kafka_config(
            world.settings, **{"group.id": world.settings.kafka.topic_prefix + REDRIVE_GROUP}
        )
    )
    try:
        [cursor] = consumer.committed([TopicPartition(world.dlq, 0)], timeout=30)
    finally:
        consumer.close()
    assert cursor.offset < 0  # no cursor committed


def test_redrive_by_code_republishes_exactly_those_once_and_audits_it(world: World) -> None:
    code, output = invoke(
        world, "redrive", world.dlq, "--code", FAILED, "--rate", "0", "--operator", OPERATOR
    )
    assert code == 0, output
    assert "redriven 3 of 3 matching" in output
    first = redriven(world)
    assert as_seeded(first) == expected(world, FAILED)
    assert {h[REDRIVEN_FROM_HEADER].decode().rsplit("/", 1)[1] for *_, h in first} == {
        "0",
        "2",
        "4",
    }

    code, output = invoke(world, "redrive", world.dlq, "--code", FAILED, "--operator", OPERATOR)
    assert code == 0, output
    # The cursor moved past offset 0; offsets 2 and 4 are kept in its metadata.
    assert "redriven 0 of 0 matching; 2 redriven before, 2 filtered out" in output
    assert as_seeded(redriven(world)) == expected(world, FAILED)

    # Without a filter: the ones the first run left behind, and only those.
    code, output = invoke(world, "redrive", world.dlq, "--operator", OPERATOR)
    assert code == 0, output
    assert "redriven 2 of 2 matching; 2 redriven before, 0 filtered out" in output
    assert as_seeded(redriven(world)) == expected(world, FAILED, INVALID)
    code, output = invoke(world, "redrive", world.dlq, "--operator", OPERATOR)
    assert "redriven 0 of 0 matching" in output
    assert "(0 scanned" in output  # the cursor is at the end
    assert len(redriven(world)) == 5

    actions = operator_actions(world)
    assert [a.payload.counts["redriven"] for a in actions] == [3, 0, 2, 0]
    first_action = actions[0]
    assert first_action.tenant_id == SYSTEM_TENANT
    assert first_action.actor is None
    assert first_action.payload.operator == OPERATOR
    assert first_action.payload.command == "dlq redrive"
    assert first_action.payload.arguments["topic"] == world.dlq
    assert first_action.payload.arguments["code"] == FAILED
    assert first_action.payload.outcome is OperatorOutcome.SUCCEEDED


def test_an_interrupted_redrive_resumes_and_each_record_lands_once(world: World) -> None:
    first = redrive(world.settings, world.dlq, limit=2, operator=OPERATOR, timeout=30)
    assert (first.redriven, first.matched) == (2, 5)
    assert first.outcome is OperatorOutcome.INTERRUPTED
    assert len(redriven(world)) == 2

    second = redrive(world.settings, world.dlq, operator=OPERATOR, timeout=30)
    assert (second.redriven, second.matched, second.already_redriven) == (3, 3, 0)
    assert second.outcome is OperatorOutcome.SUCCEEDED
    assert as_seeded(redriven(world)) == expected(world, FAILED, INVALID)

    outcomes = [(a.payload.outcome, a.payload.counts["redriven"]) for a in operator_actions(world)]
    assert outcomes == [(OperatorOutcome.INTERRUPTED, 2), (OperatorOutcome.SUCCEEDED, 3)]


def test_since_filters_by_dead_letter_time(world: World) -> None:
    future = redrive(world.settings, world.dlq, since=parse_since("2299-01-01T00:00"), dry_run=True)
    assert (future.matched, future.filtered_out) == (0, 5)
    recent = redrive(world.settings, world.dlq, since=parse_since("1h"), dry_run=True)
    assert recent.matched == 5
    with pytest.raises(DlqError, match="ISO time"):
        parse_since("yesterday")


def test_unknown_topics_and_an_unreachable_kafka_get_clear_errors(world: World) -> None:
    code, output = invoke(world, "show", "im.nope")
    assert code == 1
    assert "[topic-unknown]" in output and world.dlq in output
    assert "Traceback" not in output

    env = {**world.env, "IM_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:1"}
    for args in (["list"], ["show", world.dlq], ["redrive", world.dlq]):
        result = CliRunner().invoke(dlq_app, [*args, "--timeout", "2"], env=env)
        assert result.exit_code == 1, (args, result.output)
        assert "[kafka-unavailable]" in result.output
        assert "imstream stack up" in result.output
        assert "FAIL [" not in result.output  # librdkafka's retry lines are not shown
