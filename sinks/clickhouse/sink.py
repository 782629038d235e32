"""The ClickHouse sink (``imstream run clickhouse-sink``): the audit log of every topic, and the
analytics endpoint of the process that owns the chDB data path.

Reads every catalog topic that carries events or records — every source but the three processor
state topics — and every dead-letter topic, as consumer group
``<prefix>imstream-clickhouse-sink``, ``read_committed``; writes one ``audit_events`` row per
Kafka record (schema.py, audit.py), in batches of at most ``IM_SINKS__CLICKHOUSE_BATCH_ROWS``
rows or ``IM_SINKS__CLICKHOUSE_BATCH_SECONDS`` seconds. A record of ``im.push.outcomes`` is also a
row of ``push_outcomes`` (one per push job, device and attempt), inserted with its batch.

Delivery guarantee: **exactly once per Kafka record in the audit as read with ``FINAL``** (or
after ``OPTIMIZE … FINAL``). The sink itself is at-least-once — offsets are committed only after
the insert that holds their records succeeded, a failed insert is retried with backoff and never
committed past, and a crash or a replay inserts records again — and the table's key, the
record's ``(topic, partition, offset)`` plus columns derived from the record alone, collapses
every copy of a record into one row. Key: ``(topic, partition, offset)``.

Decoding: records of the ingress's topics and of dead-letter topics are validated against their
whole schema; records of the topics only processors write are read for the audit's columns alone
(``audit.AuditDecoder``: a tenth of the CPU), the whole schema again when they do not read.

Poison: a record that does not decode is audited anyway (``event_type`` ``undecodable``, raw value
and reason kept) and logged; the loop goes on. The audit sink never dead-letters: every topic
with a dead-letter topic has a processing consumer (a stream processor, the CQL sink, the push
sender) that dead-letters its poison, and a second dead letter would be a duplicate.

The process also serves the analytics endpoint (``analytics.api``) on
``IM_SINKS__ANALYTICS_HOST:IM_SINKS__ANALYTICS_PORT``: uvicorn runs in its own thread with its
own event loop, the consumer loop runs in the main thread (as the stream worker's loops do); the
sink's inserts use the store's one thread and client, the endpoint's queries a pool of their own
(``IM_SINKS__ANALYTICS_QUERY_*``: threads, connection handles, a time budget and a bounded queue),
so queries never delay the audit. Every route but ``/healthz`` needs a staff or service token
(``IM_STAFF_AUTH__*``, ``IM_SERVICE_AUTH__*``; ``analytics.access``). SIGTERM/SIGINT: the
current batch is flushed and committed, the HTTP server stops, the process exits 0.

It also samples every consumer group's lag every 10 s into ``consumer_lag`` for the
dashboards (``analytics.lag``: a failed sample is logged and skipped).
"""

from __future__ import annotations

import gc
import logging
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from confluent_kafka import (
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    IsolationLevel,
    Message,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, OffsetSpec

from core import kafka_loop
from core.backoff import Backoff
from core.connections import (
    kafka_config,
    kafka_consumer_config,
    sink_session_config,
)
from core.groups import clickhouse_sink_group
from core.readiness import ReadyFile
from core.settings import Settings
from core.tls import server_context
from schemas.topics import DEAD_LETTER_SUFFIX, TopicCatalog, topic_catalog
from sinks.clickhouse.audit import (
    AuditDecoder,
    Audited,
    KafkaRecord,
)
from sinks.clickhouse.schema import audited_topics
from sinks.clickhouse.store import ClickHouseStore

log = logging.getLogger(__name__)

#: Exit code of ClickHouse or the analytics port unavailable (EX_UNAVAILABLE); a fatal Kafka
#: error is ``EXIT_FATAL``, as in every loop.
EXIT_UNAVAILABLE = 69
READY_MESSAGE = "clickhouse sink ready"
PROGRESS_INTERVAL = 10.0
#: How long consume waits for the first record of a batch before the loop looks around.
IDLE_POLL_SECONDS = 0.2
#: Records per consume call (a batch may take several calls).
CONSUME_CHUNK = 10_000
#: The sink's fetches: the broker answers when it holds ``fetch.min.bytes`` for the sink or after
#: ``fetch.wait.max.ms``, so that the sink's ~100 partitions are fetched a few times a second in
#: large responses rather than hundreds of times in small ones (broker and client CPU), at most
#: 200 ms added to an audit batch's age (the batch window still bounds the rest).
FETCH_CONFIG: dict[str, int] = {"fetch.wait.max.ms": 200, "fetch.min.bytes": 1_048_576}
#: The ends a caught-up check compares positions with (list_offsets specs).
_LATEST: OffsetSpec = OffsetSpec.latest()  # type: ignore[no-untyped-call]
_EARLIEST: OffsetSpec = OffsetSpec.earliest()  # type: ignore[no-untyped-call]


def retry_backoff() -> Backoff:
    """The waits between schema and insert attempts: 0.5 s, doubling up to 30 s."""
    return Backoff(0.5, 30.0)


@dataclass
class SinkStats:
    records: int = 0
    batches: int = 0
    rows_inserted: int = 0
    undecodable: int = 0
    insert_failures: int = 0
    commit_failures: int = 0


class ClickHouseSink:
    """The audit loop: consume a batch, insert its rows (poison as ``undecodable``), commit.

    Delivery guarantee: exactly once per Kafka record in ``audit_events`` read with ``FINAL``
    (inserts are at-least-once; the table's key collapses the copies). Key: the record's
    ``(topic, partition, offset)``.

    ``run`` applies the schema, then blocks until ``stop`` is set or, with ``until_caught_up``,
    until every assigned partition is consumed to its end (tests, one-off replays). One ``run``
    per instance: it closes the consumer when it returns.
    """

    def __init__(
        self,
        settings: Settings,
        store: ClickHouseStore,
        stop: threading.Event,
        *,
        catalog: TopicCatalog | None = None,
        group_id: str | None = None,
        backoff: Backoff | None = None,
        ready_file: ReadyFile | None = None,
        freeze_heap: bool = False,
    ) -> None:
        self.settings = settings
        #: The sink process's: ``gc.freeze()`` after the first insert (see ``_flush``).
        self.freeze_heap = freeze_heap
        #: Announced at the first assignment (the process's; an operator job's sink has none).
        self.ready_file = ready_file or ReadyFile(None)
        self.store = store
        self.stop = stop
        self.catalog = catalog or topic_catalog(settings)
        self.group_id = group_id or clickhouse_sink_group(settings)
        #: The sink's own (``next``/``reset``): one retry loop runs at a time, on its thread.
        self.backoff = backoff or retry_backoff()
        self.decoder = AuditDecoder(self.catalog)
        self.topics = [topic.name for topic in audited_topics(self.catalog)]
        self.stats = SinkStats()
        self.ready = threading.Event()
        self.running = False
        self._pending: list[tuple[KafkaRecord, Audited]] = []
        self._assignment = kafka_loop.Assignment()
        self._admin: AdminClient | None = None
        #: Held while a batch is inserted and committed: a rebuild's swap holds it to see the
        #: tables between two batches (``analytics.jobs``).
        self.write_lock = threading.Lock()
        self.consumer = Consumer(
            kafka_consumer_config(
                settings, self.group_id, **sink_session_config(settings), **FETCH_CONFIG
            )
        )

    # -- the loop --

    def run(
        self, *, until_caught_up: bool = False, on_started: Callable[[], None] | None = None
    ) -> SinkStats:
        """Apply the schema, then consume, insert and commit until stopped (see the class)."""
        self.running = True
        try:
            if not self._apply_schema():
                return self.stats
            if on_started is not None:
                on_started()
            kafka_loop.subscribe(self.consumer, self.topics, self._on_assign, self._on_revoke)
            log.info(
                "consuming %d topics as group %s into %s",
                len(self.topics),
                self.group_id,
                self.store.database,
            )
            self._loop(until_caught_up)
        finally:
            self.running = False
            self.consumer.close()
        return self.stats

    def _apply_schema(self) -> bool:
        """Create or update the schema, retrying while ClickHouse is unavailable; False if the
        sink was stopped first."""
        self.backoff.reset()
        while True:
            try:
                self.store.apply_schema(self.catalog)
                return True
            except Exception as error:  # e.g. the server is not up yet: wait for it
                if self.stop.is_set():
                    return False
                delay = self.backoff.next()
                log.warning(
                    "could not apply the ClickHouse schema to %s, retrying in %.1fs: %s",
                    self.store.database,
                    delay,
                    error,
                )
                self.stop.wait(delay)

    def _loop(self, until_caught_up: bool) -> None:
        last_report = time.monotonic()
        reported = replace(self.stats)
        while True:
            self._collect()
            if self._pending:
                self._flush()
            elif self.stop.is_set():
                break
            elif until_caught_up and self._caught_up():
                log.info("caught up with every assigned partition; stopping")
                break
            now = time.monotonic()
            if now - last_report >= PROGRESS_INTERVAL:
                self._report(reported, now - last_report)
                reported = replace(self.stats)
                last_report = now
        self._report(reported, max(time.monotonic() - last_report, 1e-9))

    def _collect(self) -> None:
        """Add records to the pending batch until it is full, its time is up, the topics are
        idle (nothing pending after a short wait) or the sink is stopping."""
        limit = self.settings.sinks.clickhouse_batch_rows
        window = self.settings.sinks.clickhouse_batch_seconds
        deadline: float | None = None
        while len(self._pending) < limit and not self.stop.is_set():
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return
            timeout = IDLE_POLL_SECONDS if deadline is None else deadline - now
            messages = self.consumer.consume(
                min(limit - len(self._pending), CONSUME_CHUNK), timeout=timeout
            )
            for message in messages:
                record = self._record(message)
                if record is not None:
                    self._pending.append((record, self.decoder.audit(record)))
            if not self._pending:
                return
            if deadline is None:
                deadline = now + window

    def _record(self, message: Message) -> KafkaRecord | None:
        if kafka_loop.consumer_error(message, logger=log) is not None:
            return None
        return kafka_record(message)

    def _flush(self) -> None:
        """Insert the batch's rows (poison included, as ``undecodable``), then commit."""
        batch, self._pending = self._pending, []
        self._log_poison(batch)
        with self.write_lock:
            if not self._insert(batch):
                return
            self._commit(batch)
        stats = self.stats
        if self.freeze_heap and stats.batches == 0:
            # Everything alive now (modules, schemas, the clients, what the first insert
            # imported) lives as long as the process: out of the collector's way, its full
            # collections traverse only the batches' objects (at 4,000 records/s the collector
            # took 14 µs of CPU per record, 6 µs frozen).
            gc.freeze()
        stats.records += len(batch)
        stats.batches += 1
        stats.rows_inserted += len(batch)
        stats.undecodable += sum(1 for _, audited in batch if audited.poison is not None)

    def _insert(self, batch: list[tuple[KafkaRecord, Audited]]) -> bool:
        """Insert the batch's rows, retrying with backoff; False if the sink stopped first (the
        batch is then neither inserted nor committed, and will be read again)."""
        rows = [audited.row for _, audited in batch]
        outcomes = [audited.push_outcome for _, audited in batch if audited.push_outcome]
        self.backoff.reset()
        while True:
            try:
                self.store.insert_audit(rows)
                if outcomes:
                    # After the audit, before the commit: a failure retries both inserts, and
                    # the copies collapse (both tables are keyed by what the record holds).
                    self.store.insert_push_outcomes(outcomes)
                return True
            except Exception as error:  # any failure is retried: nothing is committed past it
                self.stats.insert_failures += 1
                if self.stop.is_set():
                    log.warning(
                        "insert of %d rows failed while stopping (%s); not committed, they will "
                        "be read again",
                        len(rows),
                        error,
                    )
                    return False
                delay = self.backoff.next()
                log.warning(
                    "insert of %d rows failed, retrying in %.1fs: %s", len(rows), delay, error
                )
                self.stop.wait(delay)

    def _log_poison(self, batch: list[tuple[KafkaRecord, Audited]]) -> None:
        """Poison is audited, not dead-lettered: every topic with a dead-letter topic has a
        processing consumer (a stream processor, the CQL sink, the push sender) that
        dead-letters it; a second dead letter from the audit would be a duplicate."""
        for record, audited in batch:
            if audited.poison is not None and not record.topic.endswith(DEAD_LETTER_SUFFIX):
                log.warning(
                    "undecodable record %s[%d]@%d audited as such: %s",
                    record.topic,
                    record.partition,
                    record.offset,
                    audited.poison.message,
                )

    def _commit(self, batch: list[tuple[KafkaRecord, Audited]]) -> None:
        """Commit the batch's offsets.

        Commit policy: a failed commit is never retried nor fatal — the records are read again
        and the rows inserted again collapse with these (the table's key), so the audit goes on.
        """
        offsets = kafka_loop.next_offsets(record for record, _ in batch)
        # The consumer's position can be past the batch's last record only by transaction
        # markers and aborted records (every record consumed is in the batch): committing it
        # keeps the group's lag at zero on the stream stage's transactional topics.
        positions = self.consumer.position([TopicPartition(t, p) for t, p in offsets])
        for tp in positions:
            key = (tp.topic, tp.partition)
            offsets[key] = max(offsets[key], tp.offset)
        try:
            outcome = kafka_loop.commit_offsets(
                self.consumer, offsets, held=self._assignment.partitions, logger=log
            )
        except (kafka_loop.RetriableCommitError, kafka_loop.FatalError) as exc:
            log.warning("offset commit failed, the batch will be read again: %s", exc)
            outcome = kafka_loop.Commit.REBALANCED
        if outcome is kafka_loop.Commit.REBALANCED:
            self.stats.commit_failures += 1

    # -- rebalances and progress --

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._assignment.assign(partitions)
        log.info("assigned %d partitions", len(partitions))
        if not self.ready.is_set():
            self.ready.set()
            detail = f"group {self.group_id}, database {self.store.database}"
            log.info("%s: %s", READY_MESSAGE, detail)
            # The analytics API answers already: the sink starts it before it subscribes.
            self.ready_file.announce(detail)

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Records of partitions taken away are dropped, not inserted: their next owner reads
        # them from the committed offsets (and a copy inserted anyway would collapse).
        revoked = self._assignment.revoke(partitions)
        before = len(self._pending)
        self._pending = [
            entry for entry in self._pending if (entry[0].topic, entry[0].partition) not in revoked
        ]
        log.info(
            "revoked %d partitions; dropped %d uncommitted records of theirs",
            len(partitions),
            before - len(self._pending),
        )

    def _caught_up(self) -> bool:
        """Whether every assigned partition is consumed to its end: its last stable offset, the
        end a read_committed consumer reaches (one batched request per check)."""
        assignment = self.consumer.assignment()
        if not assignment:
            return False
        positions = {
            (tp.topic, tp.partition): tp.offset for tp in self.consumer.position(assignment)
        }
        unknown = [TopicPartition(t, p) for (t, p), offset in positions.items() if offset < 0]
        if unknown:
            # Nothing consumed there yet: caught up if the committed offset is the end, or if
            # the partition is empty.
            for tp in self.consumer.committed(unknown, timeout=10):
                positions[(tp.topic, tp.partition)] = tp.offset
        ends = self._list_offsets(positions, _LATEST)
        starts = self._list_offsets(
            {key: offset for key, offset in positions.items() if offset < 0}, _EARLIEST
        )
        for key, end in ends.items():
            position = positions[key] if positions[key] >= 0 else starts[key]
            if position < end:
                log.debug("not caught up: %s[%d] at %d of %d", *key, position, end)
                return False
        return True

    def _list_offsets(
        self, partitions: Mapping[tuple[str, int], int], spec: OffsetSpec
    ) -> dict[tuple[str, int], int]:
        if not partitions:
            return {}
        if self._admin is None:
            self._admin = AdminClient(kafka_config(self.settings))
        futures = self._admin.list_offsets(
            {TopicPartition(t, p): spec for t, p in partitions},
            isolation_level=IsolationLevel.READ_COMMITTED,
            request_timeout=10,
        )
        return {(tp.topic, tp.partition): future.result().offset for tp, future in futures.items()}

    def _report(self, before: SinkStats, seconds: float) -> None:
        stats = self.stats
        done = stats.records - before.records
        log.info(
            "%d records in %d batches (%.0f/s) inserted into %s; %d undecodable, "
            "%d insert failures, %d commit failures",
            done,
            stats.batches - before.batches,
            done / seconds,
            self.store.database,
            stats.undecodable - before.undecodable,
            stats.insert_failures - before.insert_failures,
            stats.commit_failures - before.commit_failures,
        )


def kafka_record(message: Message) -> KafkaRecord:
    """A consumed record (not an error) as plain data."""
    timestamp_type, timestamp = message.timestamp()
    return KafkaRecord(
        topic=message.topic() or "",
        partition=message.partition() or 0,
        offset=message.offset() or 0,
        key=message.key(),
        value=message.value(),
        timestamp_ms=None if timestamp_type == TIMESTAMP_NOT_AVAILABLE else timestamp,
        headers=_headers(message),
    )


def _headers(message: Message) -> list[tuple[str, bytes | None]]:
    raw = message.headers() or []
    items = raw.items() if isinstance(raw, dict) else raw
    headers: list[tuple[str, bytes | None]] = []
    for name, value in items:
        headers.append((name, value.encode() if isinstance(value, str) else value))
    return headers


def analytics_tls(settings: Settings) -> ssl.SSLContext | None:
    """The analytics endpoint's TLS (https only, TLS 1.3 at least) when it has a certificate;
    ``TlsSettingsError`` (a ValueError) when the files cannot be loaded."""
    sinks = settings.sinks
    if sinks.analytics_tls_cert_path is None or sinks.analytics_tls_key_path is None:
        return None
    return server_context(sinks.analytics_tls_cert_path, sinks.analytics_tls_key_path)
