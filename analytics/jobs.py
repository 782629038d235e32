"""Operator jobs that write ClickHouse, run inside the process that owns it.

chDB allows one process per data path, so a replay into the audit or a rebuild of it runs here,
started and watched over the operator API (``analytics.operator_api``) by ``imstream
replay --into clickhouse`` and ``imstream rebuild clickhouse``. Both use the sink's own decoding
(``AuditDecoder``) and inserts, through the store's one thread.

* **Replay** (``core.replay``): a topic range into ``audit_events`` (and ``push_outcomes``);
  a record already there collapses with its copy (the key is its ``(topic, partition, offset)``),
  so the tables read the same after any number of replays.
* **Rebuild**: a fresh database ``<database>__rebuild_<run id>`` gets the same schema and is
  filled from the topics by a second sink loop (its own consumer group, from the beginning or —
  with ``since`` — from the first record at or after that time, the older rows copied from the
  live tables). Then the swap: with the live sink held between two batches (``write_lock``), the
  rebuild reads to the end once more and every table is exchanged with its live twin
  (``EXCHANGE TABLES``, atomic). The views keep their names and read the rebuilt tables; the
  previous tables stay in the rebuild database for a rollback until the operator drops it.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from confluent_kafka import Consumer, KafkaException, Message, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from core.connections import kafka_config, kafka_consumer_config
from core.groups import clickhouse_rebuild_group
from core.replay import PartitionRange, ReplayError, ReplayProgress, replay
from core.settings import Settings
from schemas.topics import TopicCatalog
from sinks.clickhouse.audit import AuditDecoder
from sinks.clickhouse.schema import (
    AUDIT_TABLE,
    PUSH_OUTCOMES_TABLE,
    SEARCH_TABLE,
    audited_topics,
    quote_identifier,
)
from sinks.clickhouse.sink import ClickHouseSink, kafka_record
from sinks.clickhouse.store import ClickHouseStore

log = logging.getLogger(__name__)

#: Tables a rebuild fills and swaps: the audit, the push outcomes and the message search table
#: (filled from the audit by its materialized view). The views and the feed refer to tables by
#: name, so they follow the swap; ``consumer_lag`` holds samples, not records: it stays.
REBUILT_TABLES = (AUDIT_TABLE, PUSH_OUTCOMES_TABLE, SEARCH_TABLE)

JobKind = Literal["replay", "rebuild"]
JobState = Literal["running", "finished", "interrupted", "failed"]


@dataclass
class Job:
    """One operator job and what it reports."""

    id: str
    kind: JobKind
    run_id: str
    arguments: dict[str, Any]
    state: JobState = "running"
    phase: str = "starting"
    total: int = 0
    done: int = 0
    records: int = 0
    rate: float = 0.0
    eta_seconds: float | None = None
    counts: dict[str, int] = field(default_factory=dict)
    error_code: str | None = None
    error: str | None = None
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    finished_at: datetime | None = None
    stop: threading.Event = field(default_factory=threading.Event, repr=False)

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "run_id": self.run_id,
            "arguments": self.arguments,
            "state": self.state,
            "phase": self.phase,
            "total": self.total,
            "done": self.done,
            "records": self.records,
            "rate": round(self.rate, 1),
            "eta_seconds": None if self.eta_seconds is None else round(self.eta_seconds, 1),
            "counts": self.counts,
            "error_code": self.error_code,
            "error": self.error,
            "started_at": self.started_at.isoformat(),
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
        }

    def track(self, progress: ReplayProgress) -> None:
        self.total, self.done, self.records = progress.total, progress.done, progress.records
        self.rate, self.eta_seconds = progress.rate, progress.eta


class AuditTarget:
    """Replay target: the sink's decoding and inserts into ``store``'s database."""

    name = "clickhouse"

    def __init__(self, store: ClickHouseStore, catalog: TopicCatalog) -> None:
        self.store = store
        self.decoder = AuditDecoder(catalog)

    def apply(self, messages: Sequence[Message]) -> None:
        audited = [self.decoder.audit(kafka_record(message)) for message in messages]
        self.store.insert_audit([entry.row for entry in audited])
        outcomes = [entry.push_outcome for entry in audited if entry.push_outcome is not None]
        if outcomes:
            self.store.insert_push_outcomes(outcomes)

    def close(self) -> None:
        return None


class OperatorJobs:
    """The jobs of this process: at most one running per run id (asking again returns it)."""

    def __init__(
        self,
        settings: Settings,
        store: ClickHouseStore,
        catalog: TopicCatalog,
        *,
        live_sink: ClickHouseSink | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.catalog = catalog
        self.live_sink = live_sink
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._audited = {topic.name for topic in audited_topics(catalog)}

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def stop_all(self) -> None:
        for job in self._jobs.values():
            job.stop.set()

    def _start(
        self, kind: JobKind, run_id: str, arguments: dict[str, Any], work: Callable[[Job], None]
    ) -> Job:
        with self._lock:
            for job in self._jobs.values():
                if job.run_id == run_id and job.kind == kind and job.state == "running":
                    return job
            job = Job(id=uuid.uuid4().hex[:12], kind=kind, run_id=run_id, arguments=arguments)
            self._jobs[job.id] = job

        def body() -> None:
            try:
                work(job)
                if job.state == "running":
                    job.state = "interrupted" if job.stop.is_set() else "finished"
            except ReplayError as error:
                job.state, job.error_code, job.error = "failed", error.code, error.message
            except Exception as error:  # reported to the operator, with the traceback logged
                log.exception("%s job %s failed", kind, job.id)
                job.state, job.error_code, job.error = "failed", "job-failed", repr(error)
            finally:
                job.finished_at = datetime.now(UTC)
                log.info("%s job %s (run %s): %s", kind, job.id, run_id, job.state)

        threading.Thread(target=body, name=f"{kind}-{job.id}", daemon=True).start()
        return job

    # -- replay --

    def start_replay(
        self, ranges: Sequence[PartitionRange], run_id: str, rate: float | None
    ) -> Job:
        foreign = sorted({r.topic for r in ranges} - self._audited)
        if foreign:
            raise ReplayError(
                "topic-not-read-by-target",
                f"the ClickHouse audit does not read {', '.join(foreign)}",
            )
        arguments = {"ranges": [r.as_json() for r in ranges], "rate": rate}

        def work(job: Job) -> None:
            job.phase = "replaying"
            result = replay(
                self.settings,
                ranges,
                AuditTarget(self.store, self.catalog),
                run_id=run_id,
                rate=rate,
                stop=job.stop,
                progress=job.track,
            )
            job.counts = result.counts()
            if not result.finished:
                job.state = "interrupted"

        return self._start("replay", run_id, arguments, work)

    # -- rebuild --

    def rebuild_database(self, run_id: str) -> str:
        name = f"{self.store.database}__rebuild_{run_id}"
        quote_identifier(name)
        return name

    def start_rebuild(self, run_id: str, since: datetime | None) -> Job:
        arguments = {"since": since.isoformat() if since else None}
        return self._start("rebuild", run_id, arguments, lambda job: self._rebuild(job, since))

    def _rebuild(self, job: Job, since: datetime | None) -> None:
        live = self.store.database
        fresh = self.rebuild_database(job.run_id)
        group = clickhouse_rebuild_group(self.settings, job.run_id)
        target = self.store.sibling(fresh)
        job.phase = "schema"
        target.apply_schema(self.catalog)
        if since is not None and not self._group_started(group):
            job.phase = "copying rows before the start"
            starts = self._starts_at(since)
            job.counts["rows_copied"] = self._copy_before(live, fresh, starts)
            self._commit_starts(group, starts)
        job.phase = "reading the topics"
        watcher = self._watch(job, group)
        try:
            stats = ClickHouseSink(
                self.settings, target, job.stop, catalog=self.catalog, group_id=group
            ).run(until_caught_up=True)
        finally:
            watcher.set()
        job.counts["records"] = stats.records
        if job.stop.is_set():
            return
        job.phase = "swapping"
        lock = self.live_sink.write_lock if self.live_sink is not None else threading.Lock()
        with lock:
            final = ClickHouseSink(
                self.settings, target, job.stop, catalog=self.catalog, group_id=group
            ).run(until_caught_up=True)
            job.counts["records"] += final.records
            if job.stop.is_set():
                return
            for table in REBUILT_TABLES:
                self._command(
                    f"EXCHANGE TABLES {quote_identifier(live)}.{quote_identifier(table)} "
                    f"AND {quote_identifier(fresh)}.{quote_identifier(table)}"
                )
        for table in REBUILT_TABLES:
            job.counts[f"{table}_rows"] = self._rows(live, table)
            job.counts[f"{table}_rows_before"] = self._rows(fresh, table)
        job.phase = f"swapped; the previous tables are kept in database {fresh}"
        job.arguments["previous_tables_database"] = fresh

    def _watch(self, job: Job, group: str) -> threading.Event:
        """Report the rebuild's progress (records consumed by its group) every second."""
        done = threading.Event()
        started = time.monotonic()

        def loop() -> None:
            while not done.wait(1.0):
                try:
                    job.done, job.total = self._group_progress(group)
                except KafkaException:
                    continue
                job.records = job.done
                elapsed = max(time.monotonic() - started, 1e-9)
                job.rate = job.done / elapsed
                job.eta_seconds = (
                    (job.total - job.done) / job.rate if job.rate > 0 and job.total else None
                )

        threading.Thread(target=loop, name=f"rebuild-progress-{job.id}", daemon=True).start()
        return done

    def _topic_partitions(self) -> list[TopicPartition]:
        admin = AdminClient(kafka_config(self.settings))
        metadata = admin.list_topics(timeout=10).topics
        return [
            TopicPartition(name, partition)
            for name in sorted(self._audited)
            if name in metadata and metadata[name].error is None
            for partition in sorted(metadata[name].partitions)
        ]

    def _group_progress(self, group: str) -> tuple[int, int]:
        consumer = Consumer(kafka_consumer_config(self.settings, group))
        try:
            partitions = self._topic_partitions()
            committed = consumer.committed(partitions, timeout=10)
            done = total = 0
            for tp in committed:
                low, high = consumer.get_watermark_offsets(tp, timeout=10, cached=False)
                total += high - low
                done += max(tp.offset - low, 0) if tp.offset >= 0 else 0
            return done, total
        finally:
            consumer.close()

    def _group_started(self, group: str) -> bool:
        consumer = Consumer(kafka_consumer_config(self.settings, group))
        try:
            committed = consumer.committed(self._topic_partitions(), timeout=10)
            return any(tp.offset >= 0 for tp in committed)
        finally:
            consumer.close()

    def _starts_at(self, since: datetime) -> dict[tuple[str, int], int]:
        admin = AdminClient(kafka_config(self.settings))
        partitions = self._topic_partitions()
        stamp = int(since.timestamp() * 1000)
        at = admin.list_offsets({tp: OffsetSpec.for_timestamp(stamp) for tp in partitions})
        ends = admin.list_offsets(
            {tp: OffsetSpec.latest() for tp in partitions}  # type: ignore[no-untyped-call]
        )
        starts = {}
        for tp, future in at.items():
            offset = future.result().offset
            if offset < 0:
                offset = ends[tp].result().offset
            starts[(tp.topic, tp.partition)] = offset
        return starts

    def _copy_before(self, live: str, fresh: str, starts: dict[tuple[str, int], int]) -> int:
        """Copy the live audit rows of the records before each partition's start, and every
        push outcome row (the rows the rebuild derives again replace their copies: the table
        keeps the latest ``recorded_at`` per key)."""
        keys = [f"{topic}:{partition}" for (topic, partition) in starts]
        values = list(starts.values())
        audit = (
            f"INSERT INTO {quote_identifier(fresh)}.{AUDIT_TABLE} "
            "WITH mapFromArrays({keys:Array(String)}, {values:Array(UInt64)}) AS m "
            f"SELECT * FROM {quote_identifier(live)}.{AUDIT_TABLE} FINAL "
            "WHERE offset < if(mapContains(m, concat(topic, ':', toString(partition))), "
            "m[concat(topic, ':', toString(partition))], 18446744073709551615)"
        )
        outcomes = (
            f"INSERT INTO {quote_identifier(fresh)}.{PUSH_OUTCOMES_TABLE} "
            f"SELECT * FROM {quote_identifier(live)}.{PUSH_OUTCOMES_TABLE} FINAL"
        )
        self._command(audit, {"keys": keys, "values": values})
        self._command(outcomes)
        copied = self._rows(fresh, AUDIT_TABLE)
        log.info("copied %d audit rows from before the rebuild's start", copied)
        return copied

    def _commit_starts(self, group: str, starts: dict[tuple[str, int], int]) -> None:
        consumer = Consumer(kafka_consumer_config(self.settings, group))
        try:
            consumer.commit(
                offsets=[TopicPartition(t, p, o) for (t, p), o in starts.items()],
                asynchronous=False,
            )
        finally:
            consumer.close()

    def _command(self, sql: str, parameters: dict[str, Any] | None = None) -> None:
        self.store.call(lambda client: client.command(sql, parameters=parameters))

    def _rows(self, database: str, table: str) -> int:
        result = self.store.query(
            f"SELECT count() FROM {quote_identifier(database)}.{quote_identifier(table)} FINAL"
        )
        return int(result.result_rows[0][0])
