"""Where the quality checks read their data: the audit's fixed datasets (directly on a
clickhouse-connect client, or through the HTTP API of the process that owns the chDB path) and a
bounded sample of the CQL serving tables.

Every failure to reach a store is a :class:`QualityError` with a stable code and what to do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

import httpx
from cassandra import DriverException, InvalidRequest
from cassandra.cluster import NoHostAvailable, Session
from cassandra.concurrent import execute_concurrent_with_args
from clickhouse_connect.driver.client import Client

from analytics.quality_api import (
    Dataset,
    DatasetParameters,
    DatasetRows,
    QualityDataError,
    run_dataset,
)
from pipelines.staff_cli import AnalyticsRefusalError, call_analytics
from schemas.errors import CodedError

#: CQL reads in flight while sampling.
CQL_CONCURRENCY = 32
HTTP_TIMEOUT_SECONDS = 120.0


class QualityErrorCode(StrEnum):
    """Why ``imstream quality check`` could not run (exit 2); never changes meaning."""

    INVALID_OPTION = "invalid-option"
    AUDIT_UNAVAILABLE = "audit-unavailable"
    DATASET_REFUSED = "dataset-refused"
    CQL_UNAVAILABLE = "cql-unavailable"
    CQL_SCHEMA_MISSING = "cql-schema-missing"
    DOCS_UNWRITABLE = "docs-unwritable"


class QualityError(CodedError[QualityErrorCode]):
    """The checks could not run: a stable code and a message saying what to do."""


class AuditReader(Protocol):
    """Reads one fixed dataset of the audit."""

    where: str

    def read(self, data: Dataset, parameters: DatasetParameters) -> DatasetRows: ...


class DirectAuditReader:
    """The datasets run on a clickhouse-connect client (a ClickHouse server, or a test's chDB)."""

    def __init__(self, client: Client, database: str, where: str) -> None:
        self.client = client
        self.database = database
        self.where = where

    def read(self, data: Dataset, parameters: DatasetParameters) -> DatasetRows:
        try:
            return run_dataset(self.client, self.database, data, parameters)
        except QualityDataError as error:
            raise QualityError(QualityErrorCode.DATASET_REFUSED, error.message) from error
        except Exception as error:  # the client's errors have no common base worth naming
            raise QualityError(
                QualityErrorCode.AUDIT_UNAVAILABLE,
                f"ClickHouse at {self.where} did not answer {data.name}: {error}; check "
                "IM_CLICKHOUSE__URL and IM_CLICKHOUSE__DATABASE",
            ) from error


class HttpAuditReader:
    """The datasets through ``/v1/quality/datasets`` of the process that owns the chDB path."""

    def __init__(
        self,
        base_url: str,
        headers: Callable[[], dict[str, str]],
        timeout: float = HTTP_TIMEOUT_SECONDS,
    ) -> None:
        """``headers`` gives each request's (a fresh staff token: the API needs one)."""
        self.base_url = base_url.rstrip("/")
        self.where = self.base_url
        self.headers = headers
        self.timeout = timeout

    def read(self, data: Dataset, parameters: DatasetParameters) -> DatasetRows:
        url = f"{self.base_url}/v1/quality/datasets/{data.name}"
        try:
            body = call_analytics(
                "GET",
                url,
                self.headers(),
                params=dict(parameters.query_items()),
                timeout=self.timeout,
            )
        except AnalyticsRefusalError as error:
            raise self._refused(data, error) from error
        except httpx.TransportError as error:
            raise QualityError(
                QualityErrorCode.AUDIT_UNAVAILABLE,
                f"the ClickHouse sink's API at {self.base_url} did not answer ({error}); with "
                "chDB only the process that owns the data path can read the audit: start it "
                "(`imstream up`, or `imstream run clickhouse-sink`), pass --api-url, or set "
                "IM_CLICKHOUSE__URL to read a ClickHouse server directly",
            ) from error
        except ValueError as error:
            raise QualityError(
                QualityErrorCode.AUDIT_UNAVAILABLE,
                f"{url} answered something that is not JSON; is --api-url the ClickHouse sink?",
            ) from error
        return DatasetRows(
            dataset=data.name,
            columns=tuple(body["columns"]),
            rows=[tuple(row) for row in body["rows"]],
            truncated=bool(body["truncated"]),
        )

    def _refused(self, data: Dataset, error: AnalyticsRefusalError) -> QualityError:
        if error.code is None or error.message is None:
            message = f"HTTP {error.status}"
        else:
            message = f"{error.code}: {error.message}"
        if error.status >= 500:
            return QualityError(
                QualityErrorCode.AUDIT_UNAVAILABLE,
                f"the ClickHouse sink's API at {self.base_url} failed on {data.name} ({message}); "
                "retry, or look at its log (.imstream/logs/clickhouse-sink.log)",
            )
        if error.status == 404 and "unknown-dataset" not in message:
            return QualityError(
                QualityErrorCode.AUDIT_UNAVAILABLE,
                f"{self.base_url} has no quality datasets (HTTP 404): is --api-url the ClickHouse "
                "sink's API, and is that process up to date?",
            )
        return QualityError(QualityErrorCode.DATASET_REFUSED, f"{data.name} was refused: {message}")


@dataclass(frozen=True, slots=True)
class ConversationKey:
    tenant_id: str
    conversation_id: str


@dataclass(frozen=True, slots=True)
class ConversationRow:
    tenant_id: str
    conversation_id: str
    kind: str | None
    deleted: bool


@dataclass(frozen=True, slots=True)
class MemberRow:
    tenant_id: str
    conversation_id: str
    user_id: str


@dataclass(frozen=True, slots=True)
class TimelineRow:
    tenant_id: str
    conversation_id: str
    seq: int
    event_id: str | None


class CqlSample:
    """Bounded reads of the serving tables for a sample of conversations.

    The sample is taken by partition: ``SELECT DISTINCT`` of the partition keys of ``members``
    and ``conversations`` with a ``LIMIT`` (token order: an arbitrary but cheap sample of the
    whole table), plus the conversations the caller names (the most recent ones in the audit);
    then every read is one partition.
    """

    def __init__(self, session: Session, keyspace: str, timeline_bucket_size: int) -> None:
        self.session = session
        self.keyspace = keyspace
        self.bucket_size = timeline_bucket_size
        try:
            prepare = session.prepare
            self._conversation = prepare(
                f"SELECT tenant_id, conversation_id, kind, deleted FROM {keyspace}.conversations "
                "WHERE tenant_id = ? AND conversation_id = ?"
            )
            self._members = prepare(
                f"SELECT tenant_id, conversation_id, user_id FROM {keyspace}.members "
                "WHERE tenant_id = ? AND conversation_id = ?"
            )
            self._timeline = prepare(
                f"SELECT tenant_id, conversation_id, seq, event_id FROM {keyspace}.timeline "
                "WHERE tenant_id = ? AND conversation_id = ? AND bucket = ? "
                "AND seq >= ? AND seq <= ?"
            )
        except InvalidRequest as error:
            raise QualityError(
                QualityErrorCode.CQL_SCHEMA_MISSING,
                f"the serving tables are not in keyspace {keyspace!r} ({error}); check "
                "IM_CQL__KEYSPACE, or run `imstream db migrate`",
            ) from error
        except (NoHostAvailable, DriverException) as error:
            raise cql_unavailable(error) from error

    def partitions(self, table: str, tenant: str | None, limit: int) -> list[ConversationKey]:
        """Up to ``limit`` partition keys of ``members`` or ``conversations`` (of ``tenant``)."""
        if table not in {"members", "conversations"}:
            raise ValueError(f"not a conversation-keyed table: {table}")
        # A tenant cannot be restricted on half a partition key: scan a bounded range and filter.
        scan = limit if tenant is None else limit * 10
        rows = self._execute(
            f"SELECT DISTINCT tenant_id, conversation_id FROM {self.keyspace}.{table} LIMIT {scan}"
        )
        keys = [ConversationKey(row.tenant_id, row.conversation_id) for row in rows]
        return [key for key in keys if tenant is None or key.tenant_id == tenant][:limit]

    def conversations(self, keys: Sequence[ConversationKey]) -> list[ConversationRow]:
        return [
            ConversationRow(row.tenant_id, row.conversation_id, row.kind, bool(row.deleted))
            for row in self._each(
                self._conversation, [(k.tenant_id, k.conversation_id) for k in keys]
            )
        ]

    def members(self, keys: Sequence[ConversationKey]) -> list[MemberRow]:
        return [
            MemberRow(row.tenant_id, row.conversation_id, row.user_id)
            for row in self._each(self._members, [(k.tenant_id, k.conversation_id) for k in keys])
        ]

    def timeline(self, entries: Iterable[tuple[ConversationKey, int]]) -> list[TimelineRow]:
        """The timeline rows at the given seqs: one read per (conversation, bucket), for the
        bucket's seq range that was asked for."""
        ranges: dict[tuple[ConversationKey, int], tuple[int, int]] = {}
        for key, seq in entries:
            bucket = seq // self.bucket_size
            low, high = ranges.get((key, bucket), (seq, seq))
            ranges[(key, bucket)] = (min(low, seq), max(high, seq))
        arguments = [
            (key.tenant_id, key.conversation_id, bucket, low, high)
            for (key, bucket), (low, high) in ranges.items()
        ]
        return [
            TimelineRow(row.tenant_id, row.conversation_id, int(row.seq), row.event_id)
            for row in self._each(self._timeline, arguments)
        ]

    def _execute(self, statement: str) -> list[Any]:
        try:
            return list(self.session.execute(statement))
        except (NoHostAvailable, DriverException) as error:
            raise cql_unavailable(error) from error

    def _each(self, statement: Any, arguments: list[tuple[Any, ...]]) -> list[Any]:
        if not arguments:
            return []
        try:
            results = execute_concurrent_with_args(
                self.session, statement, arguments, concurrency=CQL_CONCURRENCY
            )
        except (NoHostAvailable, DriverException) as error:
            raise cql_unavailable(error) from error
        rows: list[Any] = []
        for result in results:
            if not result.success:
                raise cql_unavailable(result.result_or_exc)
            rows.extend(result.result_or_exc)
        return rows


def cql_unavailable(error: BaseException) -> QualityError:
    return QualityError(
        QualityErrorCode.CQL_UNAVAILABLE,
        f"the CQL store did not answer ({error}); check that it is up (`imstream stack status`) "
        "and IM_CQL__CONTACT_POINTS / IM_CQL__PORT",
    )
