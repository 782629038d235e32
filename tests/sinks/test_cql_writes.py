"""How the CQL sink sends its writes, over the real Cassandra: one single-partition batch per
partition, a refused batch sent again one write at a time so that only the write at fault is
refused, and a batch's writes to the same row coalesced into the latest one."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from cassandra.cluster import Session
from cassandra.query import BoundStatement

from core.backoff import Backoff
from core.records import InputRecord
from core.settings import Settings
from schemas.events import (
    Actor,
    ConversationSummary,
    MessageSent,
    MessageSentPayload,
    SyncRecord,
    TextBody,
    direct_conversation_id,
    encode_event,
    message_event_id,
)
from schemas.topics import conversation_key, topic_catalog, user_key
from sinks.cql.migrate import migrate
from sinks.cql.rules import Statements
from sinks.cql.sink import CqlSink
from sinks.cql.writer import (
    MAX_BATCH_BYTES,
    MAX_PARTITIONS,
    CqlWriter,
    PlannedWrite,
    grouped,
    refusal_code,
)
from tests.sinks.cql_support import (
    cql_local_stack,  # noqa: F401 - the local_stack fixture: Kafka and Cassandra only
    keyspace_settings,
    select,
)

pytestmark = pytest.mark.stack

TENANT = "acme"
T0 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)
#: Beyond Cassandra's maximum TTL (20 years): the cluster refuses such a write for good.
REFUSED_TTL = 30 * 365 * 86400


@pytest.fixture
def migrated(cql_session: Session, keyspace: str) -> str:
    migrate(cql_session, keyspace, 1)
    return keyspace


@pytest.fixture
def writer(cql_session: Session) -> CqlWriter:
    def never(_seconds: float) -> None:
        raise AssertionError("no write here is transient")

    return CqlWriter(cql_session, max_in_flight=8, backoff=Backoff(0.1, 0.1, "equal"), wait=never)


def queue_entry(statements: Statements, user: str, sync_id: int, ttl: int) -> BoundStatement:
    return statements.sync_entry.bind(
        (TENANT, user, 0, sync_id, "message.sent", f"e{sync_id}", "c1", "{}", ttl, sync_id)
    )


def queued(session: Session, keyspace: str, user: str) -> list[int]:
    rows = select(
        session,
        f"SELECT sync_id FROM {keyspace}.sync_queue WHERE tenant_id = %s AND user_id = %s "
        "AND bucket = 0",
        TENANT,
        user,
    )
    return sorted(row.sync_id for row in rows)


def test_writes_to_one_partition_go_in_one_request(
    cql_session: Session, migrated: str, writer: CqlWriter
) -> None:
    statements = Statements(cql_session, migrated)
    writes = [
        *(PlannedWrite(queue_entry(statements, "bob", n, 3600), n) for n in (1, 2, 3)),
        PlannedWrite(queue_entry(statements, "carol", 1, 3600), 3),
    ]

    # Per partition: bob's three writes in one batch, carol's alone.
    assert [len(request.writes) for request in grouped(writes)] == [3, 1]

    assert writer.execute(writes) == []

    # And partitions with the same replicas (one node: every one) share a request.
    assert writer.stats.requests == 1
    assert writer.stats.writes == 4
    assert queued(cql_session, migrated, "bob") == [1, 2, 3]
    assert queued(cql_session, migrated, "carol") == [1]


def test_a_request_of_several_partitions_stays_under_the_clusters_batch_thresholds(
    cql_session: Session, migrated: str, writer: CqlWriter, caplog: pytest.LogCaptureFixture
) -> None:
    """Cassandra logs and warns the client about an unlogged batch of more than 10 partitions
    or 5 KiB: requests stay under both, so no server warning on any cluster."""
    statements = Statements(cql_session, migrated)
    users = [f"user{n}" for n in range(25)]
    small = [
        PlannedWrite(queue_entry(statements, user, 1, 3600), n) for n, user in enumerate(users)
    ]
    big_body = "x" * 1500
    big = [
        PlannedWrite(
            statements.sync_entry.bind(
                (TENANT, f"big{n}", 0, 1, "message.sent", "e1", "c1", big_body, 3600, 1)
            ),
            100 + n,
        )
        for n in range(4)
    ]

    requests = grouped([*small, *big], cql_session.cluster.metadata.get_replicas)

    partitions = [len({w.statement.routing_key for w in request.writes}) for request in requests]
    sizes = [sum(len(v) for w in r.writes for v in w.statement.values) for r in requests]
    assert partitions[:2] == [MAX_PARTITIONS, MAX_PARTITIONS]  # full requests first
    assert all(n <= MAX_PARTITIONS for n in partitions)
    assert all(size <= MAX_BATCH_BYTES for size, n in zip(sizes, partitions, strict=True) if n > 1)
    assert sum(partitions) == 29 and len(requests) == 4  # not one per partition
    with caplog.at_level(logging.WARNING, logger="cassandra"):
        assert writer.execute([*small, *big]) == []
    # Cassandra attaches a warning to a response over its thresholds; the driver logs it.
    assert [r.getMessage() for r in caplog.records if "warning" in r.getMessage().lower()] == []
    assert writer.stats.requests == len(requests)
    assert all(queued(cql_session, migrated, user) == [1] for user in users)


def test_a_refused_batch_is_sent_again_write_by_write_and_only_the_bad_one_is_refused(
    cql_session: Session, migrated: str, writer: CqlWriter
) -> None:
    statements = Statements(cql_session, migrated)
    good = [PlannedWrite(queue_entry(statements, "bob", n, 3600), n) for n in (1, 3)]
    bad = PlannedWrite(queue_entry(statements, "bob", 2, REFUSED_TTL), 2)

    refused = writer.execute([good[0], bad, good[1]])

    assert [(write.record, refusal_code(error)) for write, error in refused] == [
        (2, "cql-invalid-request")
    ]
    assert writer.stats.requests == 1 + 3  # the batch, then each of its writes
    assert queued(cql_session, migrated, "bob") == [1, 3]


def test_the_writes_a_refused_one_made_moot_are_sent_in_its_place(
    cql_session: Session, migrated: str, writer: CqlWriter
) -> None:
    statements = Statements(cql_session, migrated)
    earlier = PlannedWrite(queue_entry(statements, "bob", 1, 3600), 0)
    winner = PlannedWrite(queue_entry(statements, "bob", 2, REFUSED_TTL), 1, overrides=(earlier,))

    refused = writer.execute([winner])

    assert [write.record for write, _ in refused] == [1]
    assert queued(cql_session, migrated, "bob") == [1]


# ---------------------------------------------------------------------------------------------
# The sink: a batch's writes to the same row, coalesced
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def sink(settings: Settings, cql_session: Session, migrated: str) -> Iterator[CqlSink]:
    sink = CqlSink(keyspace_settings(settings, migrated), cql_session, stop=threading.Event())
    yield sink
    sink.consumer.close()
    sink.producer.flush(5)


def conversation(sink: CqlSink, messages: int) -> list[InputRecord]:
    """Alice's ``messages`` messages to Bob, each on the conversation log and in Bob's queue."""
    catalog = topic_catalog(sink.settings)
    dm = direct_conversation_id(TENANT, "alice", "bob")
    records: list[InputRecord] = []
    for seq in range(1, messages + 1):
        sent = MessageSent.new(
            tenant_id=TENANT,
            actor=Actor(user_id="alice", device_id="alice-phone"),
            event_id=message_event_id(TENANT, "alice", f"m{seq}"),
            occurred_at=T0 + timedelta(seconds=seq),
            payload=MessageSentPayload(
                conversation_id=dm,
                client_msg_id=f"m{seq}",
                body=TextBody(text=f"hello {seq}"),
                conversation_seq=seq,
            ),
        )
        sync = SyncRecord(
            tenant_id=TENANT,
            user_id="bob",
            sync_id=seq,
            event=sent,
            conversation=ConversationSummary(
                conversation_id=dm, last_seq=seq, read_seq=0, unread=seq
            ),
        )
        records.append(
            InputRecord(
                catalog.messages_sequenced.name,
                0,
                seq,
                conversation_key(TENANT, dm),
                encode_event(sent),
            )
        )
        records.append(
            InputRecord(
                catalog.sync_events.name,
                0,
                seq,
                user_key(TENANT, "bob"),
                sync.model_dump_json().encode(),
            )
        )
    return records


def test_a_batch_writes_each_row_of_a_users_list_and_head_once(
    cql_session: Session, migrated: str, sink: CqlSink
) -> None:
    assert sink.apply(conversation(sink, 3)) == 0

    # Per message a timeline entry, its message row and Bob's queue entry; once for the batch
    # Bob's head and his list's row, summary and last message in one statement (not once per
    # message, in two: 18 statements).
    assert sink.writer.stats.writes == 3 * 3 + 2
    # Seven partitions (the timeline's and the queue's, Bob's list row, his head, and the three
    # message rows), all on the one node: under 10 partitions and 4 KiB a request, two requests
    # (one per partition, as before, would be seven).
    assert sink.writer.stats.requests == 2
    [row] = select(
        cql_session,
        f"SELECT last_seq, unread, last_message_id FROM {migrated}.user_conversations "
        "WHERE tenant_id = %s AND user_id = 'bob'",
        TENANT,
    )
    assert (row.last_seq, row.unread) == (3, 3)
    assert row.last_message_id == message_event_id(TENANT, "alice", "m3")
    [head] = select(
        cql_session,
        f"SELECT last_sync_id FROM {migrated}.sync_heads WHERE tenant_id = %s AND user_id = 'bob'",
        TENANT,
    )
    assert head.last_sync_id == 3
    assert queued(cql_session, migrated, "bob") == [1, 2, 3]
    timeline = select(cql_session, f"SELECT seq FROM {migrated}.timeline")
    assert sorted(row.seq for row in timeline) == [1, 2, 3]
