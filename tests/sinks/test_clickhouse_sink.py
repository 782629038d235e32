"""The ClickHouse sink over the real Kafka and the real chDB: every record of every audited topic
once in the audit with the right columns, poison audited as undecodable (never dead-lettered
here), replays harmless, failed inserts never committed past, and the real process serving
analytics until SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from clickhouse_connect.driver.client import Client

from core.backoff import Backoff
from core.groups import clickhouse_sink_group
from core.settings import Settings
from pipelines.stack.manager import LocalStack
from schemas import events as ev
from schemas.topics import (
    TopicCatalog,
    conversation_key,
    device_key,
    gateway_key,
    topic_catalog,
    user_key,
)
from sinks.clickhouse.audit import AuditDecoder, KafkaRecord
from sinks.clickhouse.schema import AUDIT_TABLE, VIEWS
from sinks.clickhouse.sink import ClickHouseSink, SinkStats
from sinks.clickhouse.store import ClickHouseStore
from tests.sinks.clickhouse_support import (
    TENANT,
    Outgoing,
    Produced,
    catalog_topics,
    committed_offsets,
    created,
    daves_tablet_token,
    end_offsets,
    new_prefix,
    prefixed_settings,
    presence,
    produce,
    produce_transaction,
    push_job,
    sent,
)
from tests.sinks.staff_support import staff_headers

pytestmark = pytest.mark.stack

AUDIT_SELECT = (
    "SELECT topic, partition, offset, record_key, record_timestamp, event_id, event_type, "
    "tenant_id, conversation_id, user_id, sync_id, conversation_seq, occurred_at, ingested_at, "
    "error_code, error_message, error_source_topic, error_source_partition, "
    "error_source_offset, raw FROM {table} FINAL ORDER BY topic, partition, offset"
)


@pytest.fixture
def sink_settings(
    settings: Settings, local_stack: LocalStack, clickhouse_database: str
) -> Iterator[Settings]:
    """A topic prefix of this test's own (every catalog topic, deleted after) and its database."""
    prefixed = prefixed_settings(settings, new_prefix("ch"), clickhouse_database)
    with catalog_topics(prefixed):
        yield prefixed


def run_sink(
    settings: Settings, store: ClickHouseStore, *, group_id: str | None = None
) -> SinkStats:
    """The sink loop in this process, until it has consumed every assigned partition."""
    sink = ClickHouseSink(settings, store, threading.Event(), group_id=group_id)
    return sink.run(until_caught_up=True)


def audit_rows(client: Client, database: str) -> list[dict[str, Any]]:
    result = client.query(
        AUDIT_SELECT.format(table=f"{database}.{AUDIT_TABLE}"),
        column_formats={"raw": "bytes", "record_key": "bytes"},
        query_tz="UTC",
    )
    return [
        {name: _plain(value) for name, value in zip(result.column_names, row, strict=True)}
        for row in result.result_rows
    ]


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


def snapshot(client: Client, database: str) -> dict[str, Any]:
    """Everything a reader sees: the audit (FINAL, every column) and every analytics view."""
    views = {
        view: client.query(f"SELECT * FROM {database}.{view} ORDER BY ALL").result_rows
        for view in VIEWS
    }
    return {"audit": audit_rows(client, database), "views": views}


def raw_count(client: Client, database: str) -> int:
    """Rows stored, copies included (no FINAL)."""
    return int(client.query(f"SELECT count() FROM {database}.{AUDIT_TABLE}").result_rows[0][0])


@dataclass
class Scenario:
    """What the test produced and what the audit must say about each record."""

    records: list[Produced]
    expected: dict[tuple[str, int, int], dict[str, Any]]
    aborted: list[Produced]
    poison: dict[tuple[str, int, int], tuple[str, str | None]]
    """Poison coordinates → (error code, the dead-letter topic the sink must use or None)."""


def produce_scenario(settings: Settings, catalog: TopicCatalog) -> Scenario:
    """A realistic range of every audited topic: client commands, the stream stage's outputs
    (in a Kafka transaction, plus an aborted one), a processor's dead letter, poison."""
    now = datetime.now(UTC).replace(microsecond=123456) - timedelta(minutes=5)
    dm = ev.direct_conversation_id(TENANT, "alice", "bob")
    group = "g-team"
    dm_created = created(dm, ev.ConversationKind.DIRECT, ["alice", "bob"], now)
    group_created = created(group, ev.ConversationKind.GROUP, ["alice", "bob", "carol"], now)
    sends = [
        sent("alice", dm, "m1", now + timedelta(seconds=1)),
        sent("alice", dm, "m2", now + timedelta(seconds=2)),
        sent("bob", group, "m3", now + timedelta(seconds=3)),
    ]
    seqs = {"m1": 1, "m2": 2, "m3": 1}
    sequenced = [
        message.model_copy(
            update={
                "payload": message.payload.model_copy(
                    update={"conversation_seq": seqs[message.payload.client_msg_id]}
                )
            }
        )
        for message in sends
    ]
    mute = ev.ConversationMuteChanged.new(
        tenant_id=TENANT,
        actor=ev.Actor(user_id="carol"),
        occurred_at=now,
        payload=ev.ConversationMuteChangedPayload(conversation_id=group, muted=True),
    )
    connected = presence("carol", now)
    token = daves_tablet_token(now)
    typing = ev.TypingChanged.new(
        tenant_id=TENANT,
        actor=ev.Actor(user_id="bob"),
        occurred_at=now,
        payload=ev.TypingChangedPayload(conversation_id=group, active=True),
    )

    expected_by_value: dict[bytes, dict[str, Any]] = {}

    def event_record(topic: str, key: bytes, event: ev.Event, **expect: Any) -> Outgoing:
        value = ev.encode_event(event)
        expected_by_value[value] = {
            "event_id": event.event_id,
            "event_type": event.type,
            "tenant_id": event.tenant_id,
            "conversation_id": getattr(event.payload, "conversation_id", None),
            "user_id": event.actor.user_id if event.actor else None,
            "sync_id": None,
            "conversation_seq": getattr(event.payload, "conversation_seq", None),
            "occurred_at": event.occurred_at,
            "error_code": None,
            "error_source_topic": None,
            **expect,
        }
        return Outgoing(topic, key, value)

    inbound = [
        event_record(catalog.messages_in.name, conversation_key(TENANT, dm), dm_created),
        event_record(catalog.messages_in.name, conversation_key(TENANT, group), group_created),
        *(
            event_record(
                catalog.messages_in.name,
                conversation_key(TENANT, m.payload.conversation_id),
                m,
            )
            for m in sends
        ),
        event_record(catalog.user_state_in.name, user_key(TENANT, "carol"), mute),
        event_record(catalog.presence.name, user_key(TENANT, "carol"), connected),
        event_record(
            catalog.push_tokens.name,
            device_key(TENANT, "dave", "dave-tablet"),
            token,
            conversation_id=None,
        ),
        event_record(catalog.typing_in.name, conversation_key(TENANT, group), typing),
    ]

    # The stream stage's outputs: the conversation log, inbox records, sync queues of several
    # users, a live delivery and a push job.
    processed = [
        event_record(catalog.messages_sequenced.name, conversation_key(TENANT, dm), dm_created),
        event_record(
            catalog.messages_sequenced.name, conversation_key(TENANT, group), group_created
        ),
        *(
            event_record(
                catalog.messages_sequenced.name,
                conversation_key(TENANT, m.payload.conversation_id),
                m,
            )
            for m in sequenced
        ),
    ]
    members = {dm: ["alice", "bob"], group: ["alice", "bob", "carol"]}
    sync_ids: dict[str, int] = {}
    for message in sequenced:
        conversation_id = message.payload.conversation_id
        for user in members[conversation_id]:
            sync_ids[user] = sync_ids.get(user, 0) + 1
            record = ev.SyncRecord(
                tenant_id=TENANT, user_id=user, sync_id=sync_ids[user], event=message
            )
            value = record.model_dump_json().encode()
            expected_by_value[value] = {
                "event_id": message.event_id,
                "event_type": "message.sent",
                "tenant_id": TENANT,
                "conversation_id": conversation_id,
                "user_id": user,
                "sync_id": sync_ids[user],
                "conversation_seq": message.payload.conversation_seq,
                "occurred_at": message.occurred_at,
                "error_code": None,
                "error_source_topic": None,
            }
            processed.append(Outgoing(catalog.sync_events.name, user_key(TENANT, user), value))
    inbox = ev.InboxRecord(
        tenant_id=TENANT, user_id="bob", conversation_id=dm, position=3, event=sequenced[0]
    )
    inbox_value = inbox.model_dump_json().encode()
    expected_by_value[inbox_value] = {
        "event_id": sequenced[0].event_id,
        "event_type": "message.sent",
        "user_id": "bob",
        "conversation_id": dm,
        "conversation_seq": 1,
        "sync_id": None,
    }
    processed.append(Outgoing(catalog.user_inbox.name, user_key(TENANT, "bob"), inbox_value))
    live = ev.LiveDelivery(
        node_id="ingress-1", tenant_id=TENANT, user_id="bob", sync_id=1, event=sequenced[0]
    )
    live_value = live.model_dump_json().encode()
    expected_by_value[live_value] = {
        "event_id": sequenced[0].event_id,
        "user_id": "bob",
        "sync_id": 1,
        "conversation_seq": 1,
    }
    processed.append(Outgoing(catalog.live_delivery.name, gateway_key("ingress-1"), live_value))
    job = push_job("carol", sequenced[2], merged_count=2)
    job_value = job.model_dump_json().encode()
    expected_by_value[job_value] = {
        "event_id": job.job_id,
        "event_type": "push.job",
        "tenant_id": TENANT,
        "user_id": "carol",
        "conversation_id": group,
        "conversation_seq": 1,
        "occurred_at": job.occurred_at,
    }
    processed.append(Outgoing(catalog.push_jobs.name, user_key(TENANT, "carol"), job_value))

    # A processor's dead letter, with the reason in headers.
    rejected_value = b'{"type": "message.sent", "tenant_id": "acme"}'
    expected_by_value[rejected_value] = {
        "event_type": "undecodable",
        "error_code": "schema-invalid",
        "error_message": "event_id: Field required",
        "error_source_topic": catalog.messages_in.name,
        "error_source_partition": 2,
        "error_source_offset": 41,
    }
    dead_letter = Outgoing(
        catalog.dead_letter_of(catalog.messages_in).name,
        conversation_key(TENANT, dm),
        rejected_value,
        headers=[
            ("imstream.error.code", b"schema-invalid"),
            ("imstream.error.message", b"event_id: Field required"),
            ("imstream.source.topic", catalog.messages_in.name.encode()),
            ("imstream.source.partition", b"2"),
            ("imstream.source.offset", b"41"),
        ],
    )

    # Poison: not JSON, not UTF-8, not the schema, and one on a topic with no dead-letter topic.
    poison_values = {
        (catalog.messages_sequenced.name, b"not json at all"): "malformed-json",
        (catalog.sync_events.name, b"\xff\xfe\xfd"): "invalid-utf8",
        (catalog.push_jobs.name, b'{"job_id": "nope"}'): "schema-invalid",
        (catalog.typing_in.name, b"{"): "malformed-json",
    }
    poison = [
        Outgoing(topic, conversation_key(TENANT, "poison"), value) for topic, value in poison_values
    ]
    for (_, value), code in poison_values.items():
        expected_by_value[value] = {
            "event_type": "undecodable",
            "tenant_id": "",
            "event_id": None,
            "error_code": code,
        }

    records = produce(settings, [*inbound, dead_letter, *poison])
    records += produce_transaction(settings, processed)
    aborted = produce_transaction(
        settings,
        [
            Outgoing(
                catalog.messages_sequenced.name,
                conversation_key(TENANT, dm),
                ev.encode_event(sent("alice", dm, "never", now)),
            )
        ],
        abort=True,
    )
    expected = {record.coordinates: expected_by_value[record.value or b""] for record in records}
    poison_coordinates = {
        record.coordinates: (
            poison_values[(record.topic, record.value or b"")],
            catalog.by_name(record.topic).dead_letter,
        )
        for record in records
        if (record.topic, record.value) in poison_values
    }
    return Scenario(records, expected, aborted, poison_coordinates)


def test_every_record_is_audited_once_with_its_columns_and_poison_as_undecodable(
    sink_settings: Settings, store: ClickHouseStore, clickhouse: Client
) -> None:
    catalog = topic_catalog(sink_settings)
    scenario = produce_scenario(sink_settings, catalog)

    stats = run_sink(sink_settings, store)

    rows = audit_rows(clickhouse, store.database)
    by_coordinates = {(r["topic"], r["partition"], r["offset"]): r for r in rows}
    assert len(by_coordinates) == len(rows), "a record is in the audit twice"
    # Every produced record, with its own coordinates, key, value and Kafka timestamp.
    for record in scenario.records:
        row = by_coordinates.get(record.coordinates)
        assert row is not None, f"{record.coordinates} is missing from the audit"
        assert row["raw"] == record.value
        assert row["record_key"] == record.key
        assert row["record_timestamp"] == datetime.fromtimestamp(record.timestamp_ms / 1000, UTC)
        for column, value in scenario.expected[record.coordinates].items():
            assert row[column] == value, (record.coordinates, column)
    # The aborted transaction is not audited (read_committed).
    aborted_values = {record.value for record in scenario.aborted}
    assert not [row for row in rows if row["raw"] in aborted_values]

    # Poison is audited as `undecodable` with its reason, and never dead-lettered by the audit
    # sink (the topics' processing consumers do that): no dead letter names a poison record.
    for coordinates, (code, _topic) in scenario.poison.items():
        row = by_coordinates[coordinates]
        assert (row["event_type"], row["error_code"]) == ("undecodable", code)
    sink_dead_letters = [
        row
        for row in rows
        if row["topic"].endswith(".dlq")
        and (row["error_source_topic"], row["error_source_partition"], row["error_source_offset"])
        in scenario.poison
    ]
    assert sink_dead_letters == []
    # The four poison records and the processor's dead letter.
    assert stats.undecodable == 5
    assert len(rows) == len(scenario.records)
    assert len(rows) == raw_count(clickhouse, store.database), "a copy was inserted"

    # Every audited record's offset is committed (a transaction's trailing marker may be too).
    assert_committed(sink_settings, clickhouse_sink_group(sink_settings), list(by_coordinates))


def test_a_replay_of_the_same_range_changes_nothing_after_final(
    sink_settings: Settings, store: ClickHouseStore, clickhouse: Client
) -> None:
    catalog = topic_catalog(sink_settings)
    produce_scenario(sink_settings, catalog)
    run_sink(sink_settings, store)
    database = store.database
    first = snapshot(clickhouse, database)
    stored = raw_count(clickhouse, database)
    assert first["audit"] and all(first["views"][view] for view in VIEWS if "push_out" not in view)
    dead_letter_topics = [topic.name for topic in catalog.dead_letters]
    dead_letters_before = end_offsets(sink_settings, dead_letter_topics)

    # Replay everything from the beginning as a new group; keep the copies unmerged to see them.
    clickhouse.command(f"SYSTEM STOP MERGES {database}.{AUDIT_TABLE}")
    try:
        run_sink(sink_settings, store, group_id=f"{clickhouse_sink_group(sink_settings)}-replay")
        assert raw_count(clickhouse, database) == 2 * stored, "the replay inserted every record"
        assert snapshot(clickhouse, database) == first
    finally:
        clickhouse.command(f"SYSTEM START MERGES {database}.{AUDIT_TABLE}")
    # The replay wrote no dead letters either.
    assert end_offsets(sink_settings, dead_letter_topics) == dead_letters_before

    clickhouse.command(f"OPTIMIZE TABLE {database}.{AUDIT_TABLE} FINAL")
    assert raw_count(clickhouse, database) == stored
    assert snapshot(clickhouse, database) == first


def test_failed_inserts_are_retried_and_never_committed_past(
    sink_settings: Settings, store: ClickHouseStore, clickhouse: Client
) -> None:
    catalog = topic_catalog(sink_settings)
    now = datetime.now(UTC)
    dm = ev.direct_conversation_id(TENANT, "alice", "bob")
    records = produce(
        sink_settings,
        [
            Outgoing(
                catalog.messages_in.name,
                conversation_key(TENANT, dm),
                ev.encode_event(sent("alice", dm, f"r{index}", now)),
            )
            for index in range(5)
        ],
    )
    store.apply_schema(catalog)
    table = f"{store.database}.{AUDIT_TABLE}"
    # ClickHouse refuses every insert until the constraint goes.
    store.call(lambda client: client.command(f"ALTER TABLE {table} ADD CONSTRAINT refuse CHECK 0"))
    stop = threading.Event()
    sink = ClickHouseSink(sink_settings, store, stop, backoff=Backoff(0.05, 0.2))
    failure: list[BaseException] = []

    def run() -> None:
        try:
            sink.run(until_caught_up=True)
        except BaseException as error:  # reported by the assertion below
            failure.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while sink.stats.insert_failures < 3:
            assert time.monotonic() < deadline, "the sink never tried to insert"
            assert thread.is_alive(), failure
            time.sleep(0.05)
        partitions = sorted({(r.topic, r.partition) for r in records})
        committed = committed_offsets(sink_settings, sink.group_id, partitions)
        assert all(offset < 0 for offset in committed.values()), committed
    finally:
        store.call(lambda client: client.command(f"ALTER TABLE {table} DROP CONSTRAINT refuse"))
    thread.join(60)
    assert not thread.is_alive() and not failure, failure

    assert raw_count(clickhouse, store.database) == len(records)
    rows = audit_rows(clickhouse, store.database)
    assert {(r["topic"], r["partition"], r["offset"]) for r in rows} == {
        r.coordinates for r in records
    }
    ends = end_offsets(sink_settings, [catalog.messages_in.name])
    assert committed_offsets(sink_settings, sink.group_id, partitions) == {
        tp: ends[tp] for tp in partitions
    }
    assert sink.stats.records == len(records)


def test_the_sink_process_serves_analytics_and_stops_cleanly_on_sigterm(
    settings: Settings, local_stack: LocalStack, tmp_path: Path
) -> None:
    """``imstream run clickhouse-sink`` as a real process on a chDB path of its own."""
    prefixed = prefixed_settings(settings, new_prefix("chp"))
    with catalog_topics(prefixed) as catalog:
        now = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=2)
        dm = ev.direct_conversation_id(TENANT, "alice", "bob")
        messages = [
            sent("alice", dm, "p1", now, seq=1),
            sent("bob", dm, "p2", now + timedelta(seconds=1), seq=2),
            sent("carol", "g-1", "p3", now + timedelta(seconds=2), seq=1),
        ]
        records = produce_transaction(
            prefixed,
            [
                Outgoing(
                    catalog.messages_sequenced.name,
                    conversation_key(TENANT, m.payload.conversation_id),
                    ev.encode_event(m),
                )
                for m in messages
            ],
        )
        port = _free_port()
        log_path = tmp_path / "clickhouse-sink.log"
        environment = {
            **os.environ,
            "IM_KAFKA__BOOTSTRAP_SERVERS": prefixed.kafka.bootstrap_servers,
            "IM_KAFKA__TOPIC_PREFIX": prefixed.kafka.topic_prefix,
            "IM_CLICKHOUSE__CHDB_PATH": str(tmp_path / "chdb"),
            "IM_CLICKHOUSE__DATABASE": "imstream_process_test",
            "IM_SINKS__ANALYTICS_PORT": str(port),
            "IM_SINKS__CLICKHOUSE_BATCH_SECONDS": "0.2",
        }
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "pipelines", "run", "clickhouse-sink"],
                env=environment,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        try:
            query = urllib.parse.urlencode(
                {
                    "tenant": TENANT,
                    "from": (now - timedelta(minutes=1)).isoformat(),
                    "to": (now + timedelta(minutes=1)).isoformat(),
                }
            )
            url = f"http://127.0.0.1:{port}/v1/analytics/messages_per_minute?{query}"
            deadline = time.monotonic() + 90
            answer: dict[str, Any] = {}
            while time.monotonic() < deadline:
                assert process.poll() is None, log_path.read_text()
                answer = _get_json(url) or {}
                if sum(row["messages"] for row in answer.get("rows", [])) == 3:
                    break
                time.sleep(0.3)
            assert answer.get("rows") == [
                {
                    "tenant_id": TENANT,
                    "minute": now.isoformat().replace("+00:00", "Z"),
                    "conversation_kind": "direct",
                    "messages": 2,
                },
                {
                    "tenant_id": TENANT,
                    "minute": now.isoformat().replace("+00:00", "Z"),
                    "conversation_kind": "group",
                    "messages": 1,
                },
            ], log_path.read_text()
            assert _get_json(f"http://127.0.0.1:{port}/healthz", {}) == {"status": "ok"}
            # The process's API wants a staff token: anonymous, the query is refused.
            assert httpx.get(url, timeout=5).status_code == 401
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                code = process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                raise
        output = log_path.read_text()
        assert code == 0, output
        assert "clickhouse sink stopped" in output
        assert_committed(
            prefixed, clickhouse_sink_group(prefixed), [r.coordinates for r in records]
        )


def assert_committed(
    settings: Settings, group_id: str, coordinates: list[tuple[str, int, int]]
) -> None:
    """The group committed every partition past its last record, and not past its end."""
    last: dict[tuple[str, int], int] = {}
    for topic, partition, offset in coordinates:
        last[(topic, partition)] = max(last.get((topic, partition), -1), offset)
    committed = committed_offsets(settings, group_id, sorted(last))
    ends = end_offsets(settings, sorted({topic for topic, _ in last}))
    for tp, offset in last.items():
        assert offset + 1 <= committed[tp] <= ends[tp], (tp, offset, committed[tp], ends[tp])


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _get_json(url: str, headers: dict[str, str] | None = None) -> Any:
    """The answer with a staff token (default a platform analyst's); None if there is none."""
    try:
        response = httpx.get(
            url, headers=staff_headers() if headers is None else headers, timeout=5
        )
        response.raise_for_status()
    except httpx.HTTPError:
        return None
    return response.json()


def test_values_clickhouse_cannot_store_are_audited_as_undecodable_not_a_stuck_insert(
    settings: Settings, local_stack: LocalStack, store: ClickHouseStore, clickhouse: Client
) -> None:
    """pydantic accepts years up to 9999 and unbounded seqs, Kafka any timestamp: such records
    must neither fail the batch's insert (a seq beyond UInt64 would, and the sink would retry it
    forever) nor be stored as nonsense times (a year 9999 would)."""
    catalog = topic_catalog(prefixed_settings(settings, new_prefix("chv")))
    store.apply_schema(catalog)
    decoder = AuditDecoder(catalog)
    dm = ev.direct_conversation_id(TENANT, "alice", "bob")
    far_future = ev.encode_event(sent("alice", dm, "x1", datetime(9999, 1, 1, tzinfo=UTC)))
    huge_seq = json.loads(ev.encode_event(sent("alice", dm, "x2", datetime.now(UTC), seq=1)))
    huge_seq["payload"]["conversation_seq"] = 2**70
    sequenced = catalog.messages_sequenced.name
    cases = {
        (sequenced, 0): (far_future, 1_000, "undecodable", "schema-invalid"),
        (sequenced, 1): (json.dumps(huge_seq).encode(), 1_000, "undecodable", "schema-invalid"),
        (sequenced, 2): (None, 1_000, "undecodable", "malformed-json"),
        (catalog.push_tokens.name, 0): (None, 1_000, "tombstone", None),
        # A Kafka timestamp in the year 3000: stored as the epoch, the event kept.
        (sequenced, 3): (
            ev.encode_event(sent("bob", dm, "x3", datetime.now(UTC))),
            32_503_680_000_000,
            "message.sent",
            None,
        ),
    }
    audited = [
        decoder.audit(KafkaRecord(topic, 0, offset, None, value, timestamp))
        for (topic, offset), (value, timestamp, _, _) in cases.items()
    ]
    store.insert_audit([entry.row for entry in audited])

    rows = {(r["topic"], r["offset"]): r for r in audit_rows(clickhouse, store.database)}
    assert set(rows) == set(cases)
    for coordinates, (_, _, event_type, code) in cases.items():
        assert (rows[coordinates]["event_type"], rows[coordinates]["error_code"]) == (
            event_type,
            code,
        ), coordinates
    assert rows[(sequenced, 3)]["record_timestamp"] == datetime(1970, 1, 1, tzinfo=UTC)


def push_outcome(
    job: ev.PushJob,
    attempt: int,
    outcome: ev.PushAttemptOutcome,
    *,
    device_id: str | None = "carol-phone",
    provider: ev.PushProvider | None = ev.PushProvider.APNS,
    status_code: int | None = None,
    reason: str | None = None,
) -> ev.PushOutcomeRecord:
    """The record of ``attempt`` at ``job`` (made a second per attempt after the job): the job's
    identity, then what was tried and how it ended."""
    identity = job.model_dump(
        include={"job_id", "tenant_id", "user_id", "conversation_id", "message_id"}
    )
    return ev.PushOutcomeRecord.model_validate(
        {
            **identity,
            "job_occurred_at": job.occurred_at,
            "device_id": device_id,
            "provider": provider,
            "attempt": attempt,
            "outcome": outcome,
            "status_code": status_code,
            "reason": reason,
            "attempted_at": job.occurred_at + timedelta(seconds=attempt),
        }
    )


def test_push_outcome_records_become_push_outcome_rows_once_and_are_audited(
    sink_settings: Settings, store: ClickHouseStore, clickhouse: Client
) -> None:
    catalog = topic_catalog(sink_settings)
    now = datetime.now(UTC).replace(microsecond=250000) - timedelta(minutes=2)
    group = "g-team"
    job = push_job("carol", sent("bob", group, "m1", now, seq=4))
    outcomes = [
        push_outcome(job, 1, ev.PushAttemptOutcome.THROTTLED, status_code=429, reason="TooMany"),
        push_outcome(job, 2, ev.PushAttemptOutcome.SENT, status_code=200),
        push_outcome(
            job,
            1,
            ev.PushAttemptOutcome.INVALID_TOKEN,
            device_id="carol-tablet",
            provider=ev.PushProvider.FCM,
            status_code=404,
            reason="UNREGISTERED",
        ),
    ]
    other_job = push_job("dave", sent("bob", group, "m2", now, seq=5))
    nowhere = push_outcome(
        other_job,
        0,
        ev.PushAttemptOutcome.SKIPPED,
        device_id=None,
        provider=None,
        reason="no-device-token",
    )
    topic = catalog.push_outcomes.name
    values = [record.model_dump_json().encode() for record in (*outcomes, nowhere)]
    records = produce(
        sink_settings,
        [
            *(Outgoing(topic, user_key(TENANT, "carol"), value) for value in values[:3]),
            Outgoing(topic, user_key(TENANT, "dave"), values[3]),
            # The push sender wrote one again (it processed the job again after a crash).
            Outgoing(topic, user_key(TENANT, "carol"), values[1]),
            Outgoing(topic, user_key(TENANT, "carol"), b'{"job_id": "not one"}'),
        ],
    )

    stats = run_sink(sink_settings, store)

    result = clickhouse.query(
        "SELECT job_id, tenant_id, user_id, conversation_id, message_id, job_occurred_at, "
        "device_id, provider, attempt, outcome, status_code, reason, attempted_at "
        f"FROM {store.database}.push_outcomes FINAL",
        query_tz="UTC",
    )
    rows = [tuple(_plain(value) for value in row) for row in result.result_rows]
    expected = [
        (
            record.job_id,
            TENANT,
            record.user_id,
            group,
            record.message_id,
            record.job_occurred_at,
            record.device_id or "",
            record.provider.value if record.provider else "",
            record.attempt,
            record.outcome.value,
            record.status_code,
            record.reason,
            record.attempted_at,
        )
        for record in (*outcomes, nowhere)
    ]
    assert sorted(rows, key=str) == sorted(expected, key=str)
    per_minute = clickhouse.query(
        f"SELECT provider, outcome, sum(attempts), sum(jobs) FROM "
        f"{store.database}.push_outcomes_per_minute GROUP BY provider, outcome ORDER BY ALL"
    ).result_rows
    assert per_minute == [
        ("", "skipped", 1, 1),
        ("apns", "sent", 1, 1),
        ("apns", "throttled", 1, 1),
        ("fcm", "invalid_token", 1, 1),
    ]
    # Every record is audited like any other: the outcomes as push.outcome, the poison as such.
    audited = {
        (r["topic"], r["partition"], r["offset"]): r for r in audit_rows(clickhouse, store.database)
    }
    assert set(audited) == {record.coordinates for record in records}
    for record in records:
        row = audited[record.coordinates]
        if record.value in values:
            decoded = ev.PushOutcomeRecord.model_validate_json(record.value or b"")
            assert (row["event_type"], row["event_id"]) == ("push.outcome", decoded.job_id)
            assert row["occurred_at"] == decoded.attempted_at
        else:
            assert (row["event_type"], row["error_code"]) == ("undecodable", "schema-invalid")
    assert stats.undecodable == 1


def test_records_of_several_fetches_are_one_insert_flushed_on_the_batch_window(
    sink_settings: Settings, store: ClickHouseStore, clickhouse: Client
) -> None:
    """Two bursts 0.4 s apart, far fewer records than a full batch: one insert, made when the
    window (2 s from the first record consumed) is up, not at every fetch."""
    window = 2.0
    settings = sink_settings.model_copy(
        update={
            "sinks": sink_settings.sinks.model_copy(
                update={"clickhouse_batch_rows": 1000, "clickhouse_batch_seconds": window}
            )
        }
    )
    catalog = topic_catalog(settings)
    now = datetime.now(UTC)
    dm = ev.direct_conversation_id(TENANT, "alice", "bob")

    def burst(first: int) -> list[Outgoing]:
        return [
            Outgoing(
                catalog.messages_sequenced.name,
                conversation_key(TENANT, dm),
                ev.encode_event(sent("alice", dm, f"b{index}", now, seq=index + 1)),
            )
            for index in range(first, first + 3)
        ]

    stop = threading.Event()
    sink = ClickHouseSink(settings, store, stop)
    thread = threading.Thread(target=sink.run, daemon=True)
    thread.start()
    try:
        assert sink.ready.wait(60), "the sink was never assigned its partitions"
        started = time.monotonic()
        produce(settings, burst(0))
        time.sleep(0.4)
        produce(settings, burst(3))
        deadline = started + 30
        while sink.stats.records < 6:
            assert time.monotonic() < deadline, "the batch was never inserted"
            time.sleep(0.02)
        took = time.monotonic() - started
    finally:
        stop.set()
        thread.join(30)
    assert (sink.stats.batches, sink.stats.rows_inserted) == (1, 6)
    # Not before the window is up; not much after it (the fetch wait and a loaded machine).
    assert window <= took < window + 3
    assert len(audit_rows(clickhouse, store.database)) == 6
