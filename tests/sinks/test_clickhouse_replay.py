"""Replays into the ClickHouse audit and rebuilds of it, as the ClickHouse-owning process runs
them (``analytics.jobs``), on the real Kafka and chDB; the operator API's role check."""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

import httpx
import pytest
from clickhouse_connect.driver.client import Client

from analytics.api import AnalyticsServer
from analytics.jobs import Job, OperatorJobs
from analytics.operator_api import install_operator_api
from analytics.queries import Analytics
from core.auth import issue_token
from core.replay import resolve_ranges
from core.settings import Settings
from schemas.events import SYSTEM_TENANT
from schemas.topics import topic_catalog
from sinks.clickhouse.schema import AUDIT_TABLE, SEARCH_TABLE, audited_topics
from sinks.clickhouse.sink import ClickHouseSink
from sinks.clickhouse.store import ClickHouseStore
from tests.sinks.staff_support import staff_app
from tests.sinks.test_clickhouse_sink import audit_rows, produce_scenario, raw_count

pytestmark = pytest.mark.stack

JOB_TIMEOUT = 90.0


def sequenced(rows: list[dict[str, Any]], settings: Settings, event_types: set[str]) -> int:
    """How many of the audit ``rows`` are of ``event_types`` on the sequenced messages topic."""
    topic = topic_catalog(settings).messages_sequenced.name
    return sum(1 for row in rows if row["topic"] == topic and row["event_type"] in event_types)


@pytest.fixture
def live(sink_settings: Settings, store: ClickHouseStore) -> ClickHouseSink:
    """The scenario of the sink tests, audited once by a live sink loop."""
    produce_scenario(sink_settings, topic_catalog(sink_settings))
    sink = ClickHouseSink(sink_settings, store, threading.Event())
    sink.run(until_caught_up=True)
    return sink


@pytest.fixture
def jobs(sink_settings: Settings, store: ClickHouseStore, live: ClickHouseSink) -> OperatorJobs:
    """The operator's jobs beside the live sink (a job holds its writes off by its lock)."""
    return OperatorJobs(sink_settings, store, topic_catalog(sink_settings), live_sink=live)


def stored(client: Client, database: str) -> list[dict[str, Any]]:
    """The audit as readers see it, without the insert time (a rebuild inserts anew)."""
    return [
        {name: value for name, value in row.items() if name != "ingested_at"}
        for row in audit_rows(client, database)
    ]


def wait(job: Job) -> Job:
    deadline = time.monotonic() + JOB_TIMEOUT
    while job.state == "running":
        assert time.monotonic() < deadline, f"job {job.as_json()} did not end"
        time.sleep(0.1)
    assert job.state == "finished", job.as_json()
    return job


def test_a_topic_range_replayed_into_the_audit_twice_leaves_it_as_it_was(
    sink_settings: Settings, store: ClickHouseStore, clickhouse: Client, jobs: OperatorJobs
) -> None:
    before = stored(clickhouse, store.database)
    copies_before = raw_count(clickhouse, store.database)
    catalog = topic_catalog(sink_settings)
    ranges = [
        r
        for topic in (catalog.messages_sequenced, catalog.messages_in)
        for r in resolve_ranges(sink_settings, topic.name)
    ]
    total = sum(r.size for r in ranges)
    assert total > 0
    for run in ("first", "second"):
        job = wait(jobs.start_replay(ranges, f"{run}_{uuid.uuid4().hex[:6]}", rate=None))
        assert job.counts["replayed"] > 0
        assert job.done == total
    # Every record was inserted again twice, and reads as one row.
    assert raw_count(clickhouse, store.database) > copies_before
    assert stored(clickhouse, store.database) == before


def test_a_rebuild_reproduces_the_live_tables_and_swaps_them_in(
    sink_settings: Settings, store: ClickHouseStore, clickhouse: Client, jobs: OperatorJobs
) -> None:
    before = stored(clickhouse, store.database)
    run = uuid.uuid4().hex[:8]
    job = wait(jobs.start_rebuild(run, since=None))
    fresh = jobs.rebuild_database(run)
    try:
        assert stored(clickhouse, store.database) == before
        # The swap: the live name holds new rows, the previous ones are kept for a rollback.
        assert job.counts[f"{AUDIT_TABLE}_rows"] == len(before)
        assert job.counts[f"{AUDIT_TABLE}_rows_before"] == len(before)
        inserted = clickhouse.query(
            f"SELECT min(ingested_at) FROM {store.database}.{AUDIT_TABLE}"
        ).result_rows[0][0]
        kept = clickhouse.query(f"SELECT max(ingested_at) FROM {fresh}.{AUDIT_TABLE}").result_rows[
            0
        ][0]
        assert inserted > kept
        # The message search table was rebuilt and swapped with the audit it is fed from.
        searched = clickhouse.query(
            f"SELECT count() FROM {store.database}.{SEARCH_TABLE}"
        ).result_rows[0][0]
        assert searched == sequenced(
            before, sink_settings, {"message.sent", "message.edited", "message.recalled"}
        )
        assert job.counts[f"{SEARCH_TABLE}_rows"] == searched
        # The views read the swapped tables by name.
        views = clickhouse.query(
            f"SELECT sum(messages) FROM {store.database}.messages_per_minute"
        ).result_rows[0][0]
        assert views == sequenced(before, sink_settings, {"message.sent"})
    finally:
        clickhouse.command(f"DROP DATABASE IF EXISTS {fresh}")


def test_a_rebuild_from_a_point_in_time_copies_the_older_rows_and_reads_the_rest(
    sink_settings: Settings, store: ClickHouseStore, clickhouse: Client, jobs: OperatorJobs
) -> None:
    before = stored(clickhouse, store.database)
    run = uuid.uuid4().hex[:8]
    # The middle record time: the older half is copied, the rest read from the topics again.
    times = sorted({row["record_timestamp"] for row in before})
    since = times[len(times) // 2]
    job = wait(jobs.start_rebuild(run, since=since))
    try:
        assert 0 < job.counts["rows_copied"] < len(before)
        assert stored(clickhouse, store.database) == before
    finally:
        clickhouse.command(f"DROP DATABASE IF EXISTS {jobs.rebuild_database(run)}")


def _request(url: str, method: str, token: str | None, body: Any = None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    response = httpx.request(method, url, content=data, headers=headers, timeout=30)
    return response.status_code, response.json()


def test_the_operator_api_needs_the_operator_role(
    sink_settings: Settings, store: ClickHouseStore, jobs: OperatorJobs
) -> None:
    catalog = topic_catalog(sink_settings)
    app = staff_app(Analytics(store), sink_settings)
    install_operator_api(app, jobs)
    server = AnalyticsServer(app, "127.0.0.1", 0)
    server.start()
    staff, auth = sink_settings.staff_auth, sink_settings.auth

    def token(roles: list[str], *, client_key: bool = False) -> str:
        """A staff token, or (``client_key``) one signed like the clients' of the same claims."""
        return issue_token(
            (auth.jwt_secret if client_key else staff.secret).get_secret_value(),
            user_id="ops-erin",
            tenant_id=SYSTEM_TENANT,
            issuer=auth.jwt_issuer if client_key else staff.issuer,
            audience=auth.jwt_audience if client_key else staff.audience,
            roles=roles,
        )

    ranges = [r.as_json() for r in resolve_ranges(sink_settings, catalog.messages_in.name)]
    body = {"run_id": "api_run", "ranges": ranges}
    url = f"{server.url}/v1/operator/replays"
    try:
        status, refusal = _request(url, "POST", None, body)
        assert (status, refusal["code"]) == (401, "unauthorized")
        status, refusal = _request(url, "POST", token(["operator"]), {"run_id": "x"})
        assert (status, refusal["code"]) == (400, "invalid-request")
        assert "ranges" in refusal["message"]
        status, refusal = _request(url, "POST", "not-a-token", body)
        assert (status, refusal["code"]) == (401, "unauthorized")
        status, refusal = _request(url, "POST", token(["analyst"]), body)
        assert (status, refusal["code"]) == (403, "forbidden")
        # The clients' key signs no operator, whatever the claims.
        status, refusal = _request(url, "POST", token(["operator"], client_key=True), body)
        assert (status, refusal["code"]) == (401, "unauthorized")
        # The operator recorded is the token's: a body naming one is refused.
        named = {**body, "operator": "mallory"}
        status, refusal = _request(url, "POST", token(["operator"]), named)
        assert (status, refusal["code"]) == (400, "invalid-request"), refusal
        foreign = {"run_id": "api_run", "ranges": [{**ranges[0], "topic": "elsewhere"}]}
        status, refusal = _request(url, "POST", token(["operator"]), foreign)
        assert (status, refusal["code"]) == (400, "topic-not-read-by-target")
        status, job = _request(url, "POST", token(["operator"]), body)
        assert status == 202
        assert job["state"] == "running"
        deadline = time.monotonic() + JOB_TIMEOUT
        while job["state"] == "running" and time.monotonic() < deadline:
            time.sleep(0.2)
            status, job = _request(
                f"{server.url}/v1/operator/jobs/{job['id']}", "GET", token(["operator"])
            )
        assert job["state"] == "finished", job
        assert job["arguments"]["operator"] == "ops-erin"
        assert job["done"] == job["total"] == sum(int(r["end"]) - int(r["start"]) for r in ranges)
        missing = _request(f"{server.url}/v1/operator/jobs/nope", "GET", token(["operator"]))
        assert missing == (404, {"code": "job-missing", "message": "no job nope in this process"})
    finally:
        server.stop()
    assert {t.name for t in audited_topics(catalog)} >= {r["topic"] for r in ranges}
