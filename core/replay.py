"""Replaying a range of a topic: read it again, once, into a sink or back into a topic.

A replay reads records ``[start, end)`` of each chosen partition of one topic and hands them,
in chunks, to a *target* (``ReplayTarget``): the CQL sink's writes (``pipelines.replay_targets``),
the ClickHouse audit's insert (run inside the process that owns ClickHouse:
``analytics.jobs``), or a producer into another topic. Whatever the target:

* **Resumable.** The cursor is the committed offset of the consumer group
  ``<prefix>imstream-replay.<run id>``, committed after each chunk the target applied; the
  commit's metadata keeps the range's end, so a resumed run stops where the first run would
  have. An interrupted replay (Ctrl-C, a crash, a stop request) resumes after its last applied
  chunk; a finished one has nothing left to do.
* **Safe to run twice.** The run id is derived from the command's arguments, so the same
  command run again finds its cursor at the end and replays nothing. A *new* run id (``--again``)
  replays the range again, and the stores stay unchanged because every target is idempotent:
  the CQL sink writes the same cells with the same timestamps, the audit keeps one row per
  ``(topic, partition, offset)``, and the stream processors dedupe what a topic target feeds them.
* **Rate-limited.** At most ``rate`` records per second, measured from the run's start.
* **Bounded by offsets or time.** Times become offsets with ``offsets_for_times``: the first
  record at or after the time. The end defaults to the last stable offset when the run starts
  (records committed later are not part of the range).

Reads are ``read_committed``: records of aborted transactions are skipped, as every consumer of
the pipeline skips them.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from confluent_kafka import (
    Consumer,
    IsolationLevel,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, OffsetSpec

from core.connections import kafka_config, kafka_consumer_config
from core.settings import Settings
from schemas.errors import CodedError

log = logging.getLogger(__name__)

#: The cursor group of a run: ``<prefix>imstream-replay.<run id>``.
REPLAY_GROUP = "imstream-replay"
#: Records handed to a target at once (fewer when the rate limit asks for smaller steps).
CHUNK_RECORDS = 2000
POLL_SECONDS = 0.5


class ReplayError(CodedError[str]):
    """A replay that cannot start or go on: a stable ``code`` and what to fix."""

    bracketed = False


class ReplayTarget(Protocol):
    """Where replayed records go. ``apply`` returns once the records are durable there (or
    raises: the chunk is then not committed and is read again on the next run)."""

    name: str

    def apply(self, messages: Sequence[Message]) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class PartitionRange:
    """Records ``[start, end)`` of one partition."""

    topic: str
    partition: int
    start: int
    end: int

    @property
    def size(self) -> int:
        return max(self.end - self.start, 0)

    def as_json(self) -> dict[str, int | str]:
        return {
            "topic": self.topic,
            "partition": self.partition,
            "start": self.start,
            "end": self.end,
        }

    @classmethod
    def of(cls, data: dict[str, object]) -> PartitionRange:
        try:
            topic, partition, start, end = (data[k] for k in ("topic", "partition", "start", "end"))
            if not isinstance(topic, str) or not all(
                isinstance(value, int) and value >= 0 for value in (partition, start, end)
            ):
                raise TypeError
        except (KeyError, TypeError):
            raise ReplayError(
                "range-invalid", f"a range needs topic, partition, start, end >= 0: {data!r}"
            ) from None
        assert isinstance(partition, int) and isinstance(start, int) and isinstance(end, int)
        return cls(topic, partition, start, end)


@dataclass
class ReplayProgress:
    """How far a run is; ``total`` counts offsets (aborted records and markers included)."""

    total: int
    done: int = 0
    records: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def elapsed(self) -> float:
        return max(time.monotonic() - self.started, 1e-9)

    @property
    def rate(self) -> float:
        return self.records / self.elapsed

    @property
    def eta(self) -> float | None:
        if self.done <= 0:
            return None
        return (self.total - self.done) * self.elapsed / self.done


@dataclass
class ReplayResult:
    run_id: str
    target: str
    ranges: list[PartitionRange]
    #: Records handed to the target in this run.
    replayed: int = 0
    #: Offsets of the range that an earlier run of the same id had done already.
    already_done: int = 0
    chunks: int = 0
    finished: bool = False
    elapsed: float = 0.0

    @property
    def total(self) -> int:
        return sum(r.size for r in self.ranges)

    def counts(self) -> dict[str, int]:
        return {
            "replayed": self.replayed,
            "already_done": self.already_done,
            "range_offsets": self.total,
            "chunks": self.chunks,
        }


def run_id_for(*parts: str) -> str:
    """A run id derived from the command's arguments: the same command resumes the same run."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()
    return digest[:16]


def group_for(settings: Settings, run_id: str) -> str:
    return f"{settings.kafka.topic_prefix}{REPLAY_GROUP}.{run_id}"


# -- ranges --


def resolve_ranges(
    settings: Settings,
    topic: str,
    *,
    partitions: Sequence[int] | None = None,
    from_offset: int | None = None,
    to_offset: int | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    timeout: float = 30.0,
) -> list[PartitionRange]:
    """The range of each chosen partition of ``topic``: from ``from_offset`` or the first record
    at/after ``since`` (default: the earliest kept), to ``to_offset`` (exclusive) or the first
    record at/after ``until`` (default: the last stable offset now)."""
    if from_offset is not None and since is not None:
        raise ReplayError("bounds-conflict", "give --from-offset or --since, not both")
    if to_offset is not None and until is not None:
        raise ReplayError("bounds-conflict", "give --to-offset or --until, not both")
    if since is not None and until is not None and until <= since:
        raise ReplayError("bounds-empty", f"--until {until} is not after --since {since}")
    admin = AdminClient(kafka_config(settings))
    try:
        described = admin.list_topics(topic, timeout=timeout).topics.get(topic)
    except KafkaException as error:
        raise ReplayError("kafka-unavailable", f"cannot describe {topic}: {error}") from error
    if described is None or described.error is not None or not described.partitions:
        raise ReplayError("topic-missing", f"topic {topic} does not exist")
    known = sorted(described.partitions)
    chosen = list(partitions) if partitions else known
    unknown = [p for p in chosen if p not in known]
    if unknown:
        raise ReplayError(
            "partition-missing", f"{topic} has partitions {known}, not {sorted(set(unknown))}"
        )
    earliest = _offsets(admin, topic, chosen, OffsetSpec.earliest(), timeout)  # type: ignore[no-untyped-call]
    latest = _offsets(admin, topic, chosen, OffsetSpec.latest(), timeout)  # type: ignore[no-untyped-call]
    starts = dict(earliest)
    if since is not None:
        starts = _at_time(admin, topic, chosen, since, latest, timeout)
    elif from_offset is not None:
        starts = {p: max(from_offset, earliest[p]) for p in chosen}
    ends = dict(latest)
    if until is not None:
        ends = _at_time(admin, topic, chosen, until, latest, timeout)
    elif to_offset is not None:
        ends = {p: min(to_offset, latest[p]) for p in chosen}
    return [
        PartitionRange(topic, p, starts[p], max(ends[p], starts[p])) for p in sorted(set(chosen))
    ]


def _offsets(
    admin: AdminClient, topic: str, partitions: Sequence[int], spec: OffsetSpec, timeout: float
) -> dict[int, int]:
    futures = admin.list_offsets(
        {TopicPartition(topic, p): spec for p in partitions},
        isolation_level=IsolationLevel.READ_COMMITTED,
        request_timeout=timeout,
    )
    try:
        return {tp.partition: future.result().offset for tp, future in futures.items()}
    except KafkaException as error:
        raise ReplayError(
            "kafka-unavailable", f"cannot list offsets of {topic}: {error}"
        ) from error


def _at_time(  # noqa: PLR0917
    admin: AdminClient,
    topic: str,
    partitions: Sequence[int],
    moment: datetime,
    latest: dict[int, int],
    timeout: float,
) -> dict[int, int]:
    """The first offset at or after ``moment`` per partition; the end when there is none."""
    found = _offsets(
        admin, topic, partitions, OffsetSpec.for_timestamp(int(moment.timestamp() * 1000)), timeout
    )
    return {p: latest[p] if offset < 0 else offset for p, offset in found.items()}


# -- the run --


def _encode_end(end: int) -> str:
    return f"end={end}"


def _decode_end(metadata: str | None) -> int | None:
    if metadata and metadata.startswith("end="):
        try:
            return int(metadata[4:])
        except ValueError:
            return None
    return None


def replay(
    settings: Settings,
    ranges: Sequence[PartitionRange],
    target: ReplayTarget,
    *,
    run_id: str,
    rate: float | None = None,
    stop: threading.Event | None = None,
    progress: Callable[[ReplayProgress], None] | None = None,
    chunk_records: int = CHUNK_RECORDS,
    timeout: float = 30.0,
) -> ReplayResult:
    """Replay ``ranges`` into ``target`` under the cursor of ``run_id`` (see the module)."""
    stop = stop or threading.Event()
    result = ReplayResult(run_id=run_id, target=target.name, ranges=list(ranges))
    group = group_for(settings, run_id)
    consumer = Consumer(
        kafka_consumer_config(
            settings,
            group,
            **{"enable.partition.eof": True, "fetch.max.bytes": 16 * 1024 * 1024},
        )
    )
    started = time.monotonic()
    try:
        positions, ranges = _resume(consumer, ranges, timeout)
        result.ranges = list(ranges)
        result.already_done = sum(positions[(r.topic, r.partition)] - r.start for r in ranges)
        state = ReplayProgress(total=result.total, done=result.already_done)
        pending = {
            (r.topic, r.partition): r for r in ranges if positions[(r.topic, r.partition)] < r.end
        }
        if pending:
            consumer.assign([TopicPartition(t, p, positions[(t, p)]) for (t, p) in sorted(pending)])
        if progress is not None:
            progress(state)
        step = chunk_records if not rate else max(1, min(chunk_records, int(rate / 5) or 1))
        while pending and not stop.is_set():
            chunk = _read_chunk(consumer, step, pending, positions)
            if chunk:
                target.apply(chunk)
                result.replayed += len(chunk)
                result.chunks += 1
            _settle(consumer, pending, positions, read=bool(chunk))
            if chunk:
                _commit(consumer, ranges, positions, timeout)
            state.records = result.replayed
            state.done = sum(positions[(r.topic, r.partition)] - r.start for r in ranges)
            if progress is not None:
                progress(state)
            if rate:
                ahead = result.replayed / rate - (time.monotonic() - started)
                if ahead > 0:
                    stop.wait(ahead)
        _commit(consumer, ranges, positions, timeout)
        result.finished = not pending
    finally:
        consumer.close()
        result.elapsed = time.monotonic() - started
    return result


def _read_chunk(
    consumer: Consumer,
    step: int,
    pending: dict[tuple[str, int], PartitionRange],
    positions: dict[tuple[str, int], int],
) -> list[Message]:
    """Up to ``step`` records inside the pending ranges, each advancing its position; a range
    whose end is reached (a record past it, or the partition's end) is finished."""
    chunk: list[Message] = []
    for message in consumer.consume(step, timeout=POLL_SECONDS):
        key = (message.topic() or "", message.partition() or 0)
        bounds = pending.get(key)
        if bounds is None:
            continue
        error = message.error()
        if error is not None:
            if error.code() == KafkaError._PARTITION_EOF:
                position = _position(consumer, key)
                if position >= bounds.end:
                    _finish(consumer, pending, key, positions, bounds.end)
                continue
            if error.fatal():
                raise ReplayError("kafka-failed", f"consumer: {error}")
            log.warning("consumer: %s", error)
            continue
        offset = message.offset() or 0
        if offset >= bounds.end:
            _finish(consumer, pending, key, positions, bounds.end)
            continue
        chunk.append(message)
        positions[key] = offset + 1
    return chunk


def _settle(
    consumer: Consumer,
    pending: dict[tuple[str, int], PartitionRange],
    positions: dict[tuple[str, int], int],
    *,
    read: bool,
) -> None:
    """After a chunk: each position within its range, and the ranges now done finished."""
    for key, bounds in list(pending.items()):
        # Markers and aborted records move the position past the last record read.
        if read:
            positions[key] = max(positions[key], _position(consumer, key))
        positions[key] = min(positions[key], bounds.end)
        if positions[key] >= bounds.end:
            _finish(consumer, pending, key, positions, bounds.end)


def _resume(
    consumer: Consumer, ranges: Sequence[PartitionRange], timeout: float
) -> tuple[dict[tuple[str, int], int], list[PartitionRange]]:
    """Each range's position from the cursor (its start when the run is new); a committed end
    replaces the asked one, so a resumed run covers the same range as the first."""
    try:
        committed = consumer.committed(
            [TopicPartition(r.topic, r.partition) for r in ranges], timeout=timeout
        )
    except KafkaException as error:
        raise ReplayError("kafka-unavailable", f"cannot read the replay cursor: {error}") from error
    cursor = {(tp.topic, tp.partition): tp for tp in committed}
    positions: dict[tuple[str, int], int] = {}
    resumed: list[PartitionRange] = []
    for r in ranges:
        tp = cursor.get((r.topic, r.partition))
        end = _decode_end(tp.metadata) if tp is not None else None
        bounds = PartitionRange(r.topic, r.partition, r.start, end if end is not None else r.end)
        at = tp.offset if tp is not None and tp.offset >= 0 else bounds.start
        positions[(r.topic, r.partition)] = min(max(at, bounds.start), bounds.end)
        resumed.append(bounds)
    return positions, resumed


def _position(consumer: Consumer, key: tuple[str, int]) -> int:
    [tp] = consumer.position([TopicPartition(*key)])
    return int(tp.offset)


def _finish(
    consumer: Consumer,
    pending: dict[tuple[str, int], PartitionRange],
    key: tuple[str, int],
    positions: dict[tuple[str, int], int],
    end: int,
) -> None:
    positions[key] = end
    if pending.pop(key, None) is not None:
        consumer.incremental_unassign([TopicPartition(*key)])


def _commit(
    consumer: Consumer,
    ranges: Sequence[PartitionRange],
    positions: dict[tuple[str, int], int],
    timeout: float,
) -> None:
    offsets = []
    for r in ranges:
        offsets.append(
            TopicPartition(
                r.topic,
                r.partition,
                positions[(r.topic, r.partition)],
                metadata=_encode_end(r.end),
            )
        )
    deadline = time.monotonic() + timeout
    while True:
        try:
            consumer.commit(offsets=offsets, asynchronous=False)
            return
        except KafkaException as error:
            if time.monotonic() > deadline:
                raise ReplayError(
                    "cursor-commit-failed", f"cannot commit the replay cursor: {error}"
                ) from error
            log.warning("replay cursor commit failed, retrying: %s", error)
            time.sleep(0.5)
