"""Dashboard query latency over a large audit on chDB: every panel of dashboards/, timed.

    python -m bench.dashboards [--rows 10000000] [--runs 7] [--keep PATH]

In this process, on a chDB data path of its own (a temporary directory, deleted afterwards unless
``--keep``), the benchmark applies the sink's schema (``sinks.clickhouse.schema``) and fills it
with ``--rows`` synthetic audit rows by ``INSERT … SELECT … FROM numbers()`` — 30 days of traffic
of 40 tenants of skewed size (the biggest ~25x the median), 200,000 users, 20,000 conversations a
tenant (a third groups), with the record mix the sink writes: every message on
``im.messages.in`` and ``im.messages.sequenced``, ~1.7 sync-queue entries per message, presence,
conversation lifecycle and membership events, push jobs, dead letters — plus push outcomes and
a lag sample of six consumer groups every 10 s for the 30 days. Merges are left to run their
course before timing (``OPTIMIZE … FINAL`` is not run: the dashboards read with ``FINAL``, as
they would between merges).

Then every panel's SQL is rendered as the built-in page renders it (``dashboards.macros``) and run
``--runs`` times after one warm-up, for two views: the dashboard's default range and the widest
(30 days), all tenants; and once for one tenant. Reported per panel: p50 and p99 (of the runs) in
milliseconds, and the ratio to the **raw baseline** measured in the same run: a full scan of the
same rows without ``FINAL`` (``SELECT count(), max(occurred_at), uniq(tenant_id) FROM
audit_events``), the least work any question over all the rows costs. Results go to
``docs/bench/dashboards.json``.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import clickhouse_connect
from clickhouse_connect.driver.client import Client

from analytics.dashboards_page import INTERVALS, MAX_BUCKETS, QUERY_SETTINGS
from bench.common import (
    REPO_ROOT,
    Progress,
    machine_facts,
    now_iso,
    require_chdb_path_free,
    run_main,
    write_results,
)
from bench.harness import bench_parser
from core.settings import Settings
from dashboards.definitions import Panel, TimeRange, load_dashboards
from dashboards.macros import bound_sql
from schemas.topics import TopicCatalog, topic_catalog
from sinks.clickhouse.schema import (
    AUDIT_TABLE,
    CONSUMER_LAG_TABLE,
    PUSH_OUTCOMES_TABLE,
    apply_schema,
    sql_string,
)

RESULTS_PATH = REPO_ROOT / "docs" / "bench" / "dashboards.json"
DATABASE = "bench_dashboards"
DAYS = 30
TENANTS = 40
USERS = 200_000
CONVERSATIONS_PER_TENANT = 20_000
#: Rows per INSERT … SELECT (progress and memory).
CHUNK = 1_000_000
#: The views timed: label → (range in seconds, None: the dashboard's default; tenant).
VIEWS: dict[str, tuple[int | None, str | None]] = {
    "default": (None, None),
    "30d": (TimeRange.DAYS_30.seconds, None),
    "30d_one_tenant": (TimeRange.DAYS_30.seconds, "tenant-0"),
}


def interval_for(span_seconds: float, panel: Panel) -> int:
    fitting = next((s for s in INTERVALS if span_seconds / s <= MAX_BUCKETS), INTERVALS[-1])
    return max(fitting, panel.spec.min_interval_seconds)


def _audit_select(
    catalog: TopicCatalog, start: datetime, first: int, count: int, total: int
) -> str:
    """``count`` audit rows from row ``first`` of ``total``, spread evenly over the 30 days.

    Each row's kind is drawn from its number's hash: 26% inbound messages, 26% their sequenced
    copies, 44% sync-queue entries, 2% presence, 0.5% conversations created, 0.4% members
    added, 0.1% removed or left, 0.9% push jobs, 0.1% dead letters."""
    span_us = DAYS * 86_400 * 1_000_000
    topics = {
        "in": sql_string(catalog.messages_in.name),
        "seq": sql_string(catalog.messages_sequenced.name),
        "sync": sql_string(catalog.sync_events.name),
        "presence": sql_string(catalog.presence.name),
        "jobs": sql_string(catalog.push_jobs.name),
        "dlq": sql_string(catalog.messages_in.dead_letter or catalog.messages_in.name + ".dlq"),
    }
    return f"""
SELECT
    topic, partition, offset, NULL AS record_key,
    occurred_at + toIntervalMillisecond(if(topic = {topics["in"]}, 0, 3 + h % 40))
        AS record_timestamp,
    generateUUIDv4(number) AS event_id, event_type, tenant_id,
    if(event_type IN ('device.connected', 'push.job'), NULL, conversation_id) AS conversation_id,
    user_id, if(topic = {topics["sync"]}, number, NULL) AS sync_id,
    if(topic = {topics["seq"]}, number, NULL) AS conversation_seq, occurred_at,
    if(topic = {topics["dlq"]}, 'schema-invalid', NULL) AS error_code,
    if(topic = {topics["dlq"]}, 'payload: field required', NULL) AS error_message,
    if(topic = {topics["dlq"]}, {topics["in"]}, NULL) AS error_source_topic,
    if(topic = {topics["dlq"]}, toUInt32(h % 6), NULL) AS error_source_partition,
    if(topic = {topics["dlq"]}, number, NULL) AS error_source_offset,
    multiIf(
        event_type = 'conversation.created',
        concat('{{"type":"conversation.created","payload":{{"conversation_id":"', conversation_id,
               '","kind":"', if(is_group, 'group', 'direct'), '","members":[',
               arrayStringConcat(arrayMap(i -> concat('"u', toString(i), '"'),
                                          range(if(is_group, 3 + (h % 7) * (h % 5 + 1), 2))), ','),
               ']}}}}'),
        topic = {topics["sync"]},
        concat('{{"event":{{"type":"message.sent","actor":{{"user_id":"u',
               toString(bitShiftRight(h, 8) % {USERS}), '"}}}}}}'),
        topic = {topics["jobs"]}, '{{"merged_count":2}}',
        '{{}}') AS raw,
    occurred_at + toIntervalMillisecond(40 + h % 400) AS ingested_at
FROM
(
    SELECT
        number,
        cityHash64(number) AS h,
        h % 10000 AS kind,
        toDateTime64({sql_string(start.strftime("%Y-%m-%d %H:%M:%S"))}, 6, 'UTC')
            + toIntervalMicrosecond(toUInt64(number * {span_us / total!r})) AS occurred_at,
        concat('tenant-',
               toString(toUInt32(pow(bitShiftRight(h, 16) % 1000 / 1000, 3) * {TENANTS})))
            AS tenant_id,
        bitShiftRight(h, 24) % {CONVERSATIONS_PER_TENANT} AS conversation_number,
        conversation_number % 3 = 0 AS is_group,
        concat(if(is_group, 'g-', 'dm-'), toString(conversation_number)) AS conversation_id,
        concat('u', toString(bitShiftRight(h, 32) % {USERS})) AS user_id,
        multiIf(kind < 2600, {topics["in"]}, kind < 5200, {topics["seq"]},
                kind < 9600, {topics["sync"]}, kind < 9800, {topics["presence"]},
                kind < 9850, {topics["seq"]}, kind < 9890, {topics["seq"]},
                kind < 9900, {topics["seq"]}, kind < 9990, {topics["jobs"]}, {topics["dlq"]})
            AS topic,
        multiIf(kind < 9600, 'message.sent', kind < 9800, 'device.connected',
                kind < 9850, 'conversation.created', kind < 9890, 'conversation.member_added',
                kind < 9900, 'conversation.left', kind < 9990, 'push.job', 'undecodable')
            AS event_type,
        toUInt32(h % 6) AS partition,
        number AS offset
    FROM numbers({first}, {count})
)
"""


def fill(client: Client, catalog: TopicCatalog, rows: int, progress: Progress) -> datetime:
    """Fill the bench database; returns the end of the 30 days (now)."""
    end = datetime.now(UTC).replace(microsecond=0)
    start = end - timedelta(days=DAYS)
    columns = (
        "topic, partition, offset, record_key, record_timestamp, event_id, event_type, "
        "tenant_id, conversation_id, user_id, sync_id, conversation_seq, occurred_at, "
        "error_code, error_message, error_source_topic, error_source_partition, "
        "error_source_offset, raw, ingested_at"
    )
    began = time.monotonic()
    done = 0
    while done < rows:
        count = min(CHUNK, rows - done)
        client.command(
            f"INSERT INTO {DATABASE}.{AUDIT_TABLE} ({columns}) "
            + _audit_select(catalog, start, done, count, rows)
        )
        done += count
        elapsed = time.monotonic() - began
        rate = done / elapsed
        progress.update(
            f"audit rows {done:,}/{rows:,} ({rate:,.0f}/s, ETA {(rows - done) / rate:,.0f} s)"
        )
    progress.done(f"audit: {rows:,} rows in {time.monotonic() - began:.1f} s")
    outcomes = max(rows // 50, 1000)
    span_s = DAYS * 86_400
    client.command(
        f"""
INSERT INTO {DATABASE}.{PUSH_OUTCOMES_TABLE}
    (job_id, tenant_id, user_id, conversation_id, message_id, job_occurred_at, device_id,
     provider, attempt, outcome, status_code, reason, attempted_at)
SELECT generateUUIDv4(number), concat('tenant-', toString(h % {TENANTS})),
       concat('u', toString(h % {USERS})), concat('g-', toString(h % 1000)),
       generateUUIDv4(number + 1), t, concat('d', toString(h % 100000)),
       if(h % 2 = 0, 'apns', 'fcm'), 1,
       multiIf(h % 100 < 93, 'sent', h % 100 < 96, 'invalid_token', h % 100 < 98, 'throttled',
               'failed'),
       200, NULL, t + toIntervalMillisecond(h % 900)
FROM (SELECT number, cityHash64(number, 7) AS h,
             toDateTime64({sql_string(start.strftime("%Y-%m-%d %H:%M:%S"))}, 6, 'UTC')
                 + toIntervalSecond(intDiv(number * {span_s}, {outcomes})) AS t
      FROM numbers({outcomes}))
"""
    )
    samples = span_s // 10
    client.command(
        f"""
INSERT INTO {DATABASE}.{CONSUMER_LAG_TABLE} (sampled_at, process, group_id, lag)
SELECT toDateTime64({sql_string(start.strftime("%Y-%m-%d %H:%M:%S"))}, 3, 'UTC')
           + toIntervalSecond(intDiv(number, 6) * 10),
       ['stream-worker', 'stream-worker', 'cql-sink', 'clickhouse-sink', 'push-sink',
        'push-sink'][number % 6 + 1],
       concat('imstream-group-', toString(number % 6)),
       cityHash64(number) % 500
FROM numbers({samples * 6})
"""
    )
    progress.done(f"push outcomes: {outcomes:,} rows; consumer lag: {samples * 6:,} samples")
    return end


def timed(client: Client, sql: str, parameters: dict[str, Any], runs: int) -> list[float]:
    client.query(sql, parameters=parameters, settings=QUERY_SETTINGS)  # warm-up
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        client.query(sql, parameters=parameters, settings=QUERY_SETTINGS)
        times.append((time.perf_counter() - began) * 1000)
    return times


def percentile(values: list[float], level: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(level * len(ordered)))]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(statistics.median(values), 1),
        "p99_ms": round(percentile(values, 0.99), 1),
    }


def run(rows: int, runs: int, keep: Path | None) -> dict[str, Any]:
    progress = Progress()
    path = keep or Path(tempfile.mkdtemp(prefix="bench-dashboards-"))
    settings = Settings()
    catalog = topic_catalog(settings)
    client = clickhouse_connect.get_client(dsn=f"chdb://{path}")
    try:
        apply_schema(client, DATABASE, catalog)
        end = fill(client, catalog, rows, progress)
        stored = int(
            client.query(f"SELECT count() FROM {DATABASE}.{AUDIT_TABLE}").result_rows[0][0]
        )
        parts = int(
            client.query(
                "SELECT count() FROM system.parts WHERE active AND database = {db:String} "
                "AND table = {table:String}",
                parameters={"db": DATABASE, "table": AUDIT_TABLE},
            ).result_rows[0][0]
        )
        progress.done(f"{stored:,} audit rows stored in {parts} active parts")
        baseline_sql = (
            f"SELECT count(), max(occurred_at), uniq(tenant_id) FROM {DATABASE}.{AUDIT_TABLE}"
        )
        baseline = summary(timed(client, baseline_sql, {}, runs))
        progress.done(f"raw baseline (full scan, no FINAL): p50 {baseline['p50_ms']} ms")
        dashboards = load_dashboards()
        panels: list[dict[str, Any]] = []
        total = sum(len(d.panels) for d in dashboards) * len(VIEWS)
        began = time.monotonic()
        for dashboard in dashboards:
            for panel in dashboard.panels:
                entry: dict[str, Any] = {"dashboard": dashboard.name, "panel": panel.id}
                for label, (seconds, tenant) in VIEWS.items():
                    start = end - timedelta(
                        seconds=seconds or dashboard.layout.default_range.seconds
                    )
                    interval = interval_for((end - start).total_seconds(), panel)
                    query = bound_sql(
                        panel.sql,
                        database=DATABASE,
                        start=start,
                        end=end,
                        interval_seconds=interval,
                        tenant=tenant,
                    )
                    figures = summary(timed(client, query.sql, query.parameters, runs))
                    figures["ratio_to_baseline"] = round(figures["p50_ms"] / baseline["p50_ms"], 2)
                    entry[label] = figures
                    done = len(panels) * len(VIEWS) + len(entry) - 2
                    rate = done / (time.monotonic() - began)
                    progress.update(
                        f"{dashboard.name}/{panel.id} {label}: p50 {figures['p50_ms']} ms "
                        f"({done}/{total}, ETA {(total - done) / rate:.0f} s)"
                    )
                panels.append(entry)
                progress.done(
                    f"{dashboard.name}/{panel.id}: "
                    + ", ".join(f"{label} p50 {entry[label]['p50_ms']} ms" for label in VIEWS)
                )
        return {
            "recorded_at": now_iso(),
            "rows": rows,
            "stored_rows": stored,
            "active_parts": parts,
            "days": DAYS,
            "tenants": TENANTS,
            "runs": runs,
            "views": {
                "default": "the dashboard's default range (Activity 6h, Delivery 1h), all tenants",
                "30d": "the last 30 days (every row), all tenants",
                "30d_one_tenant": "the last 30 days, the biggest tenant (tenant-0)",
            },
            "baseline": {"sql": baseline_sql, **baseline},
            "panels": panels,
            "machine": machine_facts(settings),
        }
    finally:
        client.close()
        if keep is None:
            shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("bench.dashboards", __doc__)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--keep", type=Path, default=None, help="chDB path to fill and keep")
    parser.add_argument("--no-write", action="store_true", help="do not write the results file")
    options = parser.parse_args(argv)
    if options.keep is not None:
        require_chdb_path_free(options.keep, "give --keep another directory")
    results = run(options.rows, options.runs, options.keep)
    if not options.no_write:
        write_results("dashboards", results, RESULTS_PATH)
        sys.stderr.write(f"results written to {RESULTS_PATH}\n")
    return 0


if __name__ == "__main__":
    run_main(main)
