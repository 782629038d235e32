"""Helpers for the ClickHouse sink tests: prefixed catalogs on the real Kafka, producing records
with their coordinates, events with chosen times, reading offsets back."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from clickhouse_connect.driver.client import Client
from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from core.connections import kafka_config, kafka_producer_config
from core.settings import KafkaSettings, Settings
from pipelines.topics import apply_topics
from schemas import events as ev
from schemas.topics import TopicCatalog, topic_catalog
from sinks.clickhouse.audit import KafkaRecord
from sinks.clickhouse.store import ClickHouseStore
from tests.sinks.kafka_support import delete_prefixed_topics

TENANT = "acme"


@dataclass(frozen=True)
class Outgoing:
    """A record to produce."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    timestamp_ms: int | None = None


@dataclass(frozen=True)
class Produced:
    """A record as Kafka stored it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    timestamp_ms: int

    @property
    def coordinates(self) -> tuple[str, int, int]:
        return (self.topic, self.partition, self.offset)


def prefixed_settings(settings: Settings, prefix: str, database: str | None = None) -> Settings:
    """``settings`` with a topic prefix, a ClickHouse database and small, fast batches."""
    update: dict[str, Any] = {
        "kafka": KafkaSettings(
            bootstrap_servers=settings.kafka.bootstrap_servers, topic_prefix=prefix
        ),
        "sinks": settings.sinks.model_copy(
            update={"clickhouse_batch_rows": 25, "clickhouse_batch_seconds": 0.2}
        ),
    }
    if database is not None:
        update["clickhouse"] = settings.clickhouse.model_copy(update={"database": database})
    return settings.model_copy(update=update)


@contextmanager
def catalog_topics(settings: Settings) -> Iterator[TopicCatalog]:
    """Every catalog topic under ``settings``' prefix, deleted afterwards."""
    admin = AdminClient(kafka_config(settings))
    catalog = topic_catalog(settings)
    apply_topics(admin, catalog)
    try:
        yield catalog
    finally:
        delete_prefixed_topics(admin, settings.kafka.topic_prefix)


def new_prefix(tag: str) -> str:
    return f"t-{tag}-{uuid.uuid4().hex[:8]}-"


@contextmanager
def prefixed_sink(settings: Settings, tag: str, database: str) -> Iterator[Settings]:
    """Settings with a prefix of their own and ``database``: every catalog topic, deleted after,
    and every consumer group under the prefix (a sink's, a redrive's), deleted after too."""
    prefixed = prefixed_settings(settings, new_prefix(tag), database)
    with catalog_topics(prefixed):
        yield prefixed
    admin = AdminClient(kafka_config(prefixed))
    groups = {g.group_id for g in admin.list_consumer_groups().result(timeout=30).valid}
    ours = [g for g in groups if g.startswith(prefixed.kafka.topic_prefix)]
    if ours:
        for future in admin.delete_consumer_groups(ours).values():
            future.result(timeout=30)


def shared_client_store(client: Client, database: str) -> Iterator[ClickHouseStore]:
    """A store over the session's one chDB client (chDB allows one data path per process),
    closed after: a fixture's body (``yield from``)."""
    store = ClickHouseStore(client, database, owns_client=False)
    yield store
    store.close()


def _collector(produced: list[Produced], failures: list[str]) -> Any:
    def delivered(error: KafkaError | None, message: Message) -> None:
        if error is not None:
            failures.append(str(error))
            return
        raw_headers = message.headers() or []
        items = raw_headers.items() if isinstance(raw_headers, dict) else raw_headers
        headers = [(name, value) for name, value in items if isinstance(value, bytes)]
        produced.append(
            Produced(
                topic=message.topic() or "",
                partition=message.partition() or 0,
                offset=message.offset() or 0,
                key=message.key(),
                value=message.value(),
                headers=headers,
                timestamp_ms=message.timestamp()[1],
            )
        )

    return delivered


def _send(producer: Producer, records: Sequence[Outgoing], on_delivery: Any) -> None:
    for record in records:
        kwargs: dict[str, Any] = {"key": record.key, "value": record.value}
        if record.headers:
            kwargs["headers"] = record.headers
        if record.timestamp_ms is not None:
            kwargs["timestamp"] = record.timestamp_ms
        producer.produce(record.topic, on_delivery=on_delivery, **kwargs)
        producer.poll(0)


def produce(settings: Settings, records: Sequence[Outgoing]) -> list[Produced]:
    """Produce with an idempotent producer (as the ingress does); the stored records in order."""
    produced: list[Produced] = []
    failures: list[str] = []
    producer = Producer(kafka_producer_config(settings, **{"enable.idempotence": True}))
    _send(producer, records, _collector(produced, failures))
    assert producer.flush(60) == 0
    assert not failures, failures
    return produced


def produce_transaction(
    settings: Settings, records: Sequence[Outgoing], *, abort: bool = False
) -> list[Produced]:
    """Produce in one Kafka transaction (as the stream stage does); committed unless ``abort``."""
    produced: list[Produced] = []
    failures: list[str] = []
    producer = Producer(
        kafka_producer_config(settings, **{"transactional.id": f"t-tx-{uuid.uuid4().hex}"})
    )
    producer.init_transactions(30)
    producer.begin_transaction()
    _send(producer, records, _collector(produced, failures))
    producer.flush(60)
    if abort:
        producer.abort_transaction(30)
    else:
        producer.commit_transaction(30)
    assert not failures, failures
    return produced


def end_offsets(settings: Settings, topics: Sequence[str]) -> dict[tuple[str, int], int]:
    """The high watermark of every partition of ``topics``."""
    consumer = Consumer(kafka_config(settings, **{"group.id": f"t-wm-{uuid.uuid4().hex}"}))
    try:
        metadata = consumer.list_topics(timeout=30)
        ends = {}
        for topic in topics:
            for partition in metadata.topics[topic].partitions:
                _, high = consumer.get_watermark_offsets(
                    TopicPartition(topic, partition), timeout=30, cached=False
                )
                ends[(topic, partition)] = high
        return ends
    finally:
        consumer.close()


def committed_offsets(
    settings: Settings, group_id: str, partitions: Sequence[tuple[str, int]]
) -> dict[tuple[str, int], int]:
    """The group's committed offsets (negative when none), without joining the group."""
    consumer = Consumer(kafka_config(settings, **{"group.id": group_id}))
    try:
        committed = consumer.committed([TopicPartition(t, p) for t, p in partitions], timeout=30)
        return {(tp.topic, tp.partition): tp.offset for tp in committed}
    finally:
        consumer.close()


def at(text: str) -> datetime:
    """A UTC time from ``YYYY-MM-DDTHH:MM:SS[.ffffff]``."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def millis(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def next_record(
    offsets: dict[str, int],
    topic: str,
    value: bytes,
    record_time: datetime,
    headers: Sequence[tuple[str, bytes | None]] = (),
) -> KafkaRecord:
    """The next record of ``topic`` (partition 0, no key, stamped ``record_time``) as the audit
    decoder reads it; ``offsets`` counts the records already handed out per topic."""
    offset = offsets.get(topic, 0)
    offsets[topic] = offset + 1
    return KafkaRecord(
        topic=topic,
        partition=0,
        offset=offset,
        key=None,
        value=value,
        timestamp_ms=millis(record_time),
        headers=headers,
    )


def created(
    conversation_id: str,
    kind: ev.ConversationKind,
    members: list[str],
    occurred_at: datetime,
    *,
    tenant: str = TENANT,
) -> ev.ConversationCreated:
    return ev.ConversationCreated.new(
        tenant_id=tenant,
        actor=ev.Actor(user_id=members[0]),
        occurred_at=occurred_at,
        payload=ev.ConversationCreatedPayload(
            conversation_id=conversation_id,
            kind=kind,
            members=members,
            owner_id=members[0] if kind is ev.ConversationKind.GROUP else None,
        ),
    )


def sent(
    sender: str,
    conversation_id: str,
    client_msg_id: str,
    occurred_at: datetime,
    *,
    seq: int | None = None,
    tenant: str = TENANT,
    text: str | None = None,
) -> ev.MessageSent:
    """A text message from the sender's phone; ``text`` defaults to one naming the message."""
    return ev.MessageSent.new(
        tenant_id=tenant,
        actor=ev.Actor(user_id=sender, device_id=f"{sender}-phone"),
        event_id=ev.message_event_id(tenant, sender, client_msg_id),
        occurred_at=occurred_at,
        payload=ev.MessageSentPayload(
            conversation_id=conversation_id,
            client_msg_id=client_msg_id,
            body=ev.TextBody(text=f"message {client_msg_id}" if text is None else text),
            conversation_seq=seq,
        ),
    )


def daves_tablet_token(occurred_at: datetime) -> ev.PushTokenRegistered:
    """dave registers his tablet's FCM token for the development app."""
    return ev.PushTokenRegistered.new(
        tenant_id=TENANT,
        actor=ev.Actor(user_id="dave"),
        occurred_at=occurred_at,
        payload=ev.PushTokenRegisteredPayload(
            user_id="dave",
            device_id="dave-tablet",
            provider=ev.PushProvider.FCM,
            token="t" * 40,
            app_id="dev.imstream.app",
        ),
    )


def presence(user: str, occurred_at: datetime, *, tenant: str = TENANT) -> ev.DeviceConnected:
    return ev.DeviceConnected.new(
        tenant_id=tenant,
        actor=ev.Actor(user_id=user, device_id=f"{user}-phone"),
        occurred_at=occurred_at,
        payload=ev.DevicePresencePayload(
            user_id=user,
            device_id=f"{user}-phone",
            platform=ev.Platform.ANDROID,
            node_id="ingress-1",
            connection_id=f"conn-{user}",
        ),
    )


def push_job(
    user: str,
    message: ev.MessageSent,
    *,
    merged_count: int = 1,
    tenant: str = TENANT,
) -> ev.PushJob:
    seq = message.payload.conversation_seq or 1
    return ev.PushJob(
        job_id=ev.derived_event_id(message.event_id, f"push/{user}"),
        tenant_id=tenant,
        user_id=user,
        conversation_id=message.payload.conversation_id,
        conversation_seq=seq,
        message_id=message.event_id,
        sender_id=message.actor.user_id,
        body=message.payload.body,
        merged_count=merged_count,
        unread_total=merged_count,
        occurred_at=message.occurred_at,
    )
