"""Read-only looks into the catalog's topics: ``imstream topics inspect | tail | find``.

Nothing here writes to Kafka or commits an offset: every consumer is assigned its partitions
explicitly (no group membership, no commits), reads ``read_committed`` like the pipelines do, and
stops at each partition's end (``enable.partition.eof``) unless it follows. Records are decoded
the way the ClickHouse audit decodes them (``sinks/clickhouse/audit.py``: events, inbox, sync,
live-delivery, push-job and push-outcome records, dead letters by their source's format), so a
record that does not decode shows here with the same error code as in the audit.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from confluent_kafka import (
    OFFSET_END,
    Consumer,
    ConsumerGroupTopicPartitions,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from core.connections import kafka_config
from core.settings import Settings
from pipelines.processes import consumer_groups
from schemas.topics import Topic, TopicCatalog
from sinks.clickhouse.audit import AuditDecoder, Audited, AuditRow, KafkaRecord

#: How long a poll waits before the loop checks for the end or a stop request.
_POLL_SECONDS = 0.2
_SUMMARY_CHARS = 60


class UnknownTopicError(ValueError):
    """A name that is no topic of the catalog, or a catalog topic missing on the cluster."""


# ---------------------------------------------------------------------------------------------
# Resolving names
# ---------------------------------------------------------------------------------------------


def resolve_topics(catalog: TopicCatalog, names: Sequence[str]) -> list[Topic]:
    """The catalog topics named by logical (``im.messages.in``) or full name; all when none."""
    if not names:
        return list(catalog)
    found = []
    for name in names:
        matches = [topic for topic in catalog if name in (topic.name, topic.logical_name)]
        if not matches:
            logical = [topic.logical_name for topic in catalog.sources()]
            raise UnknownTopicError(
                f"{name!r} is not a topic of the catalog (one of {', '.join(logical)}, their "
                "'.dlq' dead-letter topics, or their full names)"
            )
        found.append(matches[0])
    return found


def _probe(settings: Settings, **overrides: Any) -> Consumer:
    """A consumer that joins no group and commits nothing (the group id is never used)."""
    return Consumer(
        kafka_config(
            settings,
            **{
                "group.id": f"imstream-topics-probe-{uuid.uuid4().hex[:12]}",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "isolation.level": "read_committed",
                "enable.partition.eof": True,
                **overrides,
            },
        )
    )


def _partitions(consumer: Consumer, topic: Topic, timeout: float) -> list[int]:
    """The topic's partition ids on the cluster; raises ``KafkaException`` when Kafka does not
    answer and ``UnknownTopicError`` when the topic is not there."""
    metadata = consumer.list_topics(topic.name, timeout=timeout).topics.get(topic.name)
    if metadata is None or metadata.error is not None or not metadata.partitions:
        raise UnknownTopicError(
            f"{topic.name} is in the catalog but not on the cluster: run `imstream topics apply`"
        )
    return sorted(metadata.partitions)


# ---------------------------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PartitionOffsets:
    partition: int
    low: int
    high: int

    @property
    def records(self) -> int:
        """Records retained (offsets between the watermarks; transaction markers count too)."""
        return self.high - self.low


@dataclass(frozen=True, slots=True)
class PartitionLag:
    partition: int
    committed: int | None
    """The group's committed offset; ``None`` when it committed none on this partition."""
    lag: int


@dataclass(frozen=True, slots=True)
class GroupLag:
    """One process kind's consumer group on one topic."""

    process: str
    group: str
    partitions: tuple[PartitionLag, ...]

    @property
    def lag(self) -> int:
        return sum(partition.lag for partition in self.partitions)


@dataclass(frozen=True, slots=True)
class TopicInspection:
    topic: Topic
    partitions: tuple[PartitionOffsets, ...]
    groups: tuple[GroupLag, ...]

    @property
    def records(self) -> int:
        return sum(partition.records for partition in self.partitions)

    def as_json(self) -> dict[str, Any]:
        return {
            "topic": self.topic.name,
            "logical_name": self.topic.logical_name,
            "key": self.topic.key.value,
            "records": self.records,
            "partitions": [
                {"partition": p.partition, "low": p.low, "high": p.high, "records": p.records}
                for p in self.partitions
            ],
            "groups": [
                {
                    "process": group.process,
                    "group": group.group,
                    "lag": group.lag,
                    "partitions": [
                        {"partition": p.partition, "committed": p.committed, "lag": p.lag}
                        for p in group.partitions
                    ],
                }
                for group in self.groups
            ],
        }


def partition_lag(offsets: PartitionOffsets, committed: int | None) -> int:
    """Records the group has still to read, as ``imstream status`` counts them: from the low
    watermark when it committed nothing, and a single record behind counts as caught up (on a
    topic written in transactions it is the commit marker, which no consumer receives)."""
    behind = max(0, offsets.high - (committed if committed is not None else offsets.low))
    return 0 if behind == 1 else behind


def inspect_topics(
    settings: Settings, topics: Sequence[Topic], *, timeout: float = 10.0
) -> list[TopicInspection]:
    """Watermarks per partition and, for every process kind's group that reads the topic
    (``pipelines.processes.consumer_groups``), its committed offset and lag per partition."""
    readers = [
        (process, group, set(names))
        for process, groups in consumer_groups(settings).items()
        for group, names in groups.items()
    ]
    admin = AdminClient(kafka_config(settings))
    consumer = _probe(settings)
    try:
        result = []
        for topic in topics:
            offsets = tuple(
                PartitionOffsets(p, *_watermarks(consumer, topic.name, p, timeout))
                for p in _partitions(consumer, topic, timeout)
            )
            groups = tuple(
                _group_lag(
                    admin,
                    process=process,
                    group=group,
                    topic=topic,
                    offsets=offsets,
                    timeout=timeout,
                )
                for process, group, names in readers
                if topic.name in names
            )
            result.append(TopicInspection(topic, offsets, groups))
        return result
    finally:
        consumer.close()


def _watermarks(consumer: Consumer, topic: str, partition: int, timeout: float) -> tuple[int, int]:
    low, high = consumer.get_watermark_offsets(
        TopicPartition(topic, partition), timeout=timeout, cached=False
    )
    return int(low), int(high)


def _group_lag(
    admin: AdminClient,
    *,
    process: str,
    group: str,
    topic: Topic,
    offsets: Sequence[PartitionOffsets],
    timeout: float,
) -> GroupLag:
    request = [
        ConsumerGroupTopicPartitions(
            group, [TopicPartition(topic.name, o.partition) for o in offsets]
        )
    ]
    answer = admin.list_consumer_group_offsets(request)[group].result(timeout=timeout)
    committed = {tp.partition: tp.offset for tp in answer.topic_partitions if tp.offset >= 0}
    return GroupLag(
        process=process,
        group=group,
        partitions=tuple(
            PartitionLag(
                o.partition,
                committed.get(o.partition),
                partition_lag(o, committed.get(o.partition)),
            )
            for o in offsets
        ),
    )


# ---------------------------------------------------------------------------------------------
# Decoded records (tail and find)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Shown:
    """One record as the operator sees it: where it is, its audit facts, its JSON."""

    audited: Audited

    @property
    def row(self) -> AuditRow:
        return self.audited.row

    @property
    def timestamp(self) -> datetime:
        return self.row.record_timestamp

    @property
    def event_type(self) -> str:
        return self.row.event_type

    @property
    def undecodable(self) -> bool:
        return self.audited.poison is not None

    def value(self) -> Any:
        """The record's value as JSON, or its text when it is no JSON at all."""
        raw = self.row.raw
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode("utf-8", errors="replace")

    def event(self) -> dict[str, Any] | None:
        """The event the record is or carries (records wrap one under ``event``)."""
        value = self.value()
        if not isinstance(value, dict):
            return None
        inner = value.get("event", value)
        return inner if isinstance(inner, dict) else None

    def line(self) -> str:
        row = self.row
        key = row.record_key.decode("utf-8", errors="replace") if row.record_key else "-"
        stamp = self.timestamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return "  ".join(
            (
                stamp,
                f"{row.partition}@{row.offset}",
                key,
                row.event_type,
                f"tenant={row.tenant_id or '-'}",
                f"conversation={row.conversation_id or '-'}",
                f"user={row.user_id or '-'}",
                self.summary(),
            )
        ).rstrip()

    def summary(self) -> str:
        """A short description: the error for an undecodable record, else the positions and the
        message text or the payload's other scalar fields."""
        row = self.row
        if self.audited.poison is not None:
            return f"[{self.audited.poison.code}] {self.audited.poison.message}"[:120]
        parts = []
        if row.conversation_seq is not None:
            parts.append(f"seq={row.conversation_seq}")
        if row.sync_id is not None:
            parts.append(f"sync={row.sync_id}")
        value = self.value()
        event = self.event() or {}
        payload = event.get("payload", value if isinstance(value, dict) else {})
        if isinstance(payload, dict):
            body = payload.get("body")
            if isinstance(body, dict):
                text = body.get("text")
                parts.append(
                    json.dumps(_clip(text), ensure_ascii=False) if text else body.get("kind", "")
                )
            shown = {
                "conversation_id",
                "user_id",
                "tenant_id",
                "conversation_seq",
                "body",
                "sync_id",
            }
            for name, item in payload.items():
                if name not in shown and isinstance(item, str | int | float | bool):
                    parts.append(f"{name}={_clip(str(item), 24)}")
        return _clip(" ".join(part for part in parts if part), 100)

    def as_json(self) -> dict[str, Any]:
        row = self.row
        poison = self.audited.poison
        return {
            "topic": row.topic,
            "partition": row.partition,
            "offset": row.offset,
            "timestamp": self.timestamp.isoformat().replace("+00:00", "Z"),
            "key": row.record_key.decode("utf-8", errors="replace") if row.record_key else None,
            "type": row.event_type,
            "event_id": row.event_id,
            "tenant_id": row.tenant_id or None,
            "conversation_id": row.conversation_id,
            "user_id": row.user_id,
            "error": None if poison is None else {"code": poison.code, "message": poison.message},
            "value": self.value(),
        }


def _clip(text: str, limit: int = _SUMMARY_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _record(message: Message) -> KafkaRecord:
    kind, stamp = message.timestamp()
    raw_headers = message.headers() or []
    pairs = list(raw_headers.items()) if isinstance(raw_headers, dict) else list(raw_headers)
    return KafkaRecord(
        topic=str(message.topic()),
        partition=int(message.partition() or 0),
        offset=int(message.offset() or 0),
        key=_bytes(message.key()),
        value=_bytes(message.value()),
        timestamp_ms=stamp if kind != 0 else None,
        headers=[(str(name), _bytes(value)) for name, value in pairs],
    )


def _bytes(value: str | bytes | None) -> bytes | None:
    return value.encode() if isinstance(value, str) else value


@dataclass(slots=True)
class Filters:
    """Which records ``tail`` shows: every given filter must match (types: any of them). An
    undecodable record has no tenant, conversation or user: only ``types`` (``undecodable``)
    selects it when a filter is given."""

    tenant: str | None = None
    conversation: str | None = None
    user: str | None = None
    types: tuple[str, ...] = ()

    def match(self, shown: Shown) -> bool:
        row = shown.row
        return (
            (self.tenant is None or row.tenant_id == self.tenant)
            and (self.conversation is None or row.conversation_id == self.conversation)
            and (self.user is None or row.user_id == self.user)
            and (not self.types or row.event_type in self.types)
        )


def _read(
    settings: Settings,
    topic: Topic,
    starts: dict[int, int],
    *,
    follow: bool,
    stop: threading.Event,
) -> Iterator[Message | None]:
    """The records of ``topic`` from ``starts`` (partition → offset), then ``None`` once every
    partition has reached its end; when following it goes on until ``stop`` is set."""
    consumer = _probe(settings)
    try:
        consumer.assign([TopicPartition(topic.name, p, o) for p, o in starts.items()])
        open_partitions = set(starts)
        if not open_partitions:
            yield None
        while not stop.is_set() and (follow or open_partitions):
            message = consumer.poll(_POLL_SECONDS)
            if message is None:
                continue
            error = message.error()
            if error is None:
                yield message
            elif error.code() == KafkaError._PARTITION_EOF:
                if message.partition() in open_partitions:
                    open_partitions.discard(int(message.partition() or 0))
                    if not open_partitions:
                        yield None
            else:
                raise KafkaException(error)
    finally:
        consumer.close()


def tail(
    settings: Settings,
    catalog: TopicCatalog,
    topic: Topic,
    *,
    last: int = 20,
    from_beginning: bool = False,
    follow: bool = False,
    filters: Filters | None = None,
    stop: threading.Event | None = None,
    timeout: float = 10.0,
) -> Iterator[Shown]:
    """The topic's records decoded: the last ``last`` offsets of every partition (or all from
    the beginning) merged by record time, then, when following, each new record as it comes
    until ``stop`` is set. ``last`` counts offsets: filtered-out records and transaction markers
    take places too."""
    filters = filters or Filters()
    decoder = AuditDecoder(catalog)
    probe = _probe(settings)
    try:
        starts = {}
        for partition in _partitions(probe, topic, timeout):
            low, high = _watermarks(probe, topic.name, partition, timeout)
            start = low if from_beginning else max(low, high - last)
            if start < high or follow:
                starts[partition] = start
    finally:
        probe.close()
    backlog: list[Shown] | None = []
    for message in _read(settings, topic, starts, follow=follow, stop=stop or threading.Event()):
        if message is None:
            assert backlog is not None
            backlog.sort(key=lambda s: (s.timestamp, s.row.partition, s.row.offset))
            yield from backlog
            backlog = None
            continue
        shown = Shown(decoder.audit(_record(message)))
        if not filters.match(shown):
            continue
        if backlog is None:
            yield shown
        else:
            backlog.append(shown)


# ---------------------------------------------------------------------------------------------
# find
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FindProgress:
    scanned: int
    elapsed: float

    @property
    def rate(self) -> float:
        return self.scanned / self.elapsed if self.elapsed > 0 else 0.0


def matches_id(shown: Shown, wanted: str, sender: str | None) -> bool:
    """The record's event has ``event_id`` ``wanted``, or is a message with ``client_msg_id``
    ``wanted`` (sent by ``sender`` when one is given)."""
    if shown.undecodable:
        return False
    event = shown.event() or {}
    actor = event.get("actor") or {}
    if sender is not None and actor.get("user_id") != sender:
        return False
    if event.get("event_id") == wanted or shown.row.event_id == wanted:
        return True
    payload = event.get("payload") or {}
    return isinstance(payload, dict) and payload.get("client_msg_id") == wanted


def find(
    settings: Settings,
    catalog: TopicCatalog,
    topics: Sequence[Topic],
    wanted: str,
    *,
    since: datetime,
    sender: str | None = None,
    progress: Callable[[FindProgress], None] | None = None,
    progress_every: float = 1.0,
    timeout: float = 10.0,
) -> Iterator[Shown]:
    """Every record of ``topics`` written since ``since`` (record time, through
    ``offsets_for_times``) whose event is ``wanted`` by event id or client message id.

    ``progress`` is called about every ``progress_every`` seconds with the records scanned so
    far, and once at the end."""
    decoder = AuditDecoder(catalog)
    needle = wanted.encode()
    scanned = 0
    started = time.monotonic()
    last_report = started
    since_ms = int(since.timestamp() * 1000)
    for topic in topics:
        probe = _probe(settings)
        try:
            partitions = _partitions(probe, topic, timeout)
            request = [TopicPartition(topic.name, p, since_ms) for p in partitions]
            found = probe.offsets_for_times(request, timeout=timeout)
        finally:
            probe.close()
        # Offset -1 (OFFSET_END): nothing on that partition is as recent as ``since``.
        starts = {
            tp.partition: tp.offset for tp in found if tp.offset != OFFSET_END and tp.offset >= 0
        }
        if not starts:
            continue
        for message in _read(settings, topic, starts, follow=False, stop=threading.Event()):
            now = time.monotonic()
            if progress is not None and now - last_report >= progress_every:
                last_report = now
                progress(FindProgress(scanned, now - started))
            if message is None:
                break
            scanned += 1
            value = message.value()
            if not value or needle not in value:  # most records: no decoding at all
                continue
            shown = Shown(decoder.audit(_record(message)))
            if matches_id(shown, wanted, sender):
                yield shown
    if progress is not None:
        progress(FindProgress(scanned, time.monotonic() - started))
