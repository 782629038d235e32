"""The named analytics queries: parameterised SQL over the replay-safe views (schema.py).

Dashboards ask for a query by name with at most three parameters — ``tenant`` (optional; all
tenants when absent), ``from`` and ``to`` (RFC 3339 with an offset; the rows whose period starts
in ``[from, to)``). No SQL comes from a client: the SQL is fixed here, the parameters are
validated (each by the route's query model, ``analytics.parameters``; the window here) and bound
by ClickHouse (``{name:Type}``), and bad ones are refused with a stable code
(:class:`AnalyticsErrorCode`) before anything runs.

Every view reads ``audit_events FINAL``, so the answers count every Kafka record once however
often it was inserted (docs/analytics.md).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from functools import partial
from typing import Any, Protocol, TypeVar

from analytics.unavailable import answered
from core.timeargs import parse_moment
from schemas.errors import ApiError
from sinks.clickhouse.schema import quote_identifier
from sinks.clickhouse.store import ClickHouseStore

log = logging.getLogger(__name__)


class _HasName(Protocol):
    @property
    def name(self) -> str: ...


#: Whatever a name table holds (queries, datasets).
_Named = TypeVar("_Named", bound=_HasName)

#: The most rows one answer holds; more are cut and the answer says ``truncated``.
MAX_ROWS = 10_000
PARAMETERS = ("tenant", "from", "to")


class AnalyticsErrorCode(StrEnum):
    """The ``code`` of an error body of this service's APIs (analytics, quality datasets,
    dashboards; search has its own, ``schemas.search``); never changes meaning once released."""

    UNKNOWN_QUERY = "unknown-query"
    UNKNOWN_DATASET = "unknown-dataset"
    UNKNOWN_PARAMETER = "unknown-parameter"
    INVALID_PARAMETER = "invalid-parameter"
    UNAVAILABLE = "unavailable"
    UNKNOWN_DASHBOARD = "unknown-dashboard"

    @property
    def http_status(self) -> int:
        return _STATUS[self]


_STATUS = {
    AnalyticsErrorCode.UNKNOWN_QUERY: 404,
    AnalyticsErrorCode.UNKNOWN_DATASET: 404,
    AnalyticsErrorCode.UNKNOWN_DASHBOARD: 404,
    AnalyticsErrorCode.UNKNOWN_PARAMETER: 400,
    AnalyticsErrorCode.INVALID_PARAMETER: 400,
    AnalyticsErrorCode.UNAVAILABLE: 503,
}


class AnalyticsError(ApiError):
    """A refused or failed analytics request."""

    code: AnalyticsErrorCode


@dataclass(frozen=True, slots=True)
class NamedQuery:
    """One query a dashboard may ask for: a view, its columns and its time column."""

    name: str
    description: str
    view: str
    columns: tuple[str, ...]
    #: The column that places a row in time; rows whose period starts in [from, to) answer.
    period: str
    #: How far back ``from`` defaults to from ``to``, and the widest window allowed.
    default_window: timedelta
    max_window: timedelta
    order_by: tuple[str, ...]

    def sql(self, database: str) -> str:
        period = f"toDateTime({self.period}, 'UTC')"
        return (
            f"SELECT {', '.join(self.columns)} "
            f"FROM {quote_identifier(database)}.{self.view} "
            "WHERE ({tenant:Nullable(String)} IS NULL OR tenant_id = {tenant:Nullable(String)}) "
            f"AND {period} >= {{start:DateTime64(6, 'UTC')}} "
            f"AND {period} < {{end:DateTime64(6, 'UTC')}} "
            f"ORDER BY {', '.join(self.order_by)} "
            f"LIMIT {MAX_ROWS + 1}"
        )

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "columns": list(self.columns),
            "period": self.period,
            "parameters": list(PARAMETERS),
            "default_window_seconds": int(self.default_window.total_seconds()),
            "max_window_seconds": int(self.max_window.total_seconds()),
        }


_DAY = timedelta(days=1)
_LATENCY_COLUMNS = ("tenant_id", "minute", "messages", "p50_ms", "p90_ms", "p99_ms", "max_ms")


def _per_minute(
    name: str,
    description: str,
    columns: tuple[str, ...],
    order_by: tuple[str, ...] = ("tenant_id", "minute"),
) -> NamedQuery:
    """A query of the per-minute view of the same name: the last day by default, a month at
    most."""
    return NamedQuery(
        name=name,
        description=description,
        view=name,
        columns=columns,
        period="minute",
        default_window=_DAY,
        max_window=timedelta(days=31),
        order_by=order_by,
    )


def by_name(*items: _Named) -> dict[str, _Named]:
    """A name table: each of ``items`` under its name, in the order given."""
    return {item.name: item for item in items}


QUERIES: dict[str, NamedQuery] = by_name(
    _per_minute(
        "messages_per_minute",
        "Messages sequenced per minute of sending, by tenant and conversation kind (direct or "
        "group)",
        ("tenant_id", "minute", "conversation_kind", "messages"),
        order_by=("tenant_id", "minute", "conversation_kind"),
    ),
    NamedQuery(
        name="daily_active_users",
        description="Distinct users who sent a command or connected a device, per UTC day",
        view="daily_active_users",
        columns=("tenant_id", "day", "active_users"),
        period="day",
        default_window=timedelta(days=30),
        max_window=timedelta(days=3660),
        order_by=("tenant_id", "day"),
    ),
    NamedQuery(
        name="monthly_active_users",
        description="Distinct users who sent a command or connected a device, per UTC "
        "calendar month",
        view="monthly_active_users",
        columns=("tenant_id", "month", "active_users"),
        period="month",
        default_window=timedelta(days=366),
        max_window=timedelta(days=3660),
        order_by=("tenant_id", "month"),
    ),
    _per_minute(
        "send_to_sequenced_latency",
        "Milliseconds from a message's occurred_at (accepted by the ingress) to its sequenced "
        "record's Kafka timestamp, per minute of sending",
        _LATENCY_COLUMNS,
    ),
    _per_minute(
        "sequenced_to_stored_latency",
        "Milliseconds from a message's sequenced record's Kafka timestamp to its audit row "
        "being stored in ClickHouse, per minute of sequencing",
        _LATENCY_COLUMNS,
    ),
    _per_minute(
        "push_jobs_per_minute",
        "Push jobs planned per minute (of their latest message), the messages they stand for "
        "and the users they notify",
        ("tenant_id", "minute", "jobs", "merged_messages", "users"),
    ),
    _per_minute(
        "push_outcomes_per_minute",
        "Push delivery attempts per minute by provider and outcome (written by the push sender)",
        ("tenant_id", "minute", "provider", "outcome", "attempts", "jobs"),
        order_by=("tenant_id", "minute", "provider", "outcome"),
    ),
    _per_minute(
        "dead_letters_per_minute",
        "Records dead-lettered per minute, by source topic and reason code; a record "
        "dead-lettered more than once counts once",
        ("tenant_id", "minute", "source_topic", "error_code", "dead_letters"),
        order_by=("minute", "source_topic", "error_code", "tenant_id"),
    ),
)


@dataclass(frozen=True, slots=True)
class QueryParameters:
    tenant: str | None
    start: datetime
    end: datetime


def known(
    table: Mapping[str, _Named], name: str, what: str, unknown: Callable[[str], Exception]
) -> _Named:
    """The ``what`` named ``name`` (a path parameter) in ``table``; an unknown name raises
    ``unknown(message)``, the message listing the known ones."""
    found = table.get(name)
    if found is None:
        raise unknown(f"no {what} named {name!r}; known: {', '.join(table)}")
    return found


def named_query(name: str) -> NamedQuery:
    """The query named ``name`` (a path parameter); raises :class:`AnalyticsError`."""
    return known(
        QUERIES, name, "analytics query", partial(AnalyticsError, AnalyticsErrorCode.UNKNOWN_QUERY)
    )


def window(
    query: NamedQuery,
    tenant: str | None,
    start: datetime | None,
    end: datetime | None,
    *,
    now: datetime,
) -> QueryParameters:
    """The window ``[from, to)`` (``to`` defaults to now, ``from`` to the query's default window
    before ``to``), no wider than the query allows; raises :class:`AnalyticsError`."""
    end = end or now.astimezone(UTC)
    start = start or end - query.default_window
    if start >= end:
        raise AnalyticsError(AnalyticsErrorCode.INVALID_PARAMETER, "from must be before to", "from")
    if end - start > query.max_window:
        raise AnalyticsError(
            AnalyticsErrorCode.INVALID_PARAMETER,
            f"{query.name} answers at most {query.max_window.days} days at a time",
            "from",
        )
    return QueryParameters(tenant=tenant, start=start, end=end)


def parse_time(
    value: str | None, name: str, invalid: Callable[[str], Exception]
) -> datetime | None:
    """An RFC 3339 time with an offset (query parameters: a ``+`` that arrived as a space is
    taken back), read by ``core/timeargs.py`` (in UTC, in the range the audit stores); None when
    empty; else ``invalid(message)`` is raised — each API its own error with its own code."""
    if not value:
        return None
    return parse_moment(
        value.replace(" ", "+") if "T" in value else value,
        name,
        zone_required=True,
        invalid=invalid,
    )


def json_value(value: Any) -> Any:
    """A ClickHouse value as JSON: times in UTC with ``Z``, dates as ``YYYY-MM-DD``."""
    if isinstance(value, datetime):
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


class Analytics:
    """Runs the named queries against one store (its database)."""

    def __init__(self, store: ClickHouseStore) -> None:
        self.store = store

    def describe(self) -> list[dict[str, Any]]:
        return [query.describe() for query in QUERIES.values()]

    async def run(self, query: NamedQuery, parameters: QueryParameters) -> dict[str, Any]:
        """The answer to ``query``: its parameters as understood and its rows."""
        bound: dict[str, Any] = {
            "tenant": parameters.tenant,
            "start": parameters.start,
            "end": parameters.end,
        }
        result = await answered(
            self.store.query_async(query.sql(self.store.database), bound),
            partial(AnalyticsError, AnalyticsErrorCode.UNAVAILABLE),
            log,
            f"analytics query {query.name} failed",
        )
        rows = [
            {column: json_value(value) for column, value in zip(query.columns, row, strict=True)}
            for row in result.result_rows[:MAX_ROWS]
        ]
        return {
            "query": query.name,
            "tenant": parameters.tenant,
            "from": json_value(parameters.start),
            "to": json_value(parameters.end),
            "columns": list(query.columns),
            "rows": rows,
            "truncated": len(result.result_rows) > MAX_ROWS,
        }
