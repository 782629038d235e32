"""The CQL sink (``imstream run cql-sink``): the conversation log, the sync queues and the push
tokens, from Kafka into the serving store (Cassandra locally, ScyllaDB in production).

Reads ``im.messages.sequenced`` (key ``tenant/conversation``), ``im.sync.events`` (key
``tenant/user``) and ``im.push.tokens`` (key ``tenant/user/device``) as consumer group
``<prefix>imstream-cql-sink``, ``read_committed``, and writes (docs/storage.md):

=====================  =====================================================  ==============
table                  key (partition key, clustering key)                    from
=====================  =====================================================  ==============
timeline               ((tenant, conversation, seq // bucket size), seq)      sequenced
messages_by_id         ((tenant, message id))                                 sequenced
conversations          ((tenant, conversation))                               sequenced
members                ((tenant, conversation), user)                         sequenced
read_positions         ((tenant, conversation), reader)                       sequenced
sync_queue             ((tenant, user, sync_id // bucket size), sync_id)      sync events
sync_heads             ((tenant, user))                                       sync events
user_conversations     ((tenant, user), conversation)                         sync events
devices                ((tenant, user), device)                               push tokens
former_members         ((tenant, conversation), user)                         sequenced
recalled_messages      ((tenant, conversation), message id)                   sequenced
command_outcomes       ((tenant, command event id))                           both
=====================  =====================================================  ==============

Read-access facts (a member gone, a group deleted, a message recalled) are written at
``LOCAL_QUORUM`` before every other write of their batch, and the command's outcome after
them: an ingress node answers such a command only once its outcome is stored (docs/storage.md,
"Read access").

Delivery guarantee: **at-least-once delivery into idempotent, order-independent writes, which
is exactly-once in effect in the tables.** A batch's offsets are committed (synchronously) only
after every write of the batch succeeded and every poison record of it was acknowledged by its
dead-letter topic; a crash before the commit replays the batch, and a replay — of that batch or
of any range, in any order — writes the same cells with the same timestamps (each write states
``USING TIMESTAMP`` from the event's own order: ``sinks.cql.rules``), so it changes nothing.

Outages: a write that fails for a transient reason is retried with exponential backoff and
jitter, forever. Meanwhile the sink pauses its partitions and keeps polling Kafka, so it stays in
its consumer group (no rebalance storm) and resumes where it was when the cluster answers again.
Poison records (undecodable, schema-invalid, the wrong type for the topic) and records whose
write the cluster refuses for good go to the source topic's dead-letter topic with the reason in
headers; the sink keeps going.

One sink process runs one loop; run several (same group) to share the partitions.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any

from cassandra import DriverException
from cassandra.cluster import NoHostAvailable, Session
from cassandra.policies import ExponentialReconnectionPolicy
from cassandra.query import BoundStatement
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from pydantic import ValidationError

from core import kafka_loop
from core.backoff import Backoff
from core.connections import (
    consume_ready,
    cql_cluster,
    kafka_consumer_config,
    kafka_producer_config,
    sink_session_config,
)
from core.groups import cql_sink_group
from core.readiness import ReadyFile
from core.records import PROCESSING_FAILED, InputRecord, dead_letter
from core.settings import Settings
from schemas.errors import SchemaError, schema_error
from schemas.events import Event, SyncRecord, parse_event
from schemas.topics import Topic, TopicCatalog, topic_catalog
from sinks.cql.crypto import (
    KeyRing,
    MasterKeyMismatchError,
    device_context,
    key_id_of,
    key_ring,
    open_event,
    open_text,
    timeline_context,
)
from sinks.cql.migrate import MigrationError, check_keyspace_name, migrate
from sinks.cql.rules import (
    ACCESS_CONSISTENCY,
    MemberRow,
    Statements,
    UserConversationRow,
    WritePlanner,
    moot,
)
from sinks.cql.serving import serving_keyspace
from sinks.cql.writer import CqlWriter, PlannedWrite, is_transient, refusal_code

log = logging.getLogger(__name__)

READY_MESSAGE = "cql sink ready"
PROGRESS_INTERVAL = 10.0
#: Exit code of a refused migration (EX_CONFIG); a fatal Kafka error is ``EXIT_FATAL``.
EXIT_CONFIG = 78
#: How long one poll waits for the first record of a batch.
POLL_SECONDS = 0.5
#: How long a batch waits for more records after its first (unless it is full): at low rates
#: a batch per record would cost a synchronous offset commit and a round of requests per
#: record; this caps the commits at about 20 a second and groups a busy user's writes, for
#: at most this much more lag (the sink is off the delivery path; a remove, leave, delete or
#: recall is answered up to this much later: docs/storage.md "Read access").
BATCH_LINGER_SECONDS = 0.05


def retry_backoff(settings: Settings) -> Backoff:
    """The waits between retries while the cluster does not answer: ``cql_retry_initial_seconds``
    doubling up to ``cql_retry_max_seconds``, each spread over its upper half."""
    sinks = settings.sinks
    return Backoff(sinks.cql_retry_initial_seconds, sinks.cql_retry_max_seconds, "equal")


class StopRequestedError(Exception):
    """A stop was requested while a batch could not complete; its offsets stay uncommitted."""


@dataclass
class SinkStats:
    records: int = 0
    batches: int = 0
    writes: int = 0
    dead_lettered: int = 0
    skipped: int = 0
    retries: int = 0
    commits: int = 0
    by_topic: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Poison:
    record: InputRecord
    source: Topic
    code: str
    message: str


class CqlSink:
    """One consumer, one writer, one dead-letter producer; ``run`` blocks until stopped."""

    def __init__(
        self,
        settings: Settings,
        session: Session,
        *,
        catalog: TopicCatalog | None = None,
        group_id: str | None = None,
        keyspace: str | None = None,
        stop: threading.Event | None = None,
        ready_file: ReadyFile | None = None,
        keys: KeyRing | None = None,
    ) -> None:
        """``keys``: the tenants' data keys (default: from ``settings``, in the anchor
        keyspace ``settings.cql.keyspace``, so a rebuilt keyspace is sealed with the same)."""
        self.settings = settings
        self.session = session
        #: Announced at the first assignment (the process's; a replay's sink has none).
        self.ready_file = ready_file or ReadyFile(None)
        self.catalog = catalog or topic_catalog(settings)
        self.keyspace = check_keyspace_name(keyspace or settings.cql.keyspace)
        self.group_id = group_id or cql_sink_group(settings, self.keyspace)
        self.inputs = (
            self.catalog.messages_sequenced,
            self.catalog.sync_events,
            self.catalog.push_tokens,
        )
        self._sources = {topic.name: topic for topic in self.inputs}
        sinks = settings.sinks
        self.stats = SinkStats()
        self._stop = stop or threading.Event()
        self._statements = Statements(session, self.keyspace)
        self.keys = keys or key_ring(session, settings, self._key_query)
        self.writer = CqlWriter(
            session,
            max_in_flight=sinks.cql_max_in_flight,
            backoff=retry_backoff(settings),
            wait=self._wait_for_retry,
        )
        self.planner = WritePlanner(
            self._statements,
            _SinkReads(self),
            timeline_bucket_size=sinks.timeline_bucket_size,
            sync_bucket_size=sinks.sync_bucket_size,
            sync_ttl_seconds=int(timedelta(days=sinks.sync_retention_days).total_seconds()),
            keys=self.keys,
        )
        self.consumer = Consumer(
            kafka_consumer_config(
                settings,
                self.group_id,
                **{"enable.partition.eof": True, **sink_session_config(settings)},
            )
        )
        self.producer = Producer(
            kafka_producer_config(settings, **{"enable.idempotence": True, "acks": "all"})
        )
        #: Writes planned for the current batch and not yet executed.
        self._pending: list[PlannedWrite] = []
        #: Planned writes of read-access facts: executed before ``_pending`` (rules.py).
        self._pending_access: list[PlannedWrite] = []
        self._batch: list[InputRecord] = []
        self._refused: dict[int, tuple[str, str]] = {}
        #: Records polled while paused (should librdkafka hand any over): the next batch's start.
        self._carry: list[Message] = []
        self._paused: list[TopicPartition] = []
        self._assignment = kafka_loop.Assignment()
        self._at_end: dict[tuple[str, int], bool] = {}
        self._skipped_tombstones = 0
        self._last_progress = time.monotonic()
        self._reported = SinkStats()
        self.ready = threading.Event()

    # -- the loop --

    def run(self, stop: threading.Event | None = None, *, until_caught_up: bool = False) -> None:
        """Consume until ``stop`` is set — or, with ``until_caught_up``, until every assigned
        partition is read to its end and committed (tests, one-off backfills)."""
        if stop is not None:
            self._stop = stop
        kafka_loop.subscribe(
            self.consumer, [topic.name for topic in self.inputs], self._on_assign, self._on_revoke
        )
        log.info(
            "consuming %s as group %s into keyspace %s",
            ", ".join(topic.name for topic in self.inputs),
            self.group_id,
            self.keyspace,
        )
        try:
            while not self._stop.is_set():
                messages = self._next_messages()
                records = self._records(messages)
                if records:
                    try:
                        self._process(records)
                    except StopRequestedError:
                        log.info("stopped before the batch completed; it will be read again")
                        break
                self._maybe_report()
                if until_caught_up and self._caught_up():
                    break
        finally:
            self.consumer.close()
            self.producer.flush(10)
        self._report(final=True)

    def _next_messages(self) -> list[Message]:
        batch_size = self.settings.sinks.cql_batch_size
        messages, self._carry = self._carry, []
        if not messages:
            messages = consume_ready(self.consumer, batch_size, POLL_SECONDS)
            linger = BATCH_LINGER_SECONDS if messages else 0.0
        else:
            linger = 0.0
        if messages and len(messages) < batch_size:
            messages += self.consumer.consume(batch_size - len(messages), timeout=linger)
        return messages

    def _records(self, messages: Sequence[Message]) -> list[InputRecord]:
        return kafka_loop.input_records(messages, logger=log, ends=self._at_end)

    def _caught_up(self) -> bool:
        held = self._assignment.partitions
        return bool(held) and not self._carry and all(self._at_end.get(tp, False) for tp in held)

    # -- one batch --

    def _process(self, records: list[InputRecord]) -> None:
        poisoned = self.apply(records)
        self._commit(records)
        self._resume()
        stats = self.stats
        stats.records += len(records)
        stats.batches += 1
        stats.dead_lettered += poisoned
        stats.skipped = self.planner.skipped + self._skipped_tombstones
        for record in records:
            stats.by_topic[record.topic] = stats.by_topic.get(record.topic, 0) + 1

    def apply(self, records: list[InputRecord]) -> int:
        """Plan and write ``records``, dead-letter the poison among them; commits nothing (the
        loop commits; a replay keeps its own cursor). Returns how many were dead-lettered."""
        self._batch = records
        self._pending = []
        self._pending_access = []
        self._refused = {}
        poison: list[_Poison] = []
        heads: list[PlannedWrite] = []
        statements = self.planner.s
        for index, record in enumerate(records):
            try:
                writes = self._plan(record)
            except _PoisonError as error:
                poison.append(_Poison(record, error.source, error.code, error.message))
                continue
            for statement in writes:
                prepared = statement.prepared_statement
                if prepared in statements.quorum:
                    statement.consistency_level = ACCESS_CONSISTENCY
                if prepared is statements.sync_head:
                    heads.append(PlannedWrite(statement, index))
                elif prepared in statements.access:
                    self._pending_access.append(PlannedWrite(statement, index))
                else:
                    self._pending.append(PlannedWrite(statement, index))
        self._flush()
        # A user's head moves only after every queue entry of the batch is written: readers page
        # up to the head, so they never step over an entry that is still being written.
        self._pending = [head for head in heads if head.record not in self._refused]
        self._flush()
        for index, (code, message) in sorted(self._refused.items()):
            record = records[index]
            poison.append(_Poison(record, self._sources[record.topic], code, message))
        if poison:
            self._dead_letter(poison)
        return len(poison)

    def _plan(self, record: InputRecord) -> list[BoundStatement]:
        """Decode ``record`` and plan its writes; raises :class:`_PoisonError`."""
        source = self._sources[record.topic]
        raw = record.value
        if raw is None and source is self.catalog.push_tokens:
            # A tombstone on the compacted token topic: it carries no event and no time.
            self._skipped_tombstones += 1
            return []
        try:
            if source is self.catalog.sync_events:
                sync = _parse_sync(raw or b"")
                return self._planned(source, record, lambda: self.planner.sync(sync, raw or b""))
            event = parse_event(raw or b"")
        except SchemaError as error:
            raise _PoisonError(source, error.code, error.message) from None
        if event.type not in source.events:
            raise _PoisonError(
                source, "unexpected-type", f"{event.type} does not belong on {source.logical_name}"
            )
        if source is self.catalog.push_tokens:
            return self._planned(source, record, lambda: self.planner.push_token(event))
        if event.type.startswith("message.") and _seq(event) is None:
            raise _PoisonError(
                source, "missing-seq", f"{event.type} on the conversation log has no seq"
            )
        return self._planned(source, record, lambda: self.planner.sequenced(event, raw or b""))

    def _planned(
        self, source: Topic, record: InputRecord, plan: Callable[[], list[BoundStatement]]
    ) -> list[BoundStatement]:
        try:
            return plan()
        except (StopRequestedError, kafka_loop.FatalError):
            raise
        except MasterKeyMismatchError as error:
            raise kafka_loop.FatalError(str(error)) from error
        except Exception as error:  # a value the driver cannot bind, a rule that cannot apply
            log.exception("record %s[%d]@%d failed", record.topic, record.partition, record.offset)
            raise _PoisonError(source, PROCESSING_FAILED, repr(error)) from error

    def _flush(self) -> None:
        """Execute the pending writes (retrying transient failures); note refused records.

        Read-access facts (a member gone, a group deleted, a message recalled) first, then the
        rest: a reader never finds a timeline entry sequenced after such a fact while the fact
        itself is not yet in the store, and a command's outcome is written only once its facts
        are (docs/storage.md, "Read access")."""
        self._execute(self._pending_access)
        self._pending_access = []
        pending, self._pending = self._pending, []
        self._execute(pending)

    def _execute(self, pending: list[PlannedWrite]) -> None:
        if not pending:
            return
        for write, error in self.writer.execute(self._coalesced(pending)):
            if write.record not in self._refused:
                self._refused[write.record] = (
                    refusal_code(error),
                    f"{type(error).__name__}: {error}",
                )
                log.error(
                    "the cluster refused a write of %s[%d]@%d for good: %s",
                    self._batch[write.record].topic,
                    self._batch[write.record].partition,
                    self._batch[write.record].offset,
                    error,
                )
        self.stats.writes = self.writer.stats.writes
        self.stats.retries = self.writer.stats.retries

    def _coalesced(self, pending: list[PlannedWrite]) -> list[PlannedWrite]:
        """``pending`` without the writes a later one of them makes moot (``rules.moot``): each
        rides along with its winner, and is sent only if the winner is refused."""
        mooted = moot([write.statement for write in pending], self._statements.latest_wins)
        if not mooted:
            return pending
        overridden: dict[int, list[PlannedWrite]] = {}
        for index, winner in mooted.items():
            overridden.setdefault(winner, []).append(pending[index])
        return [
            replace(write, overrides=tuple(overridden[index])) if index in overridden else write
            for index, write in enumerate(pending)
            if index not in mooted
        ]

    def _key_query(self, statement: Any, values: tuple[Any, ...]) -> Any:
        """A query of the key ring: transient failures retried (no pending writes to wait
        for: keys are not written by the batch)."""
        return self._retrying(lambda: self.session.execute(statement, values))

    def _read(self, statement: BoundStatement) -> list[Any]:
        """A read the rules need: pending writes first, transient failures retried."""
        self._flush()
        return list(self._retrying(lambda: self.session.execute(statement)))

    def _retrying(self, query: Callable[[], Any]) -> Any:
        attempt = 0
        while True:
            try:
                return query()
            except Exception as error:
                if not is_transient(error):
                    raise
                attempt += 1
                self.writer.stats.retries += 1
                delay = self.writer.backoff.delay(attempt)
                log.warning(
                    "CQL read failed (transient), retrying in %.1fs (attempt %d): %s: %s",
                    delay,
                    attempt,
                    type(error).__name__,
                    str(error)[:300],
                )
                self._wait_for_retry(delay)

    def _dead_letter(self, poison: Sequence[_Poison]) -> None:
        """Produce the poison records to their dead-letter topics; return once all are acked."""
        remaining = list(poison)
        attempt = 0
        while remaining:
            failed: list[_Poison] = []
            for item in remaining:
                output = dead_letter(
                    self.catalog, item.source, item.record, item.code, item.message
                )
                log.warning(
                    "dead-lettering %s[%d]@%d to %s: [%s] %s",
                    item.record.topic,
                    item.record.partition,
                    item.record.offset,
                    output.topic,
                    item.code,
                    item.message[:300],
                )
                while True:
                    try:
                        self.producer.produce(
                            output.topic,
                            key=output.key,
                            value=output.value,
                            headers=[(name, value) for name, value in output.headers],
                            on_delivery=_on_delivery(item, failed),
                        )
                        break
                    except BufferError:
                        self.producer.poll(0.1)
            while self.producer.flush(1.0) > 0:
                self._keep_alive(0, pause=False)
            remaining = failed
            if remaining:
                attempt += 1
                self._wait_for_retry(self.writer.backoff.delay(attempt))

    def _commit(self, records: Sequence[InputRecord]) -> None:
        """Commit the batch's offsets (of the partitions still ours: a rebalance may have run
        while it was written, and the rest is replayed by the new owner, harmlessly).

        Commit policy: a retriable failure is retried until it lands (the batch's writes are
        done, and waiting keeps the group membership), unless the sink is stopping."""
        offsets = kafka_loop.next_offsets(records)
        attempt = 0
        while True:
            try:
                outcome = kafka_loop.commit_offsets(
                    self.consumer, offsets, held=self._assignment.partitions, logger=log
                )
            except kafka_loop.RetriableCommitError as exc:
                if self._stop.is_set():
                    raise kafka_loop.FatalError(f"commit: {exc}") from exc
                attempt += 1
                log.warning("commit failed (%s); retrying", exc)
                self._wait_for_retry(self.writer.backoff.delay(attempt))
                continue
            if outcome is kafka_loop.Commit.COMMITTED:
                self.stats.commits += 1
            return

    # -- staying in the group while the cluster is away --

    def _wait_for_retry(self, seconds: float) -> None:
        """Pause every assigned partition and keep polling for ``seconds``."""
        if self._stop.is_set():
            raise StopRequestedError
        self._pause()
        self._keep_alive(seconds, pause=True)
        if self._stop.is_set():
            raise StopRequestedError

    def _keep_alive(self, seconds: float, *, pause: bool) -> None:
        """Poll the consumer for ``seconds`` (heartbeats, rebalances); records it hands over are
        kept for the next batch."""
        deadline = time.monotonic() + seconds
        while True:
            message = self.consumer.poll(min(0.2, max(0.0, deadline - time.monotonic())))
            if message is not None:
                error = message.error()
                if error is None:
                    self._carry.append(message)
                elif error.code() != KafkaError._PARTITION_EOF:
                    log.warning("consumer: %s", error)
            if pause:
                self._pause()  # partitions assigned meanwhile
            self._maybe_report()
            if time.monotonic() >= deadline or self._stop.is_set():
                return

    def _pause(self) -> None:
        paused = {(tp.topic, tp.partition) for tp in self._paused}
        new = [
            TopicPartition(topic, partition)
            for topic, partition in sorted(self._assignment.partitions - paused)
        ]
        if new:
            self.consumer.pause(new)
            self._paused.extend(new)
            log.info("paused %d partitions while the cluster is unavailable", len(new))

    def _resume(self) -> None:
        if not self._paused:
            return
        held = self._assignment.partitions
        current = [tp for tp in self._paused if (tp.topic, tp.partition) in held]
        if current:
            self.consumer.resume(current)
        log.info("resumed %d partitions", len(current))
        self._paused = []

    # -- rebalances (inside consume/poll) --

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._assignment.assign(partitions)
        self._carry = []
        self._at_end = {}
        self._paused = []
        log.info("assigned %s", kafka_loop.describe(partitions))
        if not self.ready.is_set():
            self.ready.set()
            detail = f"group {self.group_id}, keyspace {self.keyspace}"
            log.info("%s: %s", READY_MESSAGE, detail)
            self.ready_file.announce(detail)

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        gone = self._assignment.revoke(partitions)
        self._carry = []
        self._paused = [tp for tp in self._paused if (tp.topic, tp.partition) not in gone]
        log.info("revoked %s", kafka_loop.describe(partitions))

    # -- progress --

    def _maybe_report(self) -> None:
        if time.monotonic() - self._last_progress >= PROGRESS_INTERVAL:
            self._report()

    def _report(self, *, final: bool = False) -> None:
        now = time.monotonic()
        seconds = max(now - self._last_progress, 1e-9)
        before, stats = self._reported, self.stats
        stats.retries = self.writer.stats.retries
        done = stats.records - before.records
        log.info(
            "%s%d records in %d batches (%.0f/s), %d writes, %d dead-lettered, %d skipped, "
            "%d retries%s; lag %s",
            "stopping: " if final else "",
            done,
            stats.batches - before.batches,
            done / seconds,
            stats.writes - before.writes,
            stats.dead_lettered - before.dead_lettered,
            stats.skipped - before.skipped,
            stats.retries - before.retries,
            f" (retrying since: {self.writer.stats.last_error[:200]})"
            if self._paused and self.writer.stats.last_error
            else "",
            "?" if final else self._lag(),
        )
        self._reported = SinkStats(**{**stats.__dict__, "by_topic": dict(stats.by_topic)})
        self._last_progress = now

    def _lag(self) -> str:
        """Records behind the end of the assigned partitions (from cached watermarks)."""
        if not self._assignment.partitions:
            return "-"
        try:
            positions = self.consumer.position(
                [TopicPartition(t, p) for t, p in sorted(self._assignment.partitions)]
            )
            lag = 0
            for tp in positions:
                _low, high = self.consumer.get_watermark_offsets(tp, cached=True)
                if tp.offset >= 0 and high >= 0:
                    lag += max(0, high - tp.offset)
        except KafkaException:
            return "?"
        return str(lag)


class _PoisonError(Exception):
    def __init__(self, source: Topic, code: str, message: str) -> None:
        super().__init__(f"[{code}] {message}")
        self.source = source
        self.code = str(code)
        self.message = message


def _on_delivery(
    item: _Poison, failed: list[_Poison]
) -> Callable[[KafkaError | None, Message], None]:
    def delivered(error: KafkaError | None, _message: Message) -> None:
        if error is not None:
            log.warning("dead-letter produce failed: %s", error)
            failed.append(item)

    return delivered


class _SinkReads:
    """The rules' reads, through the sink: pending writes first, retried while transient."""

    def __init__(self, sink: CqlSink) -> None:
        self.sink = sink
        self.s = sink._statements

    def message_position(self, tenant_id: str, message_id: str) -> tuple[str, int] | None:
        rows = self.sink._read(self.s.select_message.bind((tenant_id, message_id)))
        return (str(rows[0].conversation_id), int(rows[0].seq)) if rows else None

    def members(self, tenant_id: str, conversation_id: str) -> list[MemberRow]:
        rows = self.sink._read(self.s.select_members.bind((tenant_id, conversation_id)))
        return [MemberRow(user_id=row.user_id, role=row.role) for row in rows]

    def user_conversations(
        self, tenant_id: str, user_id: str, conversation_id: str | None
    ) -> list[UserConversationRow]:
        if conversation_id is None:
            statement = self.s.select_uc_all.bind((tenant_id, user_id))
        else:
            statement = self.s.select_uc.bind((tenant_id, user_id, conversation_id))
        return [
            UserConversationRow(
                conversation_id=row.conversation_id,
                role=row.role,
                last_seq=row.last_seq,
                last_message_id=row.last_message_id,
            )
            for row in self.sink._read(statement)
        ]

    def device_token(self, tenant_id: str, user_id: str, device_id: str) -> str | None:
        rows = self.sink._read(self.s.select_device.bind((tenant_id, user_id, device_id)))
        stored = rows[0].push_token if rows else None
        key_id = key_id_of(stored)
        key = self.sink.keys.find(tenant_id, key_id) if key_id else None
        return open_text(key, device_context(tenant_id, user_id, device_id), stored)

    def timeline_event(self, tenant_id: str, conversation_id: str, seq: int) -> str | None:
        bucket = seq // self.sink.planner.timeline_bucket_size
        rows = self.sink._read(
            self.s.select_timeline_event.bind((tenant_id, conversation_id, bucket, seq))
        )
        if not rows or rows[0].event is None:
            return None
        # The event without its body is all a recall needs: the sealed value's clear part.
        context = timeline_context(tenant_id, conversation_id, seq, "event")
        return open_event(None, context, str(rows[0].event))


def _parse_sync(raw: bytes) -> SyncRecord:
    try:
        return SyncRecord.model_validate_json(raw)
    except ValidationError as error:
        raise schema_error(error, raw, what="record", known_types=()) from None


def _seq(event: Event) -> int | None:
    seq = getattr(event.payload, "conversation_seq", None)
    return int(seq) if seq is not None else None


# ---------------------------------------------------------------------------------------------
# The process
# ---------------------------------------------------------------------------------------------


def connect(settings: Settings, stop: threading.Event) -> tuple[Any, Session | None]:
    """Connect to the cluster, waiting (with backoff) while it does not answer; the session is
    None when ``stop`` was set first."""
    sinks = settings.sinks
    cluster = cql_cluster(settings)
    # Reconnect to a node that came back within the retry cap, not the driver's 10 minutes.
    cluster.reconnection_policy = ExponentialReconnectionPolicy(
        base_delay=min(1.0, sinks.cql_retry_max_seconds), max_delay=sinks.cql_retry_max_seconds
    )
    backoff = retry_backoff(settings)
    while not stop.is_set():
        try:
            return cluster, cluster.connect()
        except (NoHostAvailable, DriverException, OSError) as error:
            delay = backoff.next()
            log.warning(
                "the CQL cluster at %s:%d does not answer (%s); retrying in %.1fs",
                ",".join(settings.cql.contact_points),
                settings.cql.port,
                error,
                delay,
            )
            stop.wait(delay)
    return cluster, None


def migrate_with_retry(settings: Settings, session: Session, stop: threading.Event) -> bool:
    """Apply pending migrations before consuming (a sink never writes to a missing schema);
    transient failures are waited out. Returns False if stopped first; raises MigrationError."""
    backoff = retry_backoff(settings)
    while not stop.is_set():
        try:
            applied = migrate(session, settings.cql.keyspace, settings.cql.replication_factor)
            served = serving_keyspace(session, settings.cql.keyspace)
            if served != settings.cql.keyspace:
                applied += migrate(session, served, settings.cql.replication_factor)
        except MigrationError:
            raise
        except Exception as error:
            if not is_transient(error):
                raise
            delay = backoff.next()
            log.warning("migrating failed (%s); retrying in %.1fs", error, delay)
            stop.wait(delay)
            continue
        if applied:
            log.info("applied migrations %s", ", ".join(m.label for m in applied))
        return True
    return False
