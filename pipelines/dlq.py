"""``imstream dlq``: list, show and redrive the dead-letter topics.

Every stage that rejects a record writes it, unchanged, to its source's dead-letter topic
(``<topic>.dlq``) with the reason in ``imstream.error.*`` / ``imstream.source.*`` headers
(``streams.processors.dead_letter``). ``list`` counts them by reason code, ``show`` decodes them,
``redrive`` re-publishes them into their source once the cause is fixed.

Redrive delivers each dead letter to its source at most once per cursor, and — with the stages
downstream idempotent — exactly once in the stores:

* The cursor is the committed offset of the consumer group ``<prefix>imstream-dlq-redrive`` on
  the dead-letter topic, committed after *each* record Kafka acknowledged (idempotent producer,
  ``acks=all``). An interrupted redrive (Ctrl-C, ``limit``, a crash) resumes after the last
  acknowledged record; a second run finds nothing new.
* A filter (``--code``, ``--since``) leaves records behind, so the committed offset can only move
  up to the first record left behind; the records redriven above it are kept in the commit's
  metadata (offset ranges), and skipped by every later run. A record whose headers name no
  valid source is never redrivable and the cursor passes it.
* A crash between Kafka's acknowledgement and the commit re-publishes that one record on the next
  run. For a message that copy is harmless — the conversation processor dedupes ``message.sent``
  by ``(sender, client_msg_id)`` and the sinks write by event id — so a redriven message lands
  exactly once. Other commands are decided again against the state (most are then refused as
  no-ops); docs/operations.md has the details.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import FrameType
from typing import Annotated, Any

import typer
from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from pydantic import JsonValue

from core.connections import acknowledged_producer, kafka_consumer_config
from core.settings import Settings
from core.timeargs import parse_moment
from pipelines.console import StatusLine, load_settings, table_text
from pipelines.operator_actions import (
    OperatorAuditError,
    operator_name,
    record_operator_action,
)
from schemas.errors import CodedError
from schemas.events import OperatorOutcome
from schemas.topics import Topic, TopicCatalog, topic_catalog
from sinks.clickhouse.audit import (
    ERROR_CODE_HEADER,
    ERROR_MESSAGE_HEADER,
    SOURCE_OFFSET_HEADER,
    SOURCE_PARTITION_HEADER,
    SOURCE_TOPIC_HEADER,
)

#: The consumer group whose committed offsets are the redrive cursor (after the topic prefix).
REDRIVE_GROUP = "imstream-dlq-redrive"
#: The header a redriven record carries: where it was dead-lettered (``topic/partition/offset``).
REDRIVEN_FROM_HEADER = "imstream.redrive.from"
REDRIVE_COMMAND = "dlq redrive"
#: The logger librdkafka's lines go to (``core.connections.kafka_config``).
KAFKA_LOGGER = "imstream.kafka"
AUDIT_TOPIC_MISSING = "audit-topic-missing"
#: Code shown for a dead letter without an ``imstream.error.code`` header.
NO_CODE = "(none)"
_CURSOR_VERSION = "v1:"
#: Kafka refuses commit metadata over ``offset.metadata.max.bytes`` (4096 by default).
_MAX_CURSOR_METADATA = 3500


class DlqError(CodedError[str]):
    """An operator-caused problem, with a stable code for the CLI's message."""

    bracketed = False


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One record of a dead-letter topic, its reason headers decoded."""

    topic: str
    partition: int
    offset: int
    timestamp: datetime | None
    key: bytes | None
    value: bytes | None
    headers: dict[str, str]

    @classmethod
    def of(cls, message: Message) -> DeadLetter:
        kind, millis = message.timestamp()
        timestamp = datetime.fromtimestamp(millis / 1000, tz=UTC) if kind and millis >= 0 else None
        headers: dict[str, str] = {}
        raw_headers = message.headers() or []
        # Consumed headers are a list of pairs; the stub also allows a dict (what produce takes).
        pairs = raw_headers.items() if isinstance(raw_headers, dict) else raw_headers
        for name, value in pairs:
            if isinstance(value, bytes):
                headers[name] = value.decode("utf-8", errors="replace")
            elif value is not None:
                headers[name] = str(value)
        return cls(
            topic=message.topic() or "",
            partition=message.partition() or 0,
            offset=message.offset() or 0,
            timestamp=timestamp,
            key=message.key(),
            value=message.value(),
            headers=headers,
        )

    @property
    def code(self) -> str:
        return self.headers.get(ERROR_CODE_HEADER, NO_CODE)

    @property
    def message(self) -> str | None:
        return self.headers.get(ERROR_MESSAGE_HEADER)

    @property
    def source_topic(self) -> str | None:
        return self.headers.get(SOURCE_TOPIC_HEADER)

    @property
    def source_partition(self) -> int | None:
        return _int(self.headers.get(SOURCE_PARTITION_HEADER))

    @property
    def source_offset(self) -> int | None:
        return _int(self.headers.get(SOURCE_OFFSET_HEADER))


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class DlqSummary:
    """What one dead-letter topic holds."""

    topic: Topic
    exists: bool
    count: int = 0
    oldest: datetime | None = None
    newest: datetime | None = None
    by_code: dict[str, int] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "topic": self.topic.name,
            "source": self.topic.name.removesuffix(".dlq"),
            "exists": self.exists,
            "count": self.count,
            "oldest": self.oldest.isoformat() if self.oldest else None,
            "newest": self.newest.isoformat() if self.newest else None,
            "by_code": self.by_code,
        }


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def resolve_dead_letter(catalog: TopicCatalog, name: str) -> Topic:
    """The dead-letter topic ``name`` means: its full or logical name, or its source's."""
    for topic in catalog.dead_letters:
        if name in (topic.name, topic.logical_name):
            return topic
    for source in catalog.sources():
        if name in (source.name, source.logical_name) and source.dead_letter is not None:
            return catalog.by_name(source.dead_letter)
    known = ", ".join(topic.name for topic in catalog.dead_letters)
    raise DlqError(
        "topic-unknown", f"{name!r} is not a dead-letter topic of the catalog; known: {known}"
    )


def source_of(catalog: TopicCatalog, dead_letter: Topic) -> Topic:
    """The source topic whose dead letters ``dead_letter`` holds."""
    for source in catalog.sources():
        if source.dead_letter == dead_letter.name:
            return source
    raise DlqError("topic-unknown", f"{dead_letter.name} is no topic's dead-letter topic")


def _consumer(settings: Settings, group_id: str) -> Consumer:
    return Consumer(kafka_consumer_config(settings, group_id, **{"enable.partition.eof": True}))


def _reader(settings: Settings) -> Consumer:
    """A consumer that only reads (assigned partitions, never commits: no group is created)."""
    return _consumer(settings, f"{settings.kafka.topic_prefix}imstream-dlq-reader")


def _partitions(consumer: Consumer, topic: str, timeout: float) -> list[int] | None:
    """The topic's partitions, ``None`` when it does not exist on the cluster."""
    try:
        metadata = consumer.list_topics(topic, timeout=timeout)
    except KafkaException as error:
        raise DlqError("kafka-unavailable", str(error)) from error
    described = metadata.topics.get(topic)
    if described is None or described.error is not None:
        if described is not None and described.error.code() not in (
            KafkaError.UNKNOWN_TOPIC_OR_PART,
            KafkaError._UNKNOWN_TOPIC,
        ):
            raise DlqError("kafka-unavailable", f"{topic}: {described.error.str()}")
        return None
    return sorted(described.partitions)


def _existing_partitions(consumer: Consumer, topic: Topic, timeout: float) -> list[int]:
    partitions = _partitions(consumer, topic.name, timeout)
    if partitions is None:
        raise DlqError(
            "topic-missing",
            f"{topic.name} does not exist on the cluster: run `imstream topics apply`",
        )
    return partitions


@dataclass(slots=True)
class _Scan:
    """Where a scan of each partition ended: every offset below it was read (or is a gap)."""

    ends: dict[int, int] = field(default_factory=dict)


def _scan(
    consumer: Consumer,
    topic: str,
    partitions: Sequence[int],
    timeout: float,
    *,
    start: dict[int, int] | None = None,
    scan: _Scan | None = None,
) -> Iterator[DeadLetter]:
    """Every record of ``topic`` from ``start`` (default: the beginning) to the end it has now
    (the last stable offset: an open transaction's records are not read)."""
    scan = scan if scan is not None else _Scan()
    assignments = []
    ends: dict[int, int] = {}
    for partition in partitions:
        try:
            low, high = consumer.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=timeout
            )
        except KafkaException as error:
            raise DlqError("kafka-unavailable", str(error)) from error
        begin = max(low, (start or {}).get(partition, low))
        scan.ends[partition] = begin
        if begin < high:
            ends[partition] = high
            assignments.append(TopicPartition(topic, partition, begin))
    if not assignments:
        return
    consumer.assign(assignments)
    last_progress = time.monotonic()
    while ends:
        message = consumer.poll(min(timeout, 1.0))
        if message is None:
            if time.monotonic() - last_progress > timeout:
                raise DlqError(
                    "kafka-unavailable", f"{topic}: no records for {timeout:g} s before its end"
                )
            continue
        last_progress = time.monotonic()
        partition = message.partition() or 0
        failure = message.error()
        if failure is not None:
            if failure.code() == KafkaError._PARTITION_EOF:
                if partition in ends:
                    scan.ends[partition] = max(scan.ends[partition], message.offset() or 0)
                    del ends[partition]
                continue
            raise DlqError("kafka-unavailable", f"{topic}: {failure.str()}")
        offset = message.offset() or 0
        if partition not in ends or offset >= ends[partition]:
            ends.pop(partition, None)
            continue
        scan.ends[partition] = offset + 1
        yield DeadLetter.of(message)
        if offset + 1 >= ends[partition]:
            del ends[partition]
    consumer.unassign()


def summarize(settings: Settings, *, timeout: float = 30.0) -> list[DlqSummary]:
    """Every dead-letter topic of the catalog: count, oldest and newest, counts by code."""
    catalog = topic_catalog(settings)
    consumer = _reader(settings)
    try:
        summaries = []
        for topic in catalog.dead_letters:
            partitions = _partitions(consumer, topic.name, timeout)
            if partitions is None:
                summaries.append(DlqSummary(topic, exists=False))
                continue
            codes: Counter[str] = Counter()
            times = []
            for record in _scan(consumer, topic.name, partitions, timeout):
                codes[record.code] += 1
                if record.timestamp is not None:
                    times.append(record.timestamp)
            summaries.append(
                DlqSummary(
                    topic,
                    exists=True,
                    count=codes.total(),
                    oldest=min(times, default=None),
                    newest=max(times, default=None),
                    by_code=dict(sorted(codes.items())),
                )
            )
        return summaries
    finally:
        consumer.close()


def read_dead_letters(
    settings: Settings,
    topic_name: str,
    *,
    code: str | None = None,
    limit: int | None = 20,
    start: tuple[int, int] | None = None,
    timeout: float = 30.0,
) -> list[DeadLetter]:
    """Up to ``limit`` dead letters of a topic with ``code`` (any if ``None``), from ``start``
    (``(partition, offset)``: that partition only, from that offset)."""
    topic = resolve_dead_letter(topic_catalog(settings), topic_name)
    consumer = _reader(settings)
    try:
        partitions = _existing_partitions(consumer, topic, timeout)
        begin: dict[int, int] = {}
        if start is not None:
            if start[0] not in partitions:
                raise DlqError(
                    "partition-unknown", f"{topic.name} has no partition {start[0]} ({partitions})"
                )
            partitions, begin = [start[0]], {start[0]: start[1]}
        found = []
        for record in _scan(consumer, topic.name, partitions, timeout, start=begin):
            if code is not None and record.code != code:
                continue
            found.append(record)
            if limit is not None and len(found) >= limit:
                break
        return found
    finally:
        consumer.close()


# ---------------------------------------------------------------------------------------------
# Redrive
# ---------------------------------------------------------------------------------------------


def _encode_offsets(offsets: set[int]) -> str:
    """Offsets as ranges: ``{3, 4, 5, 9}`` → ``3-5,9``."""
    parts: list[str] = []
    ordered = sorted(offsets)
    index = 0
    while index < len(ordered):
        first = last = ordered[index]
        while index + 1 < len(ordered) and ordered[index + 1] == last + 1:
            index += 1
            last = ordered[index]
        parts.append(str(first) if first == last else f"{first}-{last}")
        index += 1
    return _CURSOR_VERSION + ",".join(parts)


def _decode_offsets(metadata: str | None) -> set[int]:
    if not metadata or not metadata.startswith(_CURSOR_VERSION):
        return set()
    offsets: set[int] = set()
    for part in metadata.removeprefix(_CURSOR_VERSION).split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        offsets.update(range(int(first), int(last or first) + 1))
    return offsets


@dataclass(slots=True)
class _Cursor:
    """One partition's redrive cursor: every record below ``position`` is settled, and so are
    the ``done`` offsets above it."""

    position: int
    done: set[int]
    open_offsets: list[int] = field(default_factory=list)
    """Records at or above ``position`` that are not settled (left behind by a filter)."""
    scanned_to: int = 0

    def settle(self, offset: int) -> None:
        self.done.add(offset)

    def committed(self) -> tuple[int, set[int]]:
        """The offset to commit and the done offsets above it."""
        still_open = [o for o in self.open_offsets if o not in self.done]
        position = min(still_open, default=self.scanned_to)
        position = max(position, self.position)
        return position, {o for o in self.done if o >= position}


@dataclass(frozen=True, slots=True)
class RedriveProgress:
    done: int
    total: int
    elapsed: float

    @property
    def rate(self) -> float:
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        return (self.total - self.done) / self.rate if self.rate > 0 else None


@dataclass(slots=True)
class RedriveResult:
    """What a redrive found and did."""

    topic: str
    source: str
    dry_run: bool
    scanned: int = 0
    matched: int = 0
    """Records that pass the filters and were not redriven before."""
    redriven: int = 0
    already_redriven: int = 0
    filtered_out: int = 0
    unredrivable: int = 0
    """Records whose headers name no valid source (never redrivable; the cursor passes them)."""
    planned: list[DeadLetter] = field(default_factory=list)
    outcome: OperatorOutcome = OperatorOutcome.SUCCEEDED
    error: str | None = None
    elapsed: float = 0.0

    def counts(self) -> dict[str, int]:
        return {
            "scanned": self.scanned,
            "matched": self.matched,
            "redriven": self.redriven,
            "already_redriven": self.already_redriven,
            "filtered_out": self.filtered_out,
            "unredrivable": self.unredrivable,
        }


def parse_since(text: str, *, now: datetime | None = None, option: str = "--since") -> datetime:
    """``--since`` (or ``option``): the CLI's time argument (``core/timeargs.py``), an age like
    ``90m``, ``6h``, ``2d`` or an ISO time, UTC when it has no offset."""
    return parse_moment(
        text,
        option,
        relative_to=now or datetime.now(UTC),
        invalid=lambda message: DlqError("since-invalid", message),
    )


def redrive(
    settings: Settings,
    topic_name: str,
    *,
    code: str | None = None,
    since: datetime | None = None,
    dry_run: bool = False,
    rate: float | None = None,
    limit: int | None = None,
    stop: threading.Event | None = None,
    progress: Callable[[RedriveProgress], None] | None = None,
    operator: str | None = None,
    timeout: float = 30.0,
) -> RedriveResult:
    """Re-publish the dead letters of ``topic_name`` matching ``code`` and ``since`` into their
    source topic, at most ``rate`` per second, at most ``limit`` in this run, stopping early when
    ``stop`` is set; see the module docstring for the cursor. Not a dry run, it ends by writing
    an ``operator.action`` event, whatever the outcome."""
    catalog = topic_catalog(settings)
    topic = resolve_dead_letter(catalog, topic_name)
    source = source_of(catalog, topic)
    result = RedriveResult(topic=topic.name, source=source.name, dry_run=dry_run)
    started = time.monotonic()
    audited = True
    try:
        _redrive(
            settings,
            topic,
            source=source,
            result=result,
            code=code,
            since=since,
            rate=rate,
            limit=limit,
            stop=stop,
            progress=progress,
            timeout=timeout,
        )
    except DlqError as error:
        result.outcome, result.error = OperatorOutcome.FAILED, f"[{error.code}] {error.message}"
        audited = error.code != AUDIT_TOPIC_MISSING
        raise
    finally:
        result.elapsed = time.monotonic() - started
        if not dry_run and audited:
            arguments: dict[str, JsonValue] = {
                "topic": topic.name,
                "code": code,
                "since": since.isoformat() if since else None,
                "rate": rate,
                "limit": limit,
            }
            try:
                record_operator_action(
                    settings,
                    operator=operator_name(operator),
                    command=REDRIVE_COMMAND,
                    arguments=arguments,
                    counts=result.counts(),
                    outcome=result.outcome,
                    error=result.error,
                    timeout=timeout,
                )
            except OperatorAuditError as error:
                if result.error is None:
                    raise DlqError(
                        "audit-failed", f"redrive done, but not audited: {error}"
                    ) from error
    return result


def _redrive(
    settings: Settings,
    topic: Topic,
    *,
    source: Topic,
    result: RedriveResult,
    code: str | None,
    since: datetime | None,
    rate: float | None,
    limit: int | None,
    stop: threading.Event | None,
    progress: Callable[[RedriveProgress], None] | None,
    timeout: float,
) -> None:
    consumer = _consumer(settings, f"{settings.kafka.topic_prefix}{REDRIVE_GROUP}")
    try:
        partitions = _existing_partitions(consumer, topic, timeout)
        source_partitions = _partitions(consumer, source.name, timeout)
        if source_partitions is None:
            raise DlqError(
                "topic-missing", f"{source.name} does not exist: run `imstream topics apply`"
            )
        audit = topic_catalog(settings).operator_actions
        if not result.dry_run and _partitions(consumer, audit.name, timeout) is None:
            # Checked first: a redrive must not run unaudited.
            raise DlqError(
                AUDIT_TOPIC_MISSING,
                f"{audit.name} (the operator-actions audit) does not exist: run "
                "`imstream topics apply`",
            )
        cursors = _read_cursors(consumer, topic.name, partitions, timeout)
        scan = _Scan()
        start = {partition: cursor.position for partition, cursor in cursors.items()}
        for record in _scan(consumer, topic.name, partitions, timeout, start=start, scan=scan):
            result.scanned += 1
            cursor = cursors[record.partition]
            if record.offset in cursor.done:
                result.already_redriven += 1
            elif (
                record.source_topic != source.name
                or record.value is None
                or not _valid_partition(record.source_partition, source_partitions)
            ):
                result.unredrivable += 1
                cursor.settle(record.offset)
            elif (code is not None and record.code != code) or (
                since is not None and (record.timestamp is None or record.timestamp < since)
            ):
                result.filtered_out += 1
                cursor.open_offsets.append(record.offset)
            else:
                cursor.open_offsets.append(record.offset)
                result.planned.append(record)
        for partition, cursor in cursors.items():
            cursor.scanned_to = scan.ends.get(partition, cursor.position)
        result.matched = len(result.planned)
        if result.dry_run:
            return
        _publish(
            settings,
            consumer,
            topic=topic,
            cursors=cursors,
            result=result,
            rate=rate,
            limit=limit,
            stop=stop,
            progress=progress,
            timeout=timeout,
        )
    finally:
        consumer.close()


def _valid_partition(partition: int | None, partitions: Sequence[int]) -> bool:
    return partition is None or partition in partitions


def _read_cursors(
    consumer: Consumer, topic: str, partitions: Sequence[int], timeout: float
) -> dict[int, _Cursor]:
    try:
        committed = consumer.committed(
            [TopicPartition(topic, partition) for partition in partitions], timeout=timeout
        )
    except KafkaException as error:
        raise DlqError("kafka-unavailable", str(error)) from error
    cursors = {}
    for position in committed:
        offset = position.offset if position.offset >= 0 else 0
        cursors[position.partition] = _Cursor(offset, _decode_offsets(position.metadata))
    return cursors


def _publish(
    settings: Settings,
    consumer: Consumer,
    *,
    topic: Topic,
    cursors: dict[int, _Cursor],
    result: RedriveResult,
    rate: float | None,
    limit: int | None,
    stop: threading.Event | None,
    progress: Callable[[RedriveProgress], None] | None,
    timeout: float,
) -> None:
    producer = acknowledged_producer(settings, timeout=timeout)
    # Settle what needs no publishing (records the cursor passes) before the first record.
    _commit(consumer, topic.name, cursors, timeout)
    stop = stop or threading.Event()
    started = time.monotonic()
    total = len(result.planned) if limit is None else min(limit, len(result.planned))
    for index, record in enumerate(result.planned[:total]):
        if rate:
            delay = started + index / rate - time.monotonic()
            if delay > 0 and stop.wait(delay):
                break
        if stop.is_set():
            break
        _produce_one(producer, record, timeout)
        cursors[record.partition].settle(record.offset)
        _commit(consumer, topic.name, cursors, timeout)
        result.redriven += 1
        if progress is not None:
            progress(RedriveProgress(result.redriven, total, time.monotonic() - started))
    if result.redriven < len(result.planned):
        result.outcome = OperatorOutcome.INTERRUPTED


def _produce_one(producer: Producer, record: DeadLetter, timeout: float) -> None:
    failures: list[KafkaError] = []

    def delivered(failure: KafkaError | None, _message: Message) -> None:
        if failure is not None:
            failures.append(failure)

    headers: list[tuple[str, str | bytes | None]] = [
        (REDRIVEN_FROM_HEADER, f"{record.topic}/{record.partition}/{record.offset}".encode())
    ]
    target = record.source_topic or ""
    try:
        if record.source_partition is not None:
            producer.produce(
                target,
                key=record.key,
                value=record.value,
                partition=record.source_partition,
                headers=headers,
                on_delivery=delivered,
            )
        else:
            producer.produce(
                target, key=record.key, value=record.value, headers=headers, on_delivery=delivered
            )
    except KafkaException as error:
        raise DlqError("kafka-unavailable", f"{target}: {error}") from error
    if producer.flush(timeout) > 0:
        raise DlqError("kafka-unavailable", f"{target}: not acknowledged within {timeout:g} s")
    if failures:
        raise DlqError("redrive-refused", f"{target}: {failures[0].str()}")


def _commit(consumer: Consumer, topic: str, cursors: dict[int, _Cursor], timeout: float) -> None:
    offsets = []
    for partition, cursor in cursors.items():
        position, done = cursor.committed()
        metadata = _encode_offsets(done)
        if len(metadata) > _MAX_CURSOR_METADATA:
            raise DlqError(
                "cursor-full",
                "too many records redriven past the ones a filter left behind; redrive those "
                "(or run without --code/--since) to move the cursor on",
            )
        offsets.append(TopicPartition(topic, partition, position, metadata))
    try:
        consumer.commit(offsets=offsets, asynchronous=False)
    except KafkaException as error:
        raise DlqError("kafka-unavailable", f"committing the redrive cursor: {error}") from error


# ---------------------------------------------------------------------------------------------
# Display
# ---------------------------------------------------------------------------------------------


def shown_bytes(data: bytes | None, width: int) -> str:
    """A key or value for people: compact JSON when it parses, else text, else hex; truncated."""
    if data is None:
        return "(null)"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        hexed = data[: width // 2].hex()
        return f"hex:{hexed}" + (f"… ({len(data)} bytes)" if len(data) * 2 > width else "")
    try:
        text = json.dumps(json.loads(text), ensure_ascii=False, separators=(",", ":"))
    except ValueError:
        text = "raw:" + text
    return text if len(text) <= width else text[:width] + f"… ({len(data)} bytes)"


def dead_letter_json(record: DeadLetter) -> dict[str, Any]:
    value: Any
    try:
        value = json.loads(record.value) if record.value is not None else None
    except ValueError:
        value = {"hex": record.value.hex()} if record.value is not None else None
    return {
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "timestamp": record.timestamp.isoformat() if record.timestamp else None,
        "code": record.code,
        "message": record.message,
        "source": {
            "topic": record.source_topic,
            "partition": record.source_partition,
            "offset": record.source_offset,
        },
        "key": record.key.decode("utf-8", errors="replace") if record.key is not None else None,
        "value": value,
        "headers": record.headers,
    }


# ---------------------------------------------------------------------------------------------
# The CLI
# ---------------------------------------------------------------------------------------------

dlq_app = typer.Typer(
    help="The dead-letter topics (<topic>.dlq): count, inspect and redrive what the stages "
    "rejected, with the reason headers decoded.",
    no_args_is_help=True,
)

Timeout = Annotated[
    float, typer.Option("--timeout", help="seconds to wait for Kafka before giving up")
]
TopicArgument = Annotated[
    str,
    typer.Argument(
        help="the dead-letter topic: its full or catalog name (im.messages.in.dlq), or its "
        "source's (im.messages.in)",
        show_default=False,
    ),
]
CodeOption = Annotated[
    str | None, typer.Option("--code", help="only dead letters with this imstream.error.code")
]


def _cli_settings() -> Settings:
    """The settings; librdkafka's own log lines are silenced, the commands report its errors
    themselves (an unreachable broker would otherwise print a line per retry)."""
    logging.getLogger(KAFKA_LOGGER).setLevel(logging.CRITICAL)
    return load_settings()


def _fail(settings: Settings, error: DlqError) -> typer.Exit:
    if error.code == "kafka-unavailable":
        typer.echo(
            f"error: [kafka-unavailable] {settings.kafka.bootstrap_servers}: {error.message}. "
            "Start the local stack with `imstream stack up`, or point "
            "IM_KAFKA__BOOTSTRAP_SERVERS at a cluster.",
            err=True,
        )
    else:
        typer.echo(f"error: [{error.code}] {error.message}", err=True)
    return typer.Exit(1)


def _time(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment is not None else "-"


@dlq_app.command("list")
def list_command(
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
    timeout: Timeout = 30.0,
) -> None:
    """Every dead-letter topic: how many records, the oldest and newest, counts by error code."""
    settings = _cli_settings()
    try:
        summaries = summarize(settings, timeout=timeout)
    except DlqError as error:
        raise _fail(settings, error) from error
    if as_json:
        typer.echo(json.dumps([summary.as_json() for summary in summaries], indent=2))
        return
    rows = [("TOPIC", "RECORDS", "OLDEST (UTC)", "NEWEST (UTC)", "BY CODE")]
    for summary in summaries:
        if not summary.exists:
            rows.append((summary.topic.name, "missing", "-", "-", "-"))
            continue
        codes = ", ".join(f"{code}={count}" for code, count in summary.by_code.items())
        rows.append(
            (
                summary.topic.name,
                str(summary.count),
                _time(summary.oldest),
                _time(summary.newest),
                codes or "-",
            )
        )
    typer.echo(table_text(rows[0], rows[1:]))
    total = sum(summary.count for summary in summaries)
    missing = sum(not summary.exists for summary in summaries)
    typer.echo(f"{total} dead letter(s) in {len(summaries) - missing} topic(s)")
    if missing:
        typer.echo(f"{missing} topic(s) missing: run `imstream topics apply`", err=True)


def _parse_position(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    match = re.fullmatch(r"(\d+):(\d+)", text.strip())
    if match is None:
        raise DlqError("offset-invalid", f"--offset {text!r}: give PARTITION:OFFSET, e.g. 0:120")
    return int(match.group(1)), int(match.group(2))


@dlq_app.command("show")
def show_command(  # noqa: PLR0917 - typer maps each parameter to an option
    topic: TopicArgument,
    code: CodeOption = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="show at most this many")] = 20,
    offset: Annotated[
        str | None,
        typer.Option(
            "--offset", help="start at PARTITION:OFFSET (e.g. 0:120) instead of the beginning"
        ),
    ] = None,
    width: Annotated[
        int,
        typer.Option("--width", min=16, help="truncate keys and values to this many characters"),
    ] = 400,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line")] = False,
    timeout: Timeout = 30.0,
) -> None:
    """Each dead letter with its reason decoded, its key and its value.

    The reason: code, message and where the record came from (source topic, partition, offset).
    Keys and values are shown as JSON when they parse, else as raw text or hex, truncated to
    --width."""
    settings = _cli_settings()
    try:
        records = read_dead_letters(
            settings, topic, code=code, limit=limit, start=_parse_position(offset), timeout=timeout
        )
    except DlqError as error:
        raise _fail(settings, error) from error
    for record in records:
        if as_json:
            typer.echo(json.dumps(dead_letter_json(record), ensure_ascii=False))
            continue
        source = (
            f"{record.source_topic}[{record.source_partition}]@{record.source_offset}"
            if record.source_topic
            else "-"
        )
        typer.echo(f"{record.topic}[{record.partition}]@{record.offset}  {_time(record.timestamp)}")
        typer.echo(f"  code:    {record.code}")
        typer.echo(f"  reason:  {record.message or '-'}")
        typer.echo(f"  source:  {source}")
        typer.echo(f"  key:     {shown_bytes(record.key, width)}")
        typer.echo(f"  value:   {shown_bytes(record.value, width)}")
    if not as_json:
        typer.echo(f"{len(records)} dead letter(s) shown")


def _format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


@dlq_app.command("redrive")
def redrive_command(  # noqa: PLR0917 - typer maps each parameter to an option
    topic: TopicArgument,
    code: CodeOption = None,
    since: Annotated[
        str | None,
        typer.Option(
            "--since",
            help="only dead letters written at or after this time: ISO 8601 (UTC unless it has "
            "an offset) or an age such as 90m, 6h, 2d",
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="only show what would be redriven; writes nothing")
    ] = False,
    rate: Annotated[
        float,
        typer.Option("--rate", min=0.0, help="at most this many records per second (0: no limit)"),
    ] = 100.0,
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="redrive at most this many in this run")
    ] = None,
    operator: Annotated[
        str | None,
        typer.Option("--operator", help="who runs this, for the audit (default: the login name)"),
    ] = None,
    timeout: Timeout = 30.0,
) -> None:
    """Re-publish dead letters into their source topic, once their cause is fixed.

    The source is the one the imstream.source.topic header names (its partition too). Safe to
    run twice: a cursor (consumer group <prefix>imstream-dlq-redrive, committed after each
    record Kafka acknowledged) remembers what was redriven, so an interrupted run resumes and a
    second run redrives nothing. Ends with an operator.action audit event (not on --dry-run).
    Exit code 3 when interrupted (Ctrl-C, --limit): run it again to continue."""
    settings = _cli_settings()
    stop = threading.Event()

    def interrupt(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    line = StatusLine()

    def show_progress(state: RedriveProgress) -> None:
        line.update(
            f"redriven {state.done}/{state.total}  {state.rate:.1f}/s  "
            f"ETA {_format_seconds(state.eta)}",
            final=state.done == state.total,
        )

    # Ctrl-C stops after the record in hand; as a library call off the main thread, no handler.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, interrupt) if main_thread else None
    try:
        result = redrive(
            settings,
            topic,
            code=code,
            since=parse_since(since) if since is not None else None,
            dry_run=dry_run,
            rate=rate or None,
            limit=limit,
            stop=stop,
            progress=show_progress,
            operator=operator,
            timeout=timeout,
        )
    except DlqError as error:
        line.close()  # before the error, which is no status line
        raise _fail(settings, error) from error
    finally:
        line.close()
        if main_thread:
            signal.signal(signal.SIGINT, previous)
    if dry_run:
        for record in result.planned:
            typer.echo(
                f"would redrive {record.topic}[{record.partition}]@{record.offset} "
                f"({record.code}) → {record.source_topic}[{record.source_partition}]  "
                f"key {shown_bytes(record.key, 60)}"
            )
    verb = "would redrive" if dry_run else "redriven"
    count = result.matched if dry_run else result.redriven
    typer.echo(
        f"{'dry run: ' if dry_run else ''}{result.topic} → {result.source}: {verb} {count} of "
        f"{result.matched} matching; {result.already_redriven} redriven before, "
        f"{result.filtered_out} filtered out, {result.unredrivable} unredrivable "
        f"({result.scanned} scanned, {result.elapsed:.1f} s)"
    )
    if result.outcome is OperatorOutcome.INTERRUPTED:
        typer.echo("interrupted: run the same command again to continue", err=True)
        raise typer.Exit(3)
