"""The process's one ClickHouse client, behind one thread.

chDB (the default: ClickHouse in-process, through clickhouse-connect's chdb backend) is
synchronous and allows one data path per process, so the ClickHouse sink process owns exactly one
client and runs every call on one worker thread: the consumer loop's inserts (blocking, from its
own thread) and the analytics endpoint's queries (awaited from the HTTP server's event loop) are
serialised there and never block an event loop. The same code talks to a ClickHouse server over
HTTP when ``IM_CLICKHOUSE__URL`` is set: only the clickhouse-connect client API is used.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.query import QueryResult

from schemas.topics import TopicCatalog
from sinks.clickhouse.audit import AuditRow, PushOutcomeRow
from sinks.clickhouse.schema import (
    AUDIT_COLUMNS,
    AUDIT_TABLE,
    PUSH_OUTCOME_COLUMNS,
    PUSH_OUTCOMES_TABLE,
    apply_schema,
    quote_identifier,
)

T = TypeVar("T")


class ClickHouseStore:
    """The audit table and the analytics views of one database, through one client and thread.

    ``close`` closes the client only when the store owns it (the sink process does; a test that
    shares its session's client does not).
    """

    def __init__(self, client: Client, database: str, *, owns_client: bool = True) -> None:
        quote_identifier(database)  # a bad name fails here, with the setting to fix
        self.client = client
        self.database = database
        self._owns_client = owns_client
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clickhouse")
        self._shares_executor = False

    def sibling(self, database: str) -> ClickHouseStore:
        """A store of another database over the same client and the same one thread (chDB:
        one client per process); closing it closes neither."""
        store = ClickHouseStore(self.client, database, owns_client=False)
        store._executor.shutdown(wait=False)
        store._executor = self._executor
        store._shares_executor = True
        return store

    def call(self, function: Callable[[Client], T]) -> T:
        """Run ``function(client)`` on the ClickHouse thread and wait for it (blocking)."""
        return self._executor.submit(function, self.client).result()

    async def call_async(self, function: Callable[[Client], T]) -> T:
        """Run ``function(client)`` on the ClickHouse thread without blocking the event loop."""
        return await asyncio.wrap_future(self._executor.submit(function, self.client))

    def apply_schema(self, catalog: TopicCatalog) -> None:
        self.call(lambda client: apply_schema(client, self.database, catalog))

    def insert_audit(self, rows: Sequence[AuditRow]) -> None:
        """One insert of ``rows`` into ``audit_events`` (all or nothing for a MergeTree insert
        of one block)."""
        data = [row.values() for row in rows]
        self.call(
            lambda client: client.insert(
                AUDIT_TABLE, data, column_names=list(AUDIT_COLUMNS), database=self.database
            )
        )

    def insert_push_outcomes(self, rows: Sequence[PushOutcomeRow]) -> None:
        """One insert of ``rows`` into ``push_outcomes``; a copy of a row (a replay) collapses
        with the first on its key ``(tenant_id, job_id, device_id, attempt)``."""
        data = [row.values() for row in rows]
        self.call(
            lambda client: client.insert(
                PUSH_OUTCOMES_TABLE,
                data,
                column_names=list(PUSH_OUTCOME_COLUMNS),
                database=self.database,
            )
        )

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> QueryResult:
        """A read, blocking; times come back in UTC."""
        return self.call(lambda client: client.query(sql, parameters=parameters, query_tz="UTC"))

    async def query_async(self, sql: str, parameters: dict[str, Any] | None = None) -> QueryResult:
        return await self.call_async(
            lambda client: client.query(sql, parameters=parameters, query_tz="UTC")
        )

    def close(self) -> None:
        if self._owns_client:
            self.call(lambda client: client.close())
        if not self._shares_executor:
            self._executor.shutdown(wait=True)
