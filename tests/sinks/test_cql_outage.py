"""Issue 5's acceptance: the CQL sink rides out a 30-second Cassandra outage.

``imstream run cql-sink`` runs as a process while records arrive continuously (sequenced
messages and sync records, about 50 a second). In the middle, Cassandra is stopped for 30
seconds and started again. Afterwards the sink process is still the same one, it logged its
retries, its consumer group catches up (lag 0) within a bound, and the tables hold every
produced record exactly once — nothing missing, nothing extra.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cassandra.cluster import Session
from cassandra.policies import ConstantReconnectionPolicy
from confluent_kafka import Producer

from core.connections import kafka_producer_config
from core.groups import cql_sink_group
from core.settings import Settings
from pipelines.stack import process
from pipelines.stack.manager import LocalStack
from schemas.events import (
    Actor,
    ConversationSummary,
    MessageSent,
    MessageSentPayload,
    SyncRecord,
    TextBody,
    encode_event,
    message_event_id,
)
from schemas.topics import TopicCatalog, conversation_key, topic_catalog, user_key
from tests.sinks.cql_support import (
    CQL_SERVICES,
    SinkProcess,
    catalog_topics,
    committed_lag,
    cql_local_stack,  # noqa: F401 - the local_stack fixture: Kafka and Cassandra only
    new_prefix,
    select,
)

pytestmark = pytest.mark.stack

TENANT = "acme"
RATE_PER_SECOND = 50
PRODUCE_SECONDS = 50.0
OUTAGE_STARTS_AFTER = 8.0
OUTAGE_SECONDS = 30.0
#: How long the sink may take to drain its backlog once Cassandra answers again.
CATCH_UP_BOUND = 60.0
CONVERSATIONS = 8
USERS = 12
RETRY_LINE = "CQL write failed (transient), retrying"


@dataclass
class Produced:
    """Everything the producer thread wrote: the expected content of the tables."""

    messages: dict[tuple[str, int], str] = field(default_factory=dict)
    """(conversation, seq) → message id."""
    sync: dict[tuple[str, int], str] = field(default_factory=dict)
    """(user, sync_id) → event id."""
    error: BaseException | None = None


def _message(conversation: str, seq: int, sender: str) -> MessageSent:
    client_msg_id = f"{conversation}-{seq}"
    return MessageSent.new(
        tenant_id=TENANT,
        actor=Actor(user_id=sender),
        event_id=message_event_id(TENANT, sender, client_msg_id),
        occurred_at=datetime(2025, 3, 1, tzinfo=UTC) + timedelta(milliseconds=seq),
        payload=MessageSentPayload(
            conversation_id=conversation,
            client_msg_id=client_msg_id,
            body=TextBody(text=f"message {seq} of {conversation}"),
            conversation_seq=seq,
        ),
    )


def produce_continuously(
    settings: Settings, catalog: TopicCatalog, produced: Produced, seconds: float
) -> None:
    """About ``RATE_PER_SECOND`` records a second, half messages, half sync records."""
    seqs: dict[str, int] = {}
    sync_ids: dict[str, int] = {}
    producer = Producer(kafka_producer_config(settings, **{"enable.idempotence": True}))
    started = time.monotonic()
    sent = 0
    try:
        while time.monotonic() - started < seconds:
            batch: list[tuple[str, bytes, bytes]] = []
            for _ in range(RATE_PER_SECOND // 10):
                conversation = f"c{sent % CONVERSATIONS}"
                seq = seqs[conversation] = seqs.get(conversation, 0) + 1
                message = _message(conversation, seq, f"u{sent % USERS}")
                batch.append(
                    (
                        catalog.messages_sequenced.name,
                        conversation_key(TENANT, conversation),
                        encode_event(message),
                    )
                )
                produced.messages[(conversation, seq)] = message.event_id
                user = f"u{(sent * 7) % USERS}"
                sync_id = sync_ids[user] = sync_ids.get(user, 0) + 1
                record = SyncRecord(
                    tenant_id=TENANT,
                    user_id=user,
                    sync_id=sync_id,
                    event=message,
                    conversation=ConversationSummary(
                        conversation_id=conversation, last_seq=seq, read_seq=0, unread=seq
                    ),
                )
                batch.append(
                    (
                        catalog.sync_events.name,
                        user_key(TENANT, user),
                        record.model_dump_json().encode(),
                    )
                )
                produced.sync[(user, sync_id)] = message.event_id
                sent += 1
            for topic, key, value in batch:
                producer.produce(topic, key=key, value=value)
            if producer.flush(30) != 0:
                raise AssertionError("records not acknowledged within 30s")
            time.sleep(max(0.0, started + sent * 2 / RATE_PER_SECOND - time.monotonic()))
    except BaseException as error:
        produced.error = error


@pytest.fixture
def outage_settings(settings: Settings, cql_session: Session) -> Iterator[Settings]:
    with catalog_topics(settings, new_prefix("cqlo")) as prefixed:
        yield prefixed


def wait_until_answers(session: Session, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            session.execute("SELECT release_version FROM system.local")
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def assert_everything_stored(session: Session, keyspace: str, produced: Produced) -> None:
    """Every produced message and sync entry is in its tables, once; each user's sync head is
    their last sync id."""
    timeline = select(session, f"SELECT conversation_id, seq, event_id FROM {keyspace}.timeline")
    assert len(timeline) == len(produced.messages)
    assert {(r.conversation_id, r.seq): r.event_id for r in timeline} == produced.messages
    by_id = select(session, f"SELECT message_id FROM {keyspace}.messages_by_id")
    assert sorted(r.message_id for r in by_id) == sorted(produced.messages.values())
    queue = select(session, f"SELECT user_id, sync_id, event_id FROM {keyspace}.sync_queue")
    assert len(queue) == len(produced.sync)
    assert {(r.user_id, r.sync_id): r.event_id for r in queue} == produced.sync
    heads = select(session, f"SELECT user_id, last_sync_id FROM {keyspace}.sync_heads")
    expected_heads: dict[str, int] = {}
    for user, sync_id in produced.sync:
        expected_heads[user] = max(expected_heads.get(user, 0), sync_id)
    assert {r.user_id: r.last_sync_id for r in heads} == expected_heads


def test_the_sink_rides_out_a_cassandra_outage(
    outage_settings: Settings, settings: Settings, cql_session: Session, tmp_path: Path
) -> None:
    keyspace = f"t_cql_outage_{uuid.uuid4().hex[:8]}"
    catalog = topic_catalog(outage_settings)
    group_id = cql_sink_group(outage_settings)
    stack = LocalStack(settings, services=CQL_SERVICES)
    cassandra = stack.server("cassandra")
    # The shared test session reconnects within a second of Cassandra's return, not after the
    # driver's exponential schedule (up to 10 minutes).
    cql_session.cluster.reconnection_policy = ConstantReconnectionPolicy(1.0)
    sink = SinkProcess(
        {
            **os.environ,
            "IM_KAFKA__BOOTSTRAP_SERVERS": outage_settings.kafka.bootstrap_servers,
            "IM_KAFKA__TOPIC_PREFIX": outage_settings.kafka.topic_prefix,
            "IM_CQL__KEYSPACE": keyspace,
            "IM_SINKS__CQL_RETRY_MAX_SECONDS": "2",
        },
        tmp_path / "cql-sink.log",
    )
    produced = Produced()
    producer = threading.Thread(
        target=produce_continuously,
        args=(outage_settings, catalog, produced, PRODUCE_SECONDS),
        daemon=True,
    )
    back_at: float | None = None
    try:
        sink.start()  # migrates the new keyspace, then joins the group
        producer.start()
        time.sleep(OUTAGE_STARTS_AFTER)
        process.stop(process.find_pids(cassandra.marker), 60)
        assert not process.find_pids(cassandra.marker), "Cassandra did not stop"
        time.sleep(OUTAGE_SECONDS)
        assert sink.running(), sink.tail()
        stack.up()
        back_at = time.monotonic()
    finally:
        if not process.find_pids(cassandra.marker):
            stack.up()
        producer.join(PRODUCE_SECONDS + 30)
    try:
        assert produced.error is None, produced.error
        assert not producer.is_alive()
        assert back_at is not None

        topics = [catalog.messages_sequenced.name, catalog.sync_events.name]
        lag = committed_lag(outage_settings, group_id, topics)
        while lag > 0 and time.monotonic() - back_at < CATCH_UP_BOUND:
            time.sleep(1.0)
            lag = committed_lag(outage_settings, group_id, topics)
        assert lag == 0, f"lag {lag} {CATCH_UP_BOUND}s after Cassandra was back:\n{sink.tail()}"

        assert sink.running(), f"the sink exited:\n{sink.tail()}"
        log = sink.log()
        assert sink.log().count("cql sink ready") == 1  # one process, never restarted
        assert RETRY_LINE in log, sink.tail()
        assert "CQL writes succeed again after" in log, sink.tail()

        wait_until_answers(cql_session, 30)
        assert_everything_stored(cql_session, keyspace, produced)
        # Enough traffic crossed the outage for the test to mean something.
        assert len(produced.messages) > RATE_PER_SECOND * PRODUCE_SECONDS / 2 * 0.8

        assert sink.stop() == 0, sink.tail()
        assert "stopping:" in sink.log()
    finally:
        sink.stop()
        wait_until_answers(cql_session, 60)
        cql_session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}", timeout=60)
