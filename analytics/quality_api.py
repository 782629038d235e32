"""The data-quality datasets over the audit, and their HTTP route (docs/quality.md).

``imstream quality check`` validates a few fixed datasets read from ``audit_events FINAL`` and
``push_outcomes FINAL``. The SQL is fixed here and the parameters are validated and bound by
ClickHouse, exactly as for the analytics (``analytics.queries``): nothing a client sends
becomes SQL. The same :func:`run_dataset` runs on any clickhouse-connect client, so

- a ClickHouse server deployment (``IM_CLICKHOUSE__URL``) is read directly by the checker;
- with chDB — one data path per process — the process that owns the path (the ClickHouse sink)
  serves the datasets over HTTP: ``GET /v1/quality/datasets`` lists them and
  ``GET /v1/quality/datasets/{name}?topic=&tenant=&since=&until=&limit=`` answers
  ``{"dataset", "columns", "rows": [[...]], "truncated"}``; errors are
  ``{"code", "message", "field"}`` with the code's status (:class:`AnalyticsErrorCode`);
- tests run the SQL on their own chDB database.

Every dataset is bounded: at most ``limit`` rows (:data:`MAX_ROWS` at most), and the window
``[since, until)`` is on the Kafka record timestamp (``record_timestamp``; for push outcomes the
attempt time), not on ``occurred_at``, so that an event whose own time is out of bounds is still
read — that is one of the things the checks look for.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from functools import partial
from typing import Annotated, Any

from clickhouse_connect.driver.client import Client
from fastapi import APIRouter, Depends, Query, Request

from analytics.parameters import (
    TENANT_PATTERN,
    TENANT_RULE,
    QueryModel,
    Since,
    Tenant,
    Until,
    count,
    once_each,
)
from analytics.queries import AnalyticsError, AnalyticsErrorCode, by_name, known
from analytics.unavailable import answered
from core.timeargs import in_range
from schemas.events import MessageEdited, MessageRecalled, MessageSent
from sinks.clickhouse.schema import AUDIT_TABLE, PUSH_OUTCOMES_TABLE, quote_identifier, sql_string
from sinks.clickhouse.store import ClickHouseStore

log = logging.getLogger(__name__)

#: The most rows one dataset answer holds; beyond, the answer says ``truncated``.
MAX_ROWS = 200_000
DEFAULT_ROWS = 100_000
#: ``since`` defaults to this long before ``until``.
DEFAULT_WINDOW = timedelta(days=1)
PARAMETERS = ("topic", "tenant", "since", "until", "limit")
#: Kafka's legal topic names.
_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")

#: The event types that are entries of a conversation's timeline: each takes the conversation's
#: next ``conversation_seq`` (a ``receipt.read`` also carries a seq, the position read, and is
#: not an entry).
TIMELINE_ENTRY_TYPES: tuple[str, ...] = tuple(
    model.model_fields["type"].default for model in (MessageSent, MessageRecalled, MessageEdited)
)
MESSAGE_SENT_TYPE: str = MessageSent.model_fields["type"].default


class QualityDataError(AnalyticsError):
    """A refused or failed dataset request."""


class ColumnKind(StrEnum):
    """How a column travels as JSON and is read back into a frame."""

    TEXT = "text"
    INTEGER = "integer"
    FLOAT = "float"
    TIME = "time"


_WINDOW = (
    "record_timestamp >= {since:DateTime64(6, 'UTC')} "
    "AND record_timestamp < {until:DateTime64(6, 'UTC')}"
)
_TENANT_FILTER = "({tenant:Nullable(String)} IS NULL OR tenant_id = {tenant:Nullable(String)})"
#: FINAL without merging across partitions: safe because a record's copies always share a
#: partition (the partition key is a function of the record, docs/analytics.md), and cheaper.
_FINAL_SETTINGS = "SETTINGS do_not_merge_across_partitions_select_final = 1"
_LIMIT = "LIMIT {limit_plus_one:UInt32}"


# Aliases never reuse a column's name: ClickHouse would resolve the column in WHERE to the alias
# (``conversation_id IS NOT NULL`` to ``assumeNotNull(conversation_id) IS NOT NULL``). The answer's
# column names come from the dataset's definition.


def _conversation_log(db: str) -> str:
    return f"""
SELECT tenant_id, assumeNotNull(conversation_id) AS conversation, partition, offset,
       toString(event_id) AS event, event_type, assumeNotNull(conversation_seq) AS seq,
       record_timestamp
FROM {db}.{AUDIT_TABLE} FINAL
WHERE topic = {{topic:String}} AND {_TENANT_FILTER} AND {_WINDOW}
  AND event_type IN ({", ".join(sql_string(kind) for kind in TIMELINE_ENTRY_TYPES)})
  AND conversation_id IS NOT NULL AND conversation_seq IS NOT NULL
ORDER BY tenant_id, conversation, partition, offset
{_LIMIT}
{_FINAL_SETTINGS}"""


def _sync_queue(db: str) -> str:
    return f"""
SELECT tenant_id, assumeNotNull(user_id) AS user, partition, offset,
       assumeNotNull(sync_id) AS sync, event_type, toString(event_id) AS event,
       record_timestamp
FROM {db}.{AUDIT_TABLE} FINAL
WHERE topic = {{topic:String}} AND {_TENANT_FILTER} AND {_WINDOW}
  AND user_id IS NOT NULL AND sync_id IS NOT NULL
ORDER BY tenant_id, user, partition, offset
{_LIMIT}
{_FINAL_SETTINGS}"""


def _recent_conversations(db: str) -> str:
    return f"""
SELECT tenant_id, assumeNotNull(conversation_id) AS conversation,
       max(record_timestamp) AS last_record_at
FROM {db}.{AUDIT_TABLE} FINAL
WHERE topic = {{topic:String}} AND {_TENANT_FILTER} AND {_WINDOW}
  AND conversation_id IS NOT NULL
GROUP BY tenant_id, conversation
ORDER BY last_record_at DESC, tenant_id, conversation
{_LIMIT}
{_FINAL_SETTINGS}"""


def _occurred_at_bounds(db: str) -> str:
    return f"""
SELECT topic, count() AS records,
       min(occurred_at) AS earliest_occurred_at, max(occurred_at) AS latest_occurred_at,
       max(toUnixTimestamp64Micro(occurred_at) - toUnixTimestamp64Micro(record_timestamp))
           / 1000000 AS max_seconds_ahead_of_record
FROM {db}.{AUDIT_TABLE} FINAL
WHERE {_TENANT_FILTER} AND {_WINDOW}
GROUP BY topic
ORDER BY topic
{_LIMIT}
{_FINAL_SETTINGS}"""


def _push_deliveries(db: str) -> str:
    # A delivery is one push job to one device; what counts is its last attempt (a throttled
    # first attempt that a retry sent is a success).
    return f"""
SELECT delivery_provider, count() AS deliveries,
       countIf(final_outcome = 'sent') AS sent,
       countIf(final_outcome = 'failed') AS failed,
       countIf(final_outcome = 'throttled') AS throttled,
       countIf(final_outcome = 'invalid_token') AS invalid_token
FROM
(
    SELECT tenant_id, job_id, device_id, any(provider) AS delivery_provider,
           argMax(outcome, attempt) AS final_outcome
    FROM {db}.{PUSH_OUTCOMES_TABLE} FINAL
    WHERE provider != '' AND {_TENANT_FILTER}
      AND attempted_at >= {{since:DateTime64(6, 'UTC')}}
      AND attempted_at < {{until:DateTime64(6, 'UTC')}}
    GROUP BY tenant_id, job_id, device_id
)
GROUP BY delivery_provider
ORDER BY delivery_provider
{_LIMIT}
{_FINAL_SETTINGS}"""


@dataclass(frozen=True, slots=True)
class Dataset:
    """One fixed query: its columns (with how to read them back) and whether it reads a topic."""

    name: str
    description: str
    columns: tuple[tuple[str, ColumnKind], ...]
    reads_topic: bool
    _sql: Callable[[str], str]

    def sql(self, database: str) -> str:
        return self._sql(quote_identifier(database))

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.columns)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "columns": [{"name": name, "kind": str(kind)} for name, kind in self.columns],
            "parameters": [name for name in PARAMETERS if self.reads_topic or name != "topic"],
            "max_rows": MAX_ROWS,
        }


_T, _I, _F, _TIME = ColumnKind.TEXT, ColumnKind.INTEGER, ColumnKind.FLOAT, ColumnKind.TIME

DATASETS: dict[str, Dataset] = by_name(
    Dataset(
        "conversation_log",
        "Timeline entries (messages, recalls, edits) of the conversation log topic, in Kafka "
        "order per conversation",
        (
            ("tenant_id", _T),
            ("conversation_id", _T),
            ("partition", _I),
            ("offset", _I),
            ("event_id", _T),
            ("event_type", _T),
            ("conversation_seq", _I),
            ("record_timestamp", _TIME),
        ),
        True,
        _conversation_log,
    ),
    Dataset(
        "sync_queue",
        "Sync records of the sync-events topic, in Kafka order per user",
        (
            ("tenant_id", _T),
            ("user_id", _T),
            ("partition", _I),
            ("offset", _I),
            ("sync_id", _I),
            ("event_type", _T),
            ("event_id", _T),
            ("record_timestamp", _TIME),
        ),
        True,
        _sync_queue,
    ),
    Dataset(
        "recent_conversations",
        "Conversations with records on the topic, most recently active first",
        (("tenant_id", _T), ("conversation_id", _T), ("last_record_at", _TIME)),
        True,
        _recent_conversations,
    ),
    Dataset(
        "occurred_at_bounds",
        "Per topic: records, earliest and latest occurred_at, and how far occurred_at runs "
        "ahead of the Kafka record timestamp at most (seconds)",
        (
            ("topic", _T),
            ("records", _I),
            ("earliest_occurred_at", _TIME),
            ("latest_occurred_at", _TIME),
            ("max_seconds_ahead_of_record", _F),
        ),
        False,
        _occurred_at_bounds,
    ),
    Dataset(
        "push_deliveries",
        "Per provider: push deliveries (job, device) by the outcome of their last attempt",
        (
            ("provider", _T),
            ("deliveries", _I),
            ("sent", _I),
            ("failed", _I),
            ("throttled", _I),
            ("invalid_token", _I),
        ),
        False,
        _push_deliveries,
    ),
)


@dataclass(frozen=True, slots=True)
class DatasetParameters:
    """A dataset request's values, validated (:func:`check_parameters`)."""

    tenant: str | None
    since: datetime
    until: datetime
    limit: int = DEFAULT_ROWS
    topic: str | None = None

    def query_items(self) -> list[tuple[str, str]]:
        """As query-string items (the HTTP client's side)."""
        items = [
            ("since", json_value(self.since)),
            ("until", json_value(self.until)),
            ("limit", str(self.limit)),
        ]
        if self.tenant is not None:
            items.append(("tenant", self.tenant))
        if self.topic is not None:
            items.append(("topic", self.topic))
        return items


@dataclass(frozen=True, slots=True)
class DatasetRows:
    """A dataset's answer: its columns, at most ``limit`` rows, and whether more were cut."""

    dataset: str
    columns: tuple[str, ...]
    rows: list[tuple[Any, ...]]
    truncated: bool

    def body(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "columns": list(self.columns),
            "rows": [[json_value(value) for value in row] for row in self.rows],
            "truncated": self.truncated,
        }


def dataset(name: str) -> Dataset:
    return known(
        DATASETS,
        name,
        "quality dataset",
        partial(QualityDataError, AnalyticsErrorCode.UNKNOWN_DATASET),
    )


def check_parameters(data: Dataset, parameters: DatasetParameters) -> DatasetParameters:
    """``parameters`` if ``data`` can run with them; raises :class:`QualityDataError`."""
    invalid = AnalyticsErrorCode.INVALID_PARAMETER
    if parameters.tenant is not None and not TENANT_PATTERN.match(parameters.tenant):
        raise QualityDataError(invalid, TENANT_RULE, "tenant")
    if data.reads_topic:
        if parameters.topic is None:
            raise QualityDataError(invalid, f"{data.name} needs the topic to read", "topic")
        if not _TOPIC.match(parameters.topic):
            raise QualityDataError(invalid, "topic must be a Kafka topic name", "topic")
    for field, moment in (("since", parameters.since), ("until", parameters.until)):
        if not in_range(moment):
            raise QualityDataError(invalid, f"{field} must be between 1900 and 2299 UTC", field)
    if parameters.since >= parameters.until:
        raise QualityDataError(invalid, "since must be before until", "since")
    if not 1 <= parameters.limit <= MAX_ROWS:
        raise QualityDataError(invalid, f"limit must be 1 to {MAX_ROWS}", "limit")
    return parameters


class DatasetQuery(QueryModel):
    """``?topic=&tenant=&since=&until=&limit=`` of a dataset (all optional; ``topic`` is for the
    datasets that read a topic, and needed by them)."""

    topic: str | None = None
    tenant: Tenant = None
    since: Since = None
    until: Until = None
    limit: Annotated[int, count(MAX_ROWS, DEFAULT_ROWS)] = DEFAULT_ROWS

    def parameters(self, data: Dataset, *, now: datetime) -> DatasetParameters:
        """For ``data``, with the window's defaults; raises :class:`QualityDataError`."""
        if self.topic is not None and not data.reads_topic:
            allowed = [name for name in PARAMETERS if name != "topic"]
            raise QualityDataError(
                AnalyticsErrorCode.UNKNOWN_PARAMETER,
                f"unknown parameter 'topic'; {data.name} takes {', '.join(allowed)}",
                "topic",
            )
        until = self.until or now.astimezone(UTC)
        return check_parameters(
            data,
            DatasetParameters(
                tenant=self.tenant,
                since=self.since or until - DEFAULT_WINDOW,
                until=until,
                limit=self.limit,
                topic=self.topic,
            ),
        )


def run_dataset(
    client: Client, database: str, data: Dataset, parameters: DatasetParameters
) -> DatasetRows:
    """Run ``data`` on ``client`` (blocking; for chDB call it on the store's thread)."""
    check_parameters(data, parameters)
    bound: dict[str, Any] = {
        "tenant": parameters.tenant,
        "since": parameters.since,
        "until": parameters.until,
        "limit_plus_one": parameters.limit + 1,
    }
    if data.reads_topic:
        bound["topic"] = parameters.topic
    result = client.query(data.sql(database), parameters=bound, query_tz="UTC")
    rows = [tuple(row) for row in result.result_rows]
    return DatasetRows(
        dataset=data.name,
        columns=data.column_names,
        rows=rows[: parameters.limit],
        truncated=len(rows) > parameters.limit,
    )


def json_value(value: Any) -> Any:
    """A ClickHouse value as JSON: times in UTC with ``Z`` and microseconds."""
    if isinstance(value, datetime):
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return value.isoformat(timespec="microseconds").replace("+00:00", "Z")
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


def _store(request: Request) -> ClickHouseStore:
    store = request.app.state.analytics.store
    assert isinstance(store, ClickHouseStore)
    return store


def quality_router() -> APIRouter:
    """``/v1/quality/datasets``: the fixed datasets over the store of the app's analytics."""
    router = APIRouter(prefix="/v1/quality", tags=["quality"])

    @router.get("/datasets", summary="The data-quality datasets")
    async def list_datasets() -> dict[str, Any]:
        return {"datasets": [data.describe() for data in DATASETS.values()]}

    @router.get(
        "/datasets/{name}",
        summary="Read a data-quality dataset: ?topic=&tenant=&since=&until=&limit=",
        responses={
            400: {"description": "unknown-parameter or invalid-parameter"},
            404: {"description": "unknown-dataset"},
            503: {"description": "unavailable: ClickHouse did not answer"},
        },
        dependencies=[Depends(once_each)],
    )
    async def read_dataset(
        data: Annotated[Dataset, Depends(dataset)],
        asked: Annotated[DatasetQuery, Query()],
        store: Annotated[ClickHouseStore, Depends(_store)],
    ) -> dict[str, Any]:
        parameters = asked.parameters(data, now=datetime.now(UTC))
        rows = await answered(
            store.call_async(lambda client: run_dataset(client, store.database, data, parameters)),
            partial(QualityDataError, AnalyticsErrorCode.UNAVAILABLE),
            log,
            f"quality dataset {data.name} failed",
        )
        return rows.body()

    return router
