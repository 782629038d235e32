"""The stream worker: each processor as a Kafka-transactional consume → process → produce loop.

``imstream run stream-worker`` runs two loops, each in its own thread with its own consumer: the
conversation processor and the user processor. They share one transactional producer
(``streams.transactions``): whatever batches the loops have ready go into one transaction. One
loop iteration:

1. take a batch of input records (``read_committed``: only committed outputs of earlier stages),
   filling it until the next transaction's start;
2. hand it to the processor (``streams.processors``), a pure function of the batch and the state;
3. in one transaction (with the other loop's batch, if it has one), produce the outputs, the
   state changes (to the processor's compacted state topics) and the batch's input offsets
   (``send_offsets_to_transaction`` with the consumer's group metadata, KIP-447);
4. once it committed, apply the state changes to the loop's state store.

Either all of a batch's effects are in Kafka — outputs, new state and consumed offsets — or none
is. Delivery guarantee: exactly once for every input, as read by ``read_committed`` consumers
(every imstream consumer is one; it is librdkafka's default). docs/streams.md gives the argument.

State lives in an on-disk store per loop (``streams.store``, LMDB), a cache of the compacted state
topics: when the group assigns input partitions, the matching state partitions (state topics are
co-partitioned with the inputs) are read from the store's checkpoints to their end — only the
tail a restart or a rebalance missed. A crashed worker restarts from the last committed
transaction: the state topics and the committed offsets always describe the same point, and the
store is brought up to it before anything is processed.

Errors: a transaction Kafka asks us to abort is aborted and the batch is read again from its first
offset (the store was not touched). A batch with an output or state record larger than
a Kafka record may be (``IM_STREAMS__MAX_RECORD_BYTES``), or with a record Kafka refuses for good
when the transaction commits (a topic with a smaller ``max.message.bytes``), is processed again
one input per transaction: the input at fault goes to its dead-letter topic (``output-too-large``,
``output-refused``) with none of its effects, the others commit — a record the broker refuses
must not fail the stage, which would stop it for everyone.
Anything else fatal — the producer fenced by a newer instance with the same id, a commit that
cannot be retried — ends the process with exit code 70 (the supervisor restarts it; the restart
resumes from the last committed transaction).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Protocol

import pydantic_core
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    IsolationLevel,
    KafkaError,
    Message,
    TopicCollection,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, OffsetSpec

from core import kafka_loop
from core.connections import kafka_config, kafka_consumer_config
from core.groups import stream_group
from core.records import Headers, InputRecord, dead_letter
from core.settings import MemberAdmission, Settings
from schemas.topics import Topic, TopicCatalog, topic_catalog
from streams.processors import (
    CONVERSATIONS_TABLE,
    KNOWN_USERS_TABLE,
    MESSAGES_TABLE,
    OUTPUT_REFUSED,
    OUTPUT_TOO_LARGE,
    USERS_TABLE,
    BatchResult,
    ConversationProcessor,
    ConversationSettings,
    UserProcessor,
    UserSettings,
)
from streams.state import StateReader
from streams.store import StateStore
from streams.transactions import (
    KAFKA_CALL_TIMEOUT,
    PERMANENT_RECORD_ERRORS,
    Batch,
    Produced,
    Transaction,
    Transactions,
)
from streams.users import PushPolicy

log = logging.getLogger(__name__)

READY_MESSAGE = "stream worker ready"
PROGRESS_INTERVAL = 10.0
#: How often a loop records the store's checkpoints (the tail a restart reads is at most this old).
CHECKPOINT_INTERVAL = 10.0
#: Kafka's default ``delete.retention.ms``: how long a compacted topic keeps a deletion.
DELETE_RETENTION_MS = 86_400_000


class Processor(Protocol):
    def process(self, batch: Sequence[InputRecord], state: StateReader) -> BatchResult: ...


def encode_state(value: dict[str, Any] | None) -> bytes | None:
    return None if value is None else pydantic_core.to_json(value)


def decode_state(value: bytes | None) -> dict[str, Any] | None:
    if value is None:
        return None
    decoded = pydantic_core.from_json(value)
    return decoded if isinstance(decoded, dict) else None


@dataclass
class LoopStats:
    records: int = 0
    batches: int = 0
    outputs: int = 0
    skipped: int = 0
    dead_lettered: int = 0
    aborted: int = 0
    restored: int = 0
    last_error: str | None = None
    extra: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class LoopConfig:
    name: str
    inputs: tuple[Topic, ...]
    tables: Mapping[str, Topic]
    #: Tables pruned by age (``at`` in the value), with their retention.
    retention: Mapping[str, timedelta] = field(default_factory=dict)
    #: Global tables: every partition of the topic, read by every member of the group, kept
    #: up to date between batches (the known users, for the conversation processor).
    globals: Mapping[str, Topic] = field(default_factory=dict)


#: More than any record's key and headers weigh (ids of at most 64 characters; a dead letter's
#: reason of at most 1,000 bytes): a record whose value is this far under the limit is under it.
KEY_AND_HEADERS_MARGIN = 16_384


def record_bytes(key: bytes | None, value: bytes | None, headers: Headers | None) -> int:
    """What a record weighs against the record limit: its key, value and headers."""
    size = len(key or b"") + len(value or b"")
    return size + sum(len(name) + len(content) for name, content in headers or ())


class ProcessorLoop:
    """One processor's transactional loop; ``run`` blocks until ``stop`` is set or a fatal error."""

    def __init__(
        self,
        settings: Settings,
        config: LoopConfig,
        processor: Processor,
        stop: threading.Event,
        *,
        instance_id: str,
        catalog: TopicCatalog,
        transactions: Transactions,
    ) -> None:
        self.settings = settings
        self.transactions = transactions
        self.catalog = catalog
        self.config = config
        self.processor = processor
        self.stop = stop
        self.stats = LoopStats()
        self.ready = threading.Event()
        streams = settings.streams
        self.group_id = stream_group(settings, config.name)
        self.store = StateStore(
            settings.stream_state_dir / f"{self.group_id}-{instance_id}",
            [*config.tables, *config.globals],
            expiring=config.retention,
        )
        #: Offsets and topic ids of the state topics (see ``_watermarks``).
        self._admin = AdminClient(kafka_config(settings))
        #: The global tables' reader and its next offset per (topic, partition).
        self._globals: Consumer | None = None
        self._global_positions: dict[tuple[str, int], int] = {}
        #: The input partitions assigned, whose state is restored in the store.
        self.partitions: set[int] = set()
        self._last_checkpoint = time.monotonic()
        self._topic_ids: dict[str, str] = {}
        self._assignment = kafka_loop.Assignment()
        self._log = logging.getLogger(f"{__name__}.{config.name}")
        #: Set while a batch that held a record over the limit or refused by Kafka is processed
        #: one input per transaction (across reads again after a transient abort).
        self._one_at_a_time = False
        consumer_config: dict[str, Any] = {
            # range keeps equal partition numbers of co-partitioned inputs on one member.
            "partition.assignment.strategy": "range",
            "session.timeout.ms": int(streams.session_timeout_seconds * 1000),
            "heartbeat.interval.ms": int(min(3.0, streams.session_timeout_seconds / 3) * 1000),
            "max.poll.interval.ms": max(
                int(streams.session_timeout_seconds * 1000), int(KAFKA_CALL_TIMEOUT * 4 * 1000)
            ),
        }
        if streams.static_membership:
            consumer_config["group.instance.id"] = f"{instance_id}-{config.name}"
        self.consumer = Consumer(kafka_consumer_config(settings, self.group_id, **consumer_config))

    # -- rebalance callbacks (called by librdkafka inside consume/poll, between transactions) --

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._assignment.assign(partitions)
        numbers = {tp.partition for tp in partitions} - self.partitions
        if numbers:
            self._restore(numbers)
        self._log.info(
            "assigned %s; %d state values in the store",
            kafka_loop.describe(partitions),
            self.store.size(),
        )
        self.ready.set()

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        kept = {partition for _topic, partition in self._assignment.partitions}
        kept -= {partition for _topic, partition in self._assignment.revoke(partitions)}
        gone = self.partitions - kept
        # The store keeps their values (only the keys of assigned partitions are ever read): if
        # they come back, the restore reads only what another worker wrote meanwhile.
        self.partitions -= gone
        self._log.info(
            "revoked %s; state partitions %s", kafka_loop.describe(partitions), sorted(gone)
        )

    def _restore_from(self, partitions: set[int]) -> dict[tuple[str, int], int]:
        """Where each state partition's restore starts: its checkpoint when the store can trust
        it, else the beginning.

        The partitioned tables are emptied, and every assigned partition read from the
        beginning, when a
        checkpoint is of another topic of the same name (deleted and created again), past the
        partition's end, or older than the topic keeps deletions (``delete.retention.ms``: a
        deletion in the tail may have been compacted away)."""
        self._topic_ids.update(self._state_topic_ids())
        marks = self._watermarks(
            [(topic.name, p) for topic in self.config.tables.values() for p in partitions]
        )
        starts: dict[tuple[str, int], int] = {}
        now = time.time()
        for topic in self.config.tables.values():
            keep = float(topic.configs().get("delete.retention.ms", DELETE_RETENTION_MS)) / 1000
            for partition in partitions:
                checkpoint = self.store.checkpoint(topic.name, partition)
                if checkpoint is None:
                    starts[(topic.name, partition)] = OFFSET_BEGINNING
                    continue
                low, high = marks[(topic.name, partition)]
                distrust = None
                if checkpoint.topic_id != self._topic_ids[topic.name]:
                    distrust = "was written for another topic of that name"
                elif checkpoint.offset > high:
                    distrust = f"is past the partition's end ({checkpoint.offset} > {high})"
                elif now - checkpoint.at > keep:
                    distrust = f"is {(now - checkpoint.at) / 3600:.0f} h old, older than the "
                    distrust += "topic keeps deletions"
                if distrust is not None:
                    self._log.warning(
                        "the store's checkpoint of %s[%d] %s: emptying the store and restoring "
                        "every assigned partition from the beginning",
                        topic.name,
                        partition,
                        distrust,
                    )
                    # The partitioned tables only: the global tables keep their own checkpoints.
                    for table, state_topic in self.config.tables.items():
                        self.store.clear(table, state_topic.name)
                    everything = partitions | self.partitions
                    self.partitions.clear()
                    return {
                        (t.name, p): OFFSET_BEGINNING
                        for t in self.config.tables.values()
                        for p in everything
                    }
                # Before the log start only records deleted by time (the message table, which
                # the store prunes itself by the same retention).
                starts[(topic.name, partition)] = max(checkpoint.offset, low)
        return starts

    def _watermarks(
        self, partitions: list[tuple[str, int]]
    ) -> dict[tuple[str, int], tuple[int, int]]:
        """``(log start, high watermark)`` of each partition, in one request per kind.

        Through the loop's admin client, not its consumer: the consumer's connections carry its
        long-polling fetches, and a request queued behind one waits for it (measured: seconds
        per checkpoint, the loop stalled meanwhile)."""
        if not partitions:
            return {}
        found: dict[str, dict[tuple[str, int], int]] = {}
        specs = (("low", OffsetSpec.earliest()), ("high", OffsetSpec.latest()))  # type: ignore[no-untyped-call]
        for name, spec in specs:
            futures = self._admin.list_offsets(
                {TopicPartition(topic, partition): spec for topic, partition in partitions},
                isolation_level=IsolationLevel.READ_UNCOMMITTED,
                request_timeout=KAFKA_CALL_TIMEOUT,
            )
            found[name] = {
                (tp.topic, tp.partition): future.result().offset for tp, future in futures.items()
            }
        return {tp: (found["low"][tp], found["high"][tp]) for tp in found["high"]}

    def _state_topic_ids(self, topics: Iterable[Topic] | None = None) -> dict[str, str]:
        admin = self._admin
        chosen = self.config.tables.values() if topics is None else topics
        names = [topic.name for topic in chosen]
        described = admin.describe_topics(TopicCollection(names))
        return {
            name: str(future.result(KAFKA_CALL_TIMEOUT).topic_id)
            for name, future in described.items()
        }

    def _restore(self, partitions: set[int]) -> None:
        """Read the state topics' ``partitions`` from the store's checkpoints to their end."""
        started = time.monotonic()
        starts = self._restore_from(partitions)
        partitions = {partition for _topic, partition in starts}
        restorer = Consumer(
            kafka_config(
                self.settings,
                **{
                    "group.id": f"{self.group_id}-restore",
                    "enable.auto.commit": False,
                    "isolation.level": "read_committed",
                    "enable.partition.eof": True,
                    "fetch.max.bytes": 64 * 1024 * 1024,
                },
            )
        )
        by_topic = {topic.name: name for name, topic in self.config.tables.items()}
        assignment = [TopicPartition(t, p, offset) for (t, p), offset in sorted(starts.items())]
        pending = {(tp.topic, tp.partition) for tp in assignment}
        ends: dict[tuple[str, int], int] = {}
        restorer.assign(assignment)
        count = 0
        last_progress = started
        try:
            while pending:
                if self.stop.is_set():
                    raise kafka_loop.FatalError("stopped during restore")
                read: dict[str, list[tuple[bytes, bytes | None]]] = defaultdict(list)
                for message in restorer.consume(10_000, timeout=0.1):
                    error = message.error()
                    tp = (message.topic() or "", message.partition() or 0)
                    if error is not None:
                        if error.code() == KafkaError._PARTITION_EOF:
                            pending.discard(tp)
                            ends[tp] = message.offset() or 0
                            continue
                        raise kafka_loop.FatalError(f"restoring {message.topic()}: {error}")
                    read[by_topic[tp[0]]].append((message.key() or b"", message.value()))
                    count += 1
                for table, records in read.items():
                    self.store.restore(table, records)
                now = time.monotonic()
                if now - last_progress > PROGRESS_INTERVAL:
                    last_progress = now
                    self._log.info("restoring: %d state records read so far", count)
        finally:
            restorer.close()
        self.store.set_checkpoints(ends, self._topic_ids)
        self.partitions |= partitions
        self.stats.restored += count
        self._log.info(
            "restored %d state records for partitions %s in %.2fs (from %s)",
            count,
            sorted(partitions),
            time.monotonic() - started,
            "the beginning"
            if all(offset == OFFSET_BEGINNING for offset in starts.values())
            else "the store's checkpoints",
        )

    def _open_globals(self) -> None:
        """Assign every partition of the global tables' topics from the store's checkpoints (the
        beginning for a table whose checkpoints it cannot trust) and read them to their end."""
        started = time.monotonic()
        topic_ids = self._state_topic_ids(self.config.globals.values())
        self._topic_ids.update(topic_ids)
        now = time.time()
        assignment = []
        for table, topic in self.config.globals.items():
            keep = float(topic.configs().get("delete.retention.ms", DELETE_RETENTION_MS)) / 1000
            checkpoints = [self.store.checkpoint(topic.name, p) for p in range(topic.partitions)]
            if any(
                c is None or c.topic_id != topic_ids[topic.name] or now - c.at > keep
                for c in checkpoints
            ):
                self.store.clear(table, topic.name)
                checkpoints = [None] * topic.partitions
            for partition, checkpoint in enumerate(checkpoints):
                offset = checkpoint.offset if checkpoint is not None else OFFSET_BEGINNING
                assignment.append(TopicPartition(topic.name, partition, offset))
        self._globals = Consumer(
            kafka_config(
                self.settings,
                **{
                    "group.id": f"{self.group_id}-globals",
                    "enable.auto.commit": False,
                    "isolation.level": "read_committed",
                    "enable.partition.eof": True,
                    "auto.offset.reset": "earliest",
                },
            )
        )
        self._globals.assign(assignment)
        count = self._read_globals(wait=True)
        self._log.info(
            "read %d records of the global tables %s in %.2fs",
            count,
            ", ".join(self.config.globals),
            time.monotonic() - started,
        )

    def _read_globals(self, *, wait: bool) -> int:
        """Apply what the global tables' topics hold beyond the reader's positions: everything
        up to their ends (``wait``), or only what is already fetched."""
        assert self._globals is not None
        by_topic = {topic.name: table for table, topic in self.config.globals.items()}
        pending = {
            (topic.name, p)
            for topic in self.config.globals.values()
            for p in range(topic.partitions)
        }
        count = 0
        while True:
            read: dict[str, list[tuple[bytes, bytes | None]]] = defaultdict(list)
            for message in self._globals.consume(10_000, timeout=0.1 if wait else 0):
                error = message.error()
                tp = (message.topic() or "", message.partition() or 0)
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        pending.discard(tp)
                        self._global_positions[tp] = message.offset() or 0
                        continue
                    raise kafka_loop.FatalError(f"reading {message.topic()}: {error}")
                read[by_topic[tp[0]]].append((message.key() or b"", message.value()))
                self._global_positions[tp] = (message.offset() or 0) + 1
                count += 1
            for table, records in read.items():
                self.store.restore(table, records)
            if not wait or not pending:
                return count
            if self.stop.is_set():
                raise kafka_loop.FatalError("stopped while reading the global tables")

    def _checkpoint(self) -> None:
        """Record, per state partition, the offset the store is at or past: its high watermark,
        read between two transactions (every write of this loop committed and in the store);
        and the global tables' positions (what the store holds of them)."""
        offsets = dict(self._global_positions)
        marks = self._watermarks(
            [(topic.name, p) for topic in self.config.tables.values() for p in self.partitions]
        )
        offsets.update({tp: high for tp, (_low, high) in marks.items()})
        self.store.set_checkpoints(offsets, self._topic_ids)
        self._last_checkpoint = time.monotonic()

    # -- the loop --

    def run(self) -> None:
        stopped = False
        try:
            self._run()
            stopped = True
        finally:
            if stopped and (self.partitions or self._global_positions):
                self._checkpoint()  # a clean stop: the next start reads no tail at all
            self.consumer.close()
            if self._globals is not None:
                self._globals.close()
            self.store.close()

    def _run(self) -> None:
        streams = self.settings.streams
        self.transactions.initialise()
        if self.config.globals:
            self._open_globals()
        kafka_loop.subscribe(
            self.consumer,
            [topic.name for topic in self.config.inputs],
            self._on_assign,
            self._on_revoke,
        )
        self._log.info(
            "consuming %s as group %s", ", ".join(t.name for t in self.config.inputs), self.group_id
        )
        last_progress = time.monotonic()
        last_prune = last_progress
        reported = LoopStats()
        name = self.config.name
        while not self.stop.is_set():
            epoch = self._assignment.epoch
            messages = self.consumer.consume(1, timeout=0.2)
            try:
                if messages and streams.batch_size > 1:
                    # Fill the batch until the next transaction may begin (past when idle: then
                    # this takes only what is already fetched); the transaction waits for it.
                    self.transactions.collecting(name)
                    wait = self.transactions.next_start() - time.monotonic()
                    more = streams.batch_size - 1
                    messages += self.consumer.consume(more, timeout=max(wait, 0.0))
                if self._assignment.epoch != epoch:
                    # A rebalance ran inside consume: every position went back to its committed
                    # offset, so these records will come again; process none of them now.
                    continue
                records = self._records(messages)
                if self._globals is not None:
                    self._read_globals(wait=False)
                if records:
                    self._process(records)
            finally:
                self.transactions.not_collecting(name)
            now = time.monotonic()
            if now - last_progress >= streams.progress_seconds:
                self._report(reported, now - last_progress)
                reported = LoopStats(**{**self.stats.__dict__, "extra": {}})
                last_progress = now
            due = now - self._last_checkpoint >= CHECKPOINT_INTERVAL
            if due and (self.partitions or self._global_positions):
                self._checkpoint()
            if self.config.retention and now - last_prune >= 60.0:
                last_prune = now
                for table, retention in self.config.retention.items():
                    pruned = self.store.prune(table, time.time() - retention.total_seconds())
                    if pruned:
                        self._log.info("pruned %d %s older than %s", pruned, table, retention)

    def _records(self, messages: list[Message]) -> list[InputRecord]:
        return kafka_loop.input_records(messages, logger=self._log, on_error=self._consumer_error)

    def _consumer_error(self, error: KafkaError) -> None:
        self.stats.last_error = str(error)

    def _process(self, records: list[InputRecord]) -> None:
        if self._one_at_a_time:
            self._one_by_one(records)
            return
        result = self.processor.process(records, self.store)
        states = [encode_state(write.value) for write in result.writes]
        if not self._oversized(result, states):
            outcome, _ = self._transact(records, result, states)
            if outcome is Transaction.COMMITTED:
                return
            if outcome is Transaction.ABORTED:
                self._rewind(records)
                return
        # A record over the limit, or one Kafka refused for good: the batch again, one input per
        # transaction, so that only the input at fault is set aside. Rare, so it may cost a
        # transaction per input.
        self._one_at_a_time = True
        self._one_by_one(records)

    def _one_by_one(self, records: list[InputRecord]) -> None:
        """Each input in a transaction of its own, in order, each seeing the state the earlier
        ones committed; an input whose outputs or state are over the record limit, or whose
        outputs Kafka refuses for good, goes to its dead-letter topic with none of its effects."""
        set_aside: list[str] = []
        for index, record in enumerate(records):
            result = self.processor.process([record], self.store)
            states = [encode_state(write.value) for write in result.writes]
            refusal: tuple[str, str] | None = None
            outcome = None
            if self._oversized(result, states):
                limit = self.settings.streams.max_record_bytes
                refusal = (
                    OUTPUT_TOO_LARGE,
                    f"its outputs or state would exceed the record limit of {limit} bytes "
                    "(IM_STREAMS__MAX_RECORD_BYTES)",
                )
            else:
                outcome, refusals = self._transact([record], result, states, alone=True)
                if outcome is Transaction.REFUSED:
                    # The refusal's cause: not the records purged with the aborted transaction.
                    names = sorted(
                        {
                            KafkaError(code).name()
                            for code in refusals
                            if code in PERMANENT_RECORD_ERRORS
                        }
                    )
                    cause = ", ".join(names) or "a permanent record error"
                    refusal = (OUTPUT_REFUSED, f"Kafka refused its outputs ({cause})")
            if refusal is not None:
                dead = self._dead_letter(record, *refusal)
                outcome, _ = self._transact([record], dead, [], alone=True)
            if outcome is not Transaction.COMMITTED:
                # It and the rest are read again, still one at a time: right after Kafka refused
                # a record, the next transaction may abort too (the idempotent producer resets
                # its sequence numbers first).
                self._rewind(records[index:])
                break
            if refusal is not None:
                where = f"{record.topic}[{record.partition}]@{record.offset}"
                set_aside.append(f"{where} as {refusal[0]}: {refusal[1]}")
        else:
            self._one_at_a_time = False
        if set_aside:  # one line per batch: a flood of such inputs must not flood the log too
            self._log.warning(
                "%d of %d records dead-lettered with none of their effects; the first, %s",
                len(set_aside),
                len(records),
                set_aside[0],
            )

    def _dead_letter(self, record: InputRecord, code: str, why: str) -> BatchResult:
        """An input set aside: its dead letter, nothing else (an ephemeral input has none)."""
        (source,) = [topic for topic in self.config.inputs if topic.name == record.topic]
        if source.dead_letter is None:
            return BatchResult(dead_lettered=1)
        return BatchResult(
            outputs=[dead_letter(self.catalog, source, record, code, why)], dead_lettered=1
        )

    def _transact(
        self,
        records: list[InputRecord],
        result: BatchResult,
        states: list[bytes | None],
        *,
        alone: bool = False,
    ) -> tuple[Transaction, list[int]]:
        """The outputs, the state records and the inputs' offsets, in the worker's next
        transaction (``alone``: in one of their own); the tables take the writes once it
        committed. Aborted when Kafka asks; the caller then has the inputs read again. Returns
        the outcome and the error codes of the records Kafka refused in it."""
        produced = [
            Produced(output.topic, output.key, output.value, output.partition, output.headers)
            for output in result.outputs
        ]
        tables = self.config.tables
        produced += [
            Produced(tables[write.table].name, write.key.encode(), state, write.partition)
            for write, state in zip(result.writes, states, strict=True)
        ]
        # Commit policy: the offsets go into the transaction (exactly once with the outputs),
        # not through the kit's commit_offsets; a batch read across a rebalance is dropped
        # before it gets here (the epoch check in _run), so all of it is still held.
        batch = Batch(
            owner=self.config.name,
            records=produced,
            offsets=[
                TopicPartition(t, p, o) for (t, p), o in kafka_loop.next_offsets(records).items()
            ],
            group_metadata=self.consumer.consumer_group_metadata(),
            alone=alone,
        )
        outcome = self.transactions.run(batch)
        if outcome is not Transaction.COMMITTED:
            self.stats.aborted += 1
            self.stats.last_error = f"transaction {outcome.value}"
            return outcome, batch.refusals
        self.store.apply(result.writes, states)
        stats = self.stats
        stats.records += len(records)
        stats.batches += 1
        stats.outputs += len(result.outputs)
        stats.skipped += result.skipped
        stats.dead_lettered += result.dead_lettered
        return outcome, batch.refusals

    def _oversized(self, result: BatchResult, states: list[bytes | None]) -> bool:
        """Whether any output or state record is larger than a record may be."""
        limit = self.settings.streams.max_record_bytes
        # Keys (ids) and headers (a dead letter's reason) are small and bounded: only a value
        # can bring a record near the limit. The values alone first (a third of the cost per
        # batch); the exact weights only when one is close.
        close = limit - KEY_AND_HEADERS_MARGIN
        if all(len(output.value or b"") <= close for output in result.outputs) and all(
            len(state or b"") <= close for state in states
        ):
            return False
        return any(
            record_bytes(output.key, output.value, output.headers) > limit
            for output in result.outputs
        ) or any(
            record_bytes(write.key.encode(), state, None) > limit
            for write, state in zip(result.writes, states, strict=True)
        )

    def _rewind(self, records: list[InputRecord]) -> None:
        first: dict[tuple[str, int], int] = {}
        for record in records:
            tp = (record.topic, record.partition)
            first[tp] = min(first.get(tp, record.offset), record.offset)
        for (topic, partition), offset in first.items():
            self.consumer.seek(TopicPartition(topic, partition, offset))

    def _report(self, before: LoopStats, seconds: float) -> None:
        done = self.stats.records - before.records
        shared = self.transactions.stats
        self._log.info(
            "%d records in %d batches (%.0f/s), %d outputs, %d skipped, %d dead-lettered, "
            "%d aborted; %d state values; worker totals: %d transactions, %d batches (%d shared), "
            "interval %.0f ms (last transaction %.1f ms)",
            done,
            self.stats.batches - before.batches,
            done / seconds if seconds else 0.0,
            self.stats.outputs - before.outputs,
            self.stats.skipped - before.skipped,
            self.stats.dead_lettered - before.dead_lettered,
            self.stats.aborted - before.aborted,
            self.store.size(),
            shared.transactions,
            shared.batches,
            shared.shared,
            shared.interval * 1000,
            shared.last_duration * 1000,
        )


def default_instance_id() -> str:
    return socket.gethostname()


def build_loops(
    settings: Settings,
    stop: threading.Event,
    *,
    catalog: TopicCatalog | None = None,
    processors: Sequence[str] = ("conversations", "users"),
) -> tuple[list[ProcessorLoop], list[Transactions]]:
    """The worker's loops (the conversation processor and/or the user processor) and their
    transactional producers: one per loop (transactional id ``<group>-<instance id>``), or one
    they share with ``IM_STREAMS__SHARED_TRANSACTION`` (its id names both processors)."""
    catalog = catalog or topic_catalog(settings)
    streams = settings.streams
    instance_id = streams.instance_id or default_instance_id()
    names = [name for name in ("conversations", "users") if name in processors]
    together = streams.shared_transaction and len(names) > 1
    shared = (
        Transactions(settings, f"{stream_group(settings, '+'.join(names))}-{instance_id}")
        if together
        else None
    )

    def transactions_of(name: str) -> Transactions:
        if shared is not None:
            return shared
        return Transactions(settings, f"{stream_group(settings, name)}-{instance_id}")

    loops = []
    if "conversations" in processors:
        retention = timedelta(days=streams.message_retention_days)
        loops.append(
            ProcessorLoop(
                settings,
                LoopConfig(
                    name="conversations",
                    inputs=(catalog.messages_in, catalog.typing_in),
                    tables={
                        CONVERSATIONS_TABLE: catalog.conversation_state,
                        MESSAGES_TABLE: catalog.message_state,
                    },
                    retention={MESSAGES_TABLE: retention},
                    globals={KNOWN_USERS_TABLE: catalog.known_users},
                ),
                ConversationProcessor(
                    catalog,
                    ConversationSettings(
                        large_group_threshold=streams.large_group_threshold,
                        max_members=streams.max_members,
                        max_members_by_tenant=streams.tenant_max_members,
                        known_users_only=streams.member_admission is MemberAdmission.KNOWN,
                        message_retention=retention,
                    ),
                ),
                stop,
                instance_id=instance_id,
                catalog=catalog,
                transactions=transactions_of("conversations"),
            )
        )
    if "users" in processors:
        loops.append(
            ProcessorLoop(
                settings,
                LoopConfig(
                    name="users",
                    inputs=(catalog.user_inbox, catalog.user_state_in, catalog.presence),
                    tables={USERS_TABLE: catalog.user_state},
                ),
                UserProcessor(
                    catalog,
                    UserSettings(
                        push=PushPolicy(
                            collapse_window=timedelta(seconds=streams.push_collapse_seconds)
                        )
                    ),
                ),
                stop,
                instance_id=instance_id,
                catalog=catalog,
                transactions=transactions_of("users"),
            )
        )
    return loops, list({id(loop.transactions): loop.transactions for loop in loops}.values())
