"""The API's queries run on a pool of their own: they never hold up the audit inserts, each has
a time budget, and a full pool refuses at once (503 busy) — on real chDB, several handles to the
one engine of this process."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import pytest
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import DatabaseError

from analytics.api import AnalyticsServer
from analytics.queries import Analytics
from core.connections import clickhouse_client
from core.settings import Settings
from schemas.topics import topic_catalog
from sinks.clickhouse.audit import AuditDecoder, KafkaRecord
from sinks.clickhouse.schema import AUDIT_TABLE
from sinks.clickhouse.store import (
    ClickHouseStore,
    QueryBusyError,
    QueryPool,
    query_client_settings,
)
from tests.sinks.staff_support import staff_app, staff_headers

#: A scan that runs until its budget cancels it (10^12 rows).
SLOW_SQL = "SELECT count() FROM numbers(1000000000000) WHERE sipHash64(number) % 7 = 3"
BUDGET_SECONDS = 6.0


def pool(settings: Settings, workers: int, waiting: int) -> QueryPool:
    budget = query_client_settings(BUDGET_SECONDS, max_threads=1)
    return QueryPool(
        [clickhouse_client(settings, query_settings=budget) for _ in range(workers)],
        max_waiting=waiting,
    )


@pytest.fixture
def pooled(
    clickhouse: Client, clickhouse_database: str, settings: Settings
) -> Iterator[ClickHouseStore]:
    store = ClickHouseStore(
        clickhouse, clickhouse_database, owns_client=False, queries=pool(settings, 2, 0)
    )
    store.apply_schema(topic_catalog(settings))
    yield store
    store.close()


def audit_rows(settings: Settings, count: int) -> list[object]:
    decoder = AuditDecoder(topic_catalog(settings))
    topic = topic_catalog(settings).messages_in.name
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    return [
        decoder.audit(KafkaRecord(topic, 0, offset, b"k", b"not json", now_ms)).row
        for offset in range(count)
    ]


async def test_an_audit_insert_is_not_held_up_by_slow_queries(
    pooled: ClickHouseStore, settings: Settings
) -> None:
    slow = [
        asyncio.ensure_future(pooled.call_async(lambda client: client.query(SLOW_SQL)))
        for _ in range(2)
    ]
    await asyncio.sleep(0.5)  # both scans are running on the pool's two handles
    began = time.monotonic()
    await asyncio.to_thread(pooled.insert_audit, audit_rows(settings, 3))  # type: ignore[arg-type]
    took = time.monotonic() - began
    assert not any(query.done() for query in slow), "the insert waited for the queries"
    assert took < BUDGET_SECONDS / 2, took
    stored = pooled.query(f"SELECT count() FROM {pooled.database}.{AUDIT_TABLE}")
    assert stored.result_rows[0][0] == 3
    # Each query is cancelled by ClickHouse at its budget: an error, not an endless scan.
    for query in slow:
        with pytest.raises(DatabaseError, match=r"TIMEOUT_EXCEEDED|Timeout exceeded"):
            await query
    assert time.monotonic() - began < BUDGET_SECONDS * 3


async def test_a_full_pool_refuses_at_once_and_the_api_answers_busy(
    pooled: ClickHouseStore,
) -> None:
    slow = [
        asyncio.ensure_future(pooled.call_async(lambda client: client.query(SLOW_SQL)))
        for _ in range(2)
    ]
    await asyncio.sleep(0.5)
    began = time.monotonic()
    with pytest.raises(QueryBusyError):
        await pooled.call_async(lambda client: client.query("SELECT 1"))
    assert time.monotonic() - began < 1.0
    server = AnalyticsServer(staff_app(Analytics(pooled)), "127.0.0.1", 0)
    server.start()
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            refused = await http.get(
                f"{server.url}/v1/analytics/messages_per_minute", headers=staff_headers()
            )
        assert refused.status_code == 503
        assert b'"code":"busy"' in refused.content
        assert refused.headers["Retry-After"] == "1"
    finally:
        server.stop()
    for query in slow:
        with pytest.raises(DatabaseError):
            await query
    # Free again: the next query runs. The pool's clients only read.
    answer = await pooled.call_async(lambda client: client.query("SELECT 1"))
    assert answer.result_rows == [(1,)]
    with pytest.raises(DatabaseError, match=r"READONLY|readonly"):
        await pooled.call_async(
            lambda client: client.command(f"DROP TABLE {pooled.database}.{AUDIT_TABLE}")
        )
