"""The process's ClickHouse clients: one thread for the writes, a bounded pool for the API's reads.

chDB (the default: ClickHouse in-process, through clickhouse-connect's chdb backend) is
synchronous and allows one data path — one engine — per process. The sink's calls (inserts,
schema, its own reads) run on one worker thread over one client, serialised there and never on an
event loop.

The HTTP API's queries (analytics, dashboards, quality datasets, search: ``call_async`` and
``query_async``) run on a :class:`QueryPool` of their own, so a slow or hostile query can never
delay an audit insert. chDB allows any number of connection handles to its one engine and runs
them concurrently (each clickhouse-connect client owns a handle and a lock; chDB releases the
GIL while a query runs), so the pool holds one client per worker thread, each with ClickHouse's
``max_execution_time`` (the time budget: a query past it is cancelled by the engine),
``max_threads`` and ``readonly`` set. A request that finds every worker busy and the queue full
is refused at once (:class:`QueryBusyError`, answered 503 ``busy``). Measured while two queries
were each scanning for their whole 2 s budget on a 2-core machine: single-row audit inserts took
4-20 ms. The same code talks to a ClickHouse server over HTTP when ``IM_CLICKHOUSE__URL`` is set
(the pool then holds HTTP clients): only the clickhouse-connect client API is used.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.insert import InsertContext
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


class QueryBusyError(Exception):
    """Every query worker is busy and the queue is full: try again shortly (503 ``busy``)."""


class QueryPool:
    """The HTTP API's reads: a thread and a client per worker, at most ``max_waiting`` queued.

    ``clients`` are dedicated to the pool and made with the time budget in their settings
    (:func:`query_client_settings`); the pool closes them.
    """

    def __init__(self, clients: Sequence[Client], *, max_waiting: int) -> None:
        if not clients:
            raise ValueError("a query pool needs at least one client")
        self._clients: queue.SimpleQueue[Client] = queue.SimpleQueue()
        for client in clients:
            self._clients.put(client)
        self._all = list(clients)
        self._executor = ThreadPoolExecutor(
            max_workers=len(clients), thread_name_prefix="clickhouse-query"
        )
        self._capacity = len(clients) + max_waiting
        self._admitted = 0
        self._lock = threading.Lock()

    def _run(self, function: Callable[[Client], T]) -> T:
        client = self._clients.get()  # one free client per worker thread: never waits
        try:
            return function(client)
        finally:
            self._clients.put(client)

    async def call(self, function: Callable[[Client], T]) -> T:
        with self._lock:
            if self._admitted >= self._capacity:
                raise QueryBusyError(
                    f"{self._admitted} queries are running or waiting; try again shortly"
                )
            self._admitted += 1
        try:
            return await asyncio.wrap_future(self._executor.submit(self._run, function))
        finally:
            with self._lock:
                self._admitted -= 1

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        for client in self._all:
            client.close()


def query_client_settings(timeout_seconds: float, max_threads: int) -> dict[str, Any]:
    """The ClickHouse settings of a query pool's clients: the time budget, the threads, and
    read-only (``readonly=2``: nothing the API runs can write or drop, settings may still be set
    per query)."""
    return {"max_execution_time": timeout_seconds, "max_threads": max_threads, "readonly": 2}


class ClickHouseStore:
    """The audit table and the analytics views of one database, through one client and thread.

    ``close`` closes the client only when the store owns it (the sink process does; a test that
    shares its session's client does not), and the query pool, if it has one. Without a pool
    (tests, tools) the API's reads share the one thread.
    """

    def __init__(
        self,
        client: Client,
        database: str,
        *,
        owns_client: bool = True,
        queries: QueryPool | None = None,
    ) -> None:
        quote_identifier(database)  # a bad name fails here, with the setting to fix
        self.client = client
        self.database = database
        self.queries = queries
        self._owns_client = owns_client
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clickhouse")
        self._shares_executor = False
        #: Per table, made and used on the ClickHouse thread only (``_insert``).
        self._insert_contexts: dict[str, InsertContext] = {}

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
        """Run ``function(client)`` — a read of the HTTP API — on the query pool (raises
        :class:`QueryBusyError` when it is full), or without one on the ClickHouse thread;
        never blocking the event loop."""
        if self.queries is not None:
            return await self.queries.call(function)
        return await asyncio.wrap_future(self._executor.submit(function, self.client))

    def apply_schema(self, catalog: TopicCatalog) -> None:
        self._insert_contexts.clear()
        self.call(lambda client: apply_schema(client, self.database, catalog))

    def insert_audit(self, rows: Sequence[AuditRow]) -> None:
        """One insert of ``rows`` into ``audit_events`` (all or nothing for a MergeTree insert
        of one block)."""
        self._insert(AUDIT_TABLE, AUDIT_COLUMNS, [row.values() for row in rows])

    def insert_push_outcomes(self, rows: Sequence[PushOutcomeRow]) -> None:
        """One insert of ``rows`` into ``push_outcomes``; a copy of a row (a replay) collapses
        with the first on its key ``(tenant_id, job_id, device_id, attempt)``."""
        self._insert(PUSH_OUTCOMES_TABLE, PUSH_OUTCOME_COLUMNS, [row.values() for row in rows])

    def _insert(self, table: str, columns: Sequence[str], rows: list[tuple[Any, ...]]) -> None:
        """Insert ``rows`` as columns through the table's insert context.

        The context holds the table's column types: made once (one ``DESCRIBE``, about 2 ms of
        chDB per call) instead of at every insert, and forgotten when the schema is applied again
        or an insert fails. Column-oriented data spares clickhouse-connect transposing the rows.
        """
        if not rows:
            return
        data = list(zip(*rows, strict=True))

        def insert(client: Client) -> None:
            context = self._insert_contexts.get(table)
            if context is None:
                context = client.create_insert_context(
                    table, list(columns), self.database, column_oriented=True
                )
                self._insert_contexts[table] = context
            context.data = data
            try:
                client.insert(context=context)
            except BaseException:
                del self._insert_contexts[table]
                raise
            finally:
                context.data = None

        self.call(insert)

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> QueryResult:
        """A read, blocking; times come back in UTC."""
        return self.call(lambda client: client.query(sql, parameters=parameters, query_tz="UTC"))

    async def query_async(self, sql: str, parameters: dict[str, Any] | None = None) -> QueryResult:
        return await self.call_async(
            lambda client: client.query(sql, parameters=parameters, query_tz="UTC")
        )

    def close(self) -> None:
        if self.queries is not None:
            self.queries.close()
        if self._owns_client:
            self.call(lambda client: client.close())
        if not self._shares_executor:
            self._executor.shutdown(wait=True)
