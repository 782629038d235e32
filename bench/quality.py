"""The quality checks over a seeded audit and serving store: rows/s of the datasets (directly
and through the ClickHouse sink's HTTP route), the great-expectations validation against the
same checks in plain pandas, and the whole run, measured in the same run.

    python -m bench.quality [--conversations 500] [--messages-per-conversation 100]

Seeds a chDB database of this process's own (a temporary data path) with the audit of
``conversations`` direct conversations of ``messages-per-conversation`` messages each (every
message sequenced once and in both members' sync queues), 2,000 push deliveries, and a CQL
keyspace (dropped afterwards) with every timeline row, written by the CQL sink's rules. Then:

- **datasets, direct**: the five fixed datasets on the clickhouse-connect client (SQL + rows);
- **datasets, http**: the same through ``/v1/quality/datasets`` of the analytics server
  (uvicorn in a thread of this process, as in the sink) — JSON both ways;
- **checks, raw pandas**: the same ten checks as plain pandas expressions over the frames (the
  baseline: what the answers cost without great-expectations);
- **checks, great-expectations**: the suites over the same frames, with Data Docs built;
- **whole run**: ``run_checks`` (datasets direct, CQL sample of ``--sample`` per source, suites,
  Data Docs), as ``imstream quality check`` runs it.

Results go to ``docs/bench/quality.json``. The machine has 2 cores shared with other work.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import clickhouse_connect
import pandas as pd
from cassandra.concurrent import execute_concurrent_with_args

from analytics.api import AnalyticsServer, analytics_app
from analytics.quality_api import DATASETS, DatasetParameters
from analytics.queries import Analytics
from bench.common import REPO_ROOT, Progress, run_main
from bench.harness import add_output_options, bench_parser, measure_and_report
from core.connections import cql_cluster
from core.principals import StaffRole, staff_authenticator
from core.settings import KafkaSettings, Settings
from pipelines.quality.checks import (
    CheckOptions,
    Loader,
    Thresholds,
    Topics,
    run_checks,
    validate,
)
from pipelines.quality.sources import CqlSample, DirectAuditReader, HttpAuditReader
from pipelines.staff_cli import StaffCredential
from schemas import events as ev
from schemas.topics import topic_catalog
from sinks.clickhouse.audit import AuditDecoder, KafkaRecord
from sinks.clickhouse.schema import (
    AUDIT_COLUMNS,
    AUDIT_TABLE,
    PUSH_OUTCOME_COLUMNS,
    PUSH_OUTCOMES_TABLE,
)
from sinks.clickhouse.store import ClickHouseStore
from sinks.cql.migrate import migrate
from sinks.cql.rules import Statements, micros

RESULTS_PATH = REPO_ROOT / "docs" / "bench" / "quality.json"
TENANT = "bench"
T0 = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)
T = TypeVar("T")


def timed(function: Callable[[], T]) -> tuple[T, float]:
    began = time.perf_counter()
    value = function()
    return value, time.perf_counter() - began


def seed_audit(
    store: ClickHouseStore, topics: Topics, options: argparse.Namespace, progress: Progress
) -> list[tuple[str, int, str, str, str, datetime]]:
    """The audit rows; returns the timeline entries (conversation, seq, event id, sender, raw
    JSON, time) for the CQL store."""
    catalog_decoder = AuditDecoder(topic_catalog(_settings()))
    rows: list[tuple[Any, ...]] = []
    entries: list[tuple[str, int, str, str, str, datetime]] = []
    offsets = {topics.conversation_log: 0, topics.sync_events: 0}
    sync_ids: dict[str, int] = {}

    def audit(topic: str, value: bytes, moment: datetime) -> None:
        record = KafkaRecord(topic, 0, offsets[topic], None, value, int(moment.timestamp() * 1000))
        offsets[topic] += 1
        rows.append(catalog_decoder.audit(record).row.values())

    total = options.conversations * options.messages_per_conversation
    for index in range(options.conversations):
        members = [f"u{index}a", f"u{index}b"]
        conversation = ev.direct_conversation_id(TENANT, *members)
        for seq in range(1, options.messages_per_conversation + 1):
            sender = members[seq % 2]
            moment = T0 + timedelta(milliseconds=index * 7 + seq * 997)
            message = ev.MessageSent.new(
                tenant_id=TENANT,
                actor=ev.Actor(user_id=sender, device_id=f"{sender}-phone"),
                event_id=ev.message_event_id(TENANT, sender, f"m{seq}"),
                occurred_at=moment,
                payload=ev.MessageSentPayload(
                    conversation_id=conversation,
                    client_msg_id=f"m{seq}",
                    body=ev.TextBody(text=f"message {seq}"),
                    conversation_seq=seq,
                ),
            )
            raw = ev.encode_event(message)
            audit(topics.conversation_log, raw, moment + timedelta(milliseconds=20))
            entries.append((conversation, seq, message.event_id, sender, raw.decode(), moment))
            for member in members:
                sync_ids[member] = sync_ids.get(member, 0) + 1
                record = ev.SyncRecord(
                    tenant_id=TENANT, user_id=member, sync_id=sync_ids[member], event=message
                )
                audit(
                    topics.sync_events,
                    record.model_dump_json().encode(),
                    moment + timedelta(milliseconds=40),
                )
        progress.update(f"audit rows: {len(entries)}/{total} messages")
    for start in range(0, len(rows), 50_000):
        store.client.insert(
            AUDIT_TABLE,
            rows[start : start + 50_000],
            column_names=list(AUDIT_COLUMNS),
            database=store.database,
        )
    outcomes = []
    for job in range(2000):
        provider = "apns" if job % 2 else "fcm"
        outcome = "failed" if job % 100 == 0 else "sent"
        outcomes.append(
            (
                str(uuid.uuid5(uuid.NAMESPACE_URL, f"job-{job}")),
                TENANT,
                "u0a",
                "dm-x",
                str(uuid.uuid5(uuid.NAMESPACE_URL, f"message-{job}")),
                T0,
                f"device-{job}",
                provider,
                1,
                outcome,
                200,
                None,
                T0 + timedelta(seconds=job),
            )
        )
    store.client.insert(
        PUSH_OUTCOMES_TABLE,
        outcomes,
        column_names=list(PUSH_OUTCOME_COLUMNS),
        database=store.database,
    )
    progress.done(f"audit: {len(rows)} rows, {len(outcomes)} push outcomes")
    return entries


def seed_cql(
    session: Any,
    keyspace: str,
    entries: Sequence[tuple[str, int, str, str, str, datetime]],
    bucket_size: int,
    progress: Progress,
) -> None:
    statements = Statements(session, keyspace)
    conversations: dict[str, set[str]] = {}
    for conversation, _, _, sender, _, _ in entries:
        conversations.setdefault(conversation, set()).add(sender)
    creations: list[tuple[Any, ...]] = []
    members: list[tuple[Any, ...]] = []
    for conversation, senders in conversations.items():
        users = sorted(senders)
        creations.append((TENANT, conversation, "direct", None, T0, users[0], micros(T0)))
        members.extend((TENANT, conversation, user, "member", T0, micros(T0)) for user in users)
    execute_concurrent_with_args(
        session, statements.conversation_created, creations, concurrency=64
    )
    execute_concurrent_with_args(session, statements.member, members, concurrency=64)
    timeline = [
        (
            TENANT,
            conversation,
            seq // bucket_size,
            seq,
            "message.sent",
            event_id,
            event_id,
            sender,
            moment,
            raw,
            seq,
        )
        for conversation, seq, event_id, sender, raw, moment in entries
    ]
    written, began = 0, time.monotonic()
    for start in range(0, len(timeline), 5000):
        chunk = timeline[start : start + 5000]
        execute_concurrent_with_args(session, statements.timeline_entry, chunk, concurrency=64)
        written += len(chunk)
        rate = written / (time.monotonic() - began)
        progress.update(
            f"cql timeline: {written}/{len(timeline)} ({rate:,.0f}/s, "
            f"ETA {(len(timeline) - written) / rate:.0f}s)"
        )
    progress.done(f"cql: {len(conversations)} conversations, {len(timeline)} timeline rows")


def raw_checks(frames: dict[str, pd.DataFrame], thresholds: Thresholds) -> dict[str, bool]:
    """The ten checks as plain pandas expressions (the baseline)."""
    bounds = frames["occurred_at_bounds"]
    push = frames["push_deliveries"]
    return {
        "message_ids_unique": not frames["messages"]["message_id"].duplicated().any(),
        "seq_strictly_increasing": bool(frames["conversation_log"]["seq_follows_previous"].all()),
        "sync_ids_strictly_increasing": bool(frames["sync_queue"]["sync_id_increasing"].all()),
        "occurred_at_not_before_floor": bool(
            (bounds["earliest_occurred_at"] >= pd.Timestamp(thresholds.timestamp_floor)).all()
        ),
        "occurred_at_not_ahead_of_record": bool(
            (
                bounds["max_seconds_ahead_of_record"] <= thresholds.max_clock_skew.total_seconds()
            ).all()
        ),
        "push_failure_share": bool(
            (push["failure_share"] <= thresholds.max_push_failure_share).all()
        ),
        "push_invalid_token_share": bool(
            (push["invalid_token_share"] <= thresholds.max_push_invalid_token_share).all()
        ),
        "sequenced_entries_in_timeline": bool(frames["timeline"]["in_timeline"].all()),
        "members_reference_conversations": bool(frames["members"]["conversation_exists"].all()),
        "conversations_have_members": bool(frames["conversations"]["has_members"].all()),
    }


def _settings() -> Settings:
    settings = Settings()
    return settings.model_copy(update={"kafka": KafkaSettings(topic_prefix="bench-quality-")})


def run(options: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    settings = _settings()
    catalog = topic_catalog(settings)
    topics = Topics(catalog.messages_sequenced.name, catalog.sync_events.name)
    window = CheckOptions(
        tenant=TENANT,
        since=T0 - timedelta(hours=1),
        until=T0 + timedelta(days=1),
        sample=options.sample,
        max_rows=200_000,
    )
    keyspace = f"bench_quality_{uuid.uuid4().hex[:8]}"
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as directory:
        client = clickhouse_connect.get_client(dsn=f"chdb://{directory}/chdb")
        store = ClickHouseStore(client, "bench_quality")
        cluster = cql_cluster(settings)
        session = cluster.connect()
        try:
            store.apply_schema(catalog)
            session.execute(
                f"CREATE KEYSPACE {keyspace} WITH replication = "
                "{'class': 'SimpleStrategy', 'replication_factor': 1}"
            )
            migrate(session, keyspace, 1)
            entries = seed_audit(store, topics, options, progress)
            seed_cql(session, keyspace, entries, settings.sinks.timeline_bucket_size, progress)
            results["seeded"] = {
                "sequenced_messages": len(entries),
                "sync_records": 2 * len(entries),
                "push_deliveries": 2000,
            }
            results["datasets_direct"] = _datasets(
                DirectAuditReader(client, store.database, "chDB"), topics, window, progress
            )
            app = analytics_app(Analytics(store), authenticator=staff_authenticator(settings))
            server = AnalyticsServer(app, "127.0.0.1", 0)
            server.start()
            reader = StaffCredential.of(settings, StaffRole.PLATFORM_ANALYST)
            try:
                results["datasets_http"] = _datasets(
                    HttpAuditReader(server.url, reader.header), topics, window, progress
                )
            finally:
                server.stop()
            cql = CqlSample(session, keyspace, settings.sinks.timeline_bucket_size)
            audit = DirectAuditReader(client, store.database, "chDB")
            loaded, load_seconds = timed(
                lambda: Loader(audit, cql, topics, window, lambda _line: None).load()
            )
            frames = loaded.frames
            rows = sum(len(table) for table in frames.values())
            answers, raw_seconds = timed(lambda: raw_checks(frames, window.thresholds))
            docs = Path(directory) / "docs"
            (gx_results, _index), gx_seconds = timed(
                lambda: validate(frames, window.thresholds, docs, lambda _line: None)
            )
            gx_answers = {result.check: result.success for result in gx_results}
            if gx_answers != answers:
                raise RuntimeError(f"the checks disagree: raw {answers}, gx {gx_answers}")
            results["checks"] = {
                "rows": rows,
                "load_seconds": round(load_seconds, 3),
                "raw_pandas_seconds": round(raw_seconds, 4),
                "great_expectations_seconds": round(gx_seconds, 3),
                "great_expectations_rows_per_second": round(rows / gx_seconds),
                "ratio_gx_to_raw": round(gx_seconds / raw_seconds, 1),
                "all_passed": all(answers.values()),
            }
            progress.done(
                f"checks over {rows} rows: raw pandas {raw_seconds * 1000:.1f} ms, "
                f"great-expectations {gx_seconds:.2f}s"
            )
            report, whole_seconds = timed(
                lambda: run_checks(
                    audit, cql, topics, window, Path(directory) / "docs2", lambda _line: None
                )
            )
            results["whole_run"] = {
                "seconds": round(whole_seconds, 3),
                "rows": sum(report.rows.values()),
                "expectations": len(report.results),
                "passed": report.success,
            }
            progress.done(f"whole run: {whole_seconds:.2f}s, passed={report.success}")
        finally:
            session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}")
            cluster.shutdown()
            store.close()
    return results


def _datasets(
    reader: DirectAuditReader | HttpAuditReader,
    topics: Topics,
    window: CheckOptions,
    progress: Progress,
) -> dict[str, Any]:
    measured: dict[str, Any] = {}
    for name, topic in (
        ("conversation_log", topics.conversation_log),
        ("sync_queue", topics.sync_events),
        ("occurred_at_bounds", None),
        ("push_deliveries", None),
    ):
        data = DATASETS[name]
        parameters = DatasetParameters(
            tenant=TENANT,
            since=window.since,
            until=window.until,
            limit=window.max_rows,
            topic=topic if data.reads_topic else None,
        )
        began = time.perf_counter()
        answer = reader.read(data, parameters)
        seconds = time.perf_counter() - began
        measured[name] = {
            "rows": len(answer.rows),
            "seconds": round(seconds, 3),
            "rows_per_second": round(len(answer.rows) / seconds) if seconds else None,
        }
        progress.done(f"{reader.where} {name}: {len(answer.rows)} rows in {seconds:.2f}s")
    return measured


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = bench_parser("bench.quality", __doc__)
    parser.add_argument("--conversations", type=int, default=500)
    parser.add_argument("--messages-per-conversation", type=int, default=100)
    parser.add_argument("--sample", type=int, default=100, help="CQL sample per source")
    add_output_options(parser, RESULTS_PATH)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    return measure_and_report(
        "quality",
        options,
        lambda progress: run(options, progress),
        parameters=("conversations", "messages_per_conversation", "sample"),
        note="see machine.load_average_at_start for how busy the machine was",
    )


if __name__ == "__main__":
    run_main(main)
