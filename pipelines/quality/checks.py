"""The quality suites: frames built from the audit's datasets and a CQL sample, validated by
great-expectations, with a Data Docs site written to a directory (docs/quality.md).

What great-expectations lacks as a built-in — "strictly increasing per group", "present in the
other store", referential integrity — is computed here in pandas as a per-row boolean column
(``seq_follows_previous``, ``in_timeline``, ``conversation_exists`` …) and validated with the
built-in ``expect_column_values_to_be_in_set([True])``, so that Data Docs names each check and
lists the offending rows by their ids (``unexpected_index_column_names``).

Importing this module imports great-expectations (seconds): the CLI imports it only when a check
runs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import great_expectations as gx
import great_expectations.expectations as gxe
import pandas as pd
from great_expectations.data_context.types.base import (
    DataContextConfig,
    InMemoryStoreBackendDefaults,
    ProgressBarsConfig,
)
from great_expectations.expectations.expectation import Expectation

from analytics.quality_api import (
    DATASETS,
    MAX_ROWS,
    MESSAGE_SENT_TYPE,
    ColumnKind,
    Dataset,
    DatasetParameters,
    DatasetRows,
)
from pipelines.quality.sources import (
    AuditReader,
    ConversationKey,
    CqlSample,
    QualityError,
    QualityErrorCode,
)

SITE_NAME = "imstream-quality"
#: Offending rows listed per expectation in the results (and in Data Docs).
PARTIAL_UNEXPECTED = 20


@dataclass(frozen=True, slots=True)
class Thresholds:
    """What "within bounds" means; every value is a ``imstream quality check`` option."""

    #: No event happened before this (the service did not exist).
    timestamp_floor: datetime = datetime(2020, 1, 1, tzinfo=UTC)
    #: How far an event's ``occurred_at`` may run ahead of its Kafka record's timestamp: clocks
    #: of different machines disagree a little; more is a wrong clock or a forged time.
    max_clock_skew: timedelta = timedelta(minutes=5)
    #: Share of a provider's deliveries whose last attempt failed or was throttled.
    max_push_failure_share: float = 0.05
    #: Share of a provider's deliveries that found the device's token invalid.
    max_push_invalid_token_share: float = 0.5
    #: Providers with fewer deliveries in the window are not judged (too few to mean anything).
    push_min_deliveries: int = 20
    #: Entries sequenced less than this long ago may still be on their way to the CQL store.
    settle: timedelta = timedelta(seconds=60)


@dataclass(frozen=True, slots=True)
class Topics:
    """The topics the datasets read, as this deployment's catalog names them."""

    conversation_log: str
    sync_events: str


@dataclass(frozen=True, slots=True)
class CheckOptions:
    tenant: str | None
    since: datetime
    until: datetime
    #: Conversations sampled from each source (the audit's most recent, members, conversations).
    sample: int = 100
    #: Rows per audit dataset at most.
    max_rows: int = 100_000
    thresholds: Thresholds = field(default_factory=Thresholds)


@dataclass(frozen=True, slots=True)
class CheckSpec:
    """One expectation of a suite, under a stable name (``suite.check`` in the summary)."""

    name: str
    #: May name a threshold: ``{max_push_failure_share}`` (a field of :class:`Thresholds`).
    description: str
    expectation: Callable[[Thresholds], Expectation]

    def describe(self, thresholds: Thresholds) -> str:
        return self.description.format_map(asdict(thresholds))


@dataclass(frozen=True, slots=True)
class SuiteSpec:
    name: str
    frame: str
    description: str
    #: The columns that identify an offending row in the results and in Data Docs.
    index_columns: tuple[str, ...]
    checks: tuple[CheckSpec, ...]


def _all_true(column: str) -> Callable[[Thresholds], Expectation]:
    return lambda _thresholds: gxe.ExpectColumnValuesToBeInSet(column=column, value_set=[True])


SUITES: tuple[SuiteSpec, ...] = (
    SuiteSpec(
        name="audit-messages",
        frame="messages",
        description="message.sent records of the conversation log (after the audit's dedupe by "
        "Kafka coordinates): one message per client send",
        index_columns=("tenant_id", "conversation_id", "conversation_seq"),
        checks=(
            CheckSpec(
                "message_ids_unique",
                "Every message id (event id of a sequenced message.sent) is sequenced once: a "
                "second one means a client send became two messages",
                lambda _t: gxe.ExpectColumnValuesToBeUnique(column="message_id"),
            ),
        ),
    ),
    SuiteSpec(
        name="audit-conversation-log",
        frame="conversation_log",
        description="Timeline entries (messages, recalls, edits) of the conversation log, per "
        "conversation in Kafka order",
        index_columns=("tenant_id", "conversation_id", "conversation_seq", "previous_seq"),
        checks=(
            CheckSpec(
                "seq_strictly_increasing",
                "Each entry's conversation_seq is the previous entry's + 1 (per conversation, in "
                "Kafka order): strictly increasing, without gaps",
                _all_true("seq_follows_previous"),
            ),
        ),
    ),
    SuiteSpec(
        name="audit-sync-queue",
        frame="sync_queue",
        description="Records of the sync-events topic, per user in Kafka order",
        index_columns=("tenant_id", "user_id", "sync_id", "previous_sync_id"),
        checks=(
            CheckSpec(
                "sync_ids_strictly_increasing",
                "Each sync record's sync_id is above the user's previous one (gaps allowed)",
                _all_true("sync_id_increasing"),
            ),
        ),
    ),
    SuiteSpec(
        name="audit-timestamps",
        frame="occurred_at_bounds",
        description="occurred_at of every audited record, per topic",
        index_columns=("topic", "records"),
        checks=(
            CheckSpec(
                "occurred_at_not_before_floor",
                "No event occurred before the floor {timestamp_floor} (--timestamp-floor)",
                lambda t: gxe.ExpectColumnValuesToBeBetween(
                    column="earliest_occurred_at", min_value=t.timestamp_floor
                ),
            ),
            CheckSpec(
                "occurred_at_not_ahead_of_record",
                "No event occurred later than its Kafka record was written plus the clock skew "
                "{max_clock_skew} (--max-clock-skew-seconds): in particular, none is in the future",
                lambda t: gxe.ExpectColumnValuesToBeBetween(
                    column="max_seconds_ahead_of_record",
                    max_value=t.max_clock_skew.total_seconds(),
                ),
            ),
        ),
    ),
    SuiteSpec(
        name="audit-push-outcomes",
        frame="push_deliveries",
        description="Push deliveries (job, device) per provider by their last attempt's outcome; "
        "providers with fewer than --push-min-deliveries are not judged",
        index_columns=("provider", "deliveries"),
        checks=(
            CheckSpec(
                "push_failure_share",
                "The share of deliveries whose last attempt failed or was throttled is at most "
                "{max_push_failure_share} (--max-push-failure-share)",
                lambda t: gxe.ExpectColumnValuesToBeBetween(
                    column="failure_share", min_value=0.0, max_value=t.max_push_failure_share
                ),
            ),
            CheckSpec(
                "push_invalid_token_share",
                "The share of deliveries that found an invalid token is at most "
                "{max_push_invalid_token_share} (--max-push-invalid-token-share)",
                lambda t: gxe.ExpectColumnValuesToBeBetween(
                    column="invalid_token_share",
                    min_value=0.0,
                    max_value=t.max_push_invalid_token_share,
                ),
            ),
        ),
    ),
    SuiteSpec(
        name="cql-timeline",
        frame="timeline",
        description="Timeline entries of the sampled conversations, from the audit, looked up "
        "in the CQL timeline",
        index_columns=("tenant_id", "conversation_id", "conversation_seq", "event_id"),
        checks=(
            CheckSpec(
                "sequenced_entries_in_timeline",
                "Every sequenced entry is in the CQL timeline at its seq, with its event id",
                _all_true("in_timeline"),
            ),
        ),
    ),
    SuiteSpec(
        name="cql-members",
        frame="members",
        description="Member rows of the sampled conversations",
        index_columns=("tenant_id", "conversation_id", "user_id"),
        checks=(
            CheckSpec(
                "members_reference_conversations",
                "Every member row belongs to a conversation that exists",
                _all_true("conversation_exists"),
            ),
        ),
    ),
    SuiteSpec(
        name="cql-conversations",
        frame="conversations",
        description="The sampled conversations that are not deleted",
        index_columns=("tenant_id", "conversation_id"),
        checks=(
            CheckSpec(
                "conversations_have_members",
                "Every conversation that is not deleted has at least one member",
                _all_true("has_members"),
            ),
        ),
    ),
)


@dataclass(frozen=True, slots=True)
class CheckResult:
    suite: str
    check: str
    expectation: str
    success: bool
    observed: str


@dataclass(slots=True)
class Frames:
    """The frames the suites validate, and what the operator should know about them."""

    frames: dict[str, pd.DataFrame]
    notes: list[str]


@dataclass(frozen=True, slots=True)
class QualityReport:
    results: list[CheckResult]
    rows: dict[str, int]
    notes: list[str]
    docs_index: Path

    @property
    def success(self) -> bool:
        return all(result.success for result in self.results)

    def failed(self) -> set[str]:
        """``suite.check`` of every failed expectation."""
        return {f"{r.suite}.{r.check}" for r in self.results if not r.success}


Progress = Callable[[str], None]


def frame(data: Dataset, rows: DatasetRows) -> pd.DataFrame:
    """The rows as a frame with one dtype per column kind (the same from JSON and from a
    client: times become UTC timestamps, integers nullable ``Int64``)."""
    table = pd.DataFrame.from_records(rows.rows, columns=list(data.column_names))
    for name, kind in data.columns:
        if kind is ColumnKind.TIME:
            table[name] = pd.to_datetime(table[name], utc=True, format="ISO8601")
        elif kind is ColumnKind.INTEGER:
            table[name] = pd.array(table[name].tolist(), dtype="Int64")
        elif kind is ColumnKind.FLOAT:
            table[name] = table[name].astype("float64")
        else:
            table[name] = table[name].astype("object")
    return table


class Loader:
    """Reads the datasets and the CQL sample and derives the frames, saying what it does."""

    def __init__(
        self,
        audit: AuditReader,
        cql: CqlSample,
        topics: Topics,
        options: CheckOptions,
        progress: Progress,
    ) -> None:
        self.audit = audit
        self.cql = cql
        self.topics = topics
        self.options = options
        self.progress = progress
        self.notes: list[str] = []

    def read(
        self, name: str, *, topic: str | None = None, limit: int | None = None
    ) -> pd.DataFrame:
        data = DATASETS[name]
        parameters = DatasetParameters(
            tenant=self.options.tenant,
            since=self.options.since,
            until=self.options.until,
            limit=min(limit or self.options.max_rows, MAX_ROWS),
            topic=topic,
        )
        began = time.monotonic()
        rows = self.audit.read(data, parameters)
        elapsed = time.monotonic() - began
        rate = len(rows.rows) / elapsed if elapsed > 0 else 0.0
        self.progress(
            f"  {name}: {len(rows.rows)} rows from {self.audit.where} in {elapsed:.1f}s "
            f"({rate:,.0f} rows/s)"
        )
        if rows.truncated and limit is None:
            self.notes.append(
                f"{name} holds more than {parameters.limit} rows in the window: the checks "
                "saw the first ones only (narrow --since/--until or --tenant, or raise --max-rows)"
            )
        return frame(data, rows)

    def load(self) -> Frames:
        thresholds = self.options.thresholds
        self.progress("reading the audit")
        log = self.read("conversation_log", topic=self.topics.conversation_log)
        sync = self.read("sync_queue", topic=self.topics.sync_events)
        bounds = self.read("occurred_at_bounds")
        push = self.read("push_deliveries")
        recent = self.read(
            "recent_conversations", topic=self.topics.conversation_log, limit=self.options.sample
        )
        frames = {
            "messages": messages_frame(log),
            "conversation_log": conversation_log_frame(log),
            "sync_queue": sync_queue_frame(sync),
            "occurred_at_bounds": bounds,
            "push_deliveries": self.push_frame(push, thresholds),
        }
        frames.update(self.cql_frames(log, recent))
        return Frames(frames=frames, notes=self.notes)

    def push_frame(self, push: pd.DataFrame, thresholds: Thresholds) -> pd.DataFrame:
        judged = push[push["deliveries"] >= thresholds.push_min_deliveries].copy()
        for provider, deliveries in push[push["deliveries"] < thresholds.push_min_deliveries][
            ["provider", "deliveries"]
        ].itertuples(index=False):
            self.notes.append(
                f"push provider {provider}: {deliveries} deliveries in the window, fewer than "
                f"--push-min-deliveries {thresholds.push_min_deliveries}: not judged"
            )
        deliveries = judged["deliveries"].astype("float64")
        judged["failure_share"] = (judged["failed"] + judged["throttled"]).astype(
            "float64"
        ) / deliveries
        judged["invalid_token_share"] = judged["invalid_token"].astype("float64") / deliveries
        return judged.reset_index(drop=True)

    def cql_frames(self, log: pd.DataFrame, recent: pd.DataFrame) -> dict[str, pd.DataFrame]:
        options = self.options
        began = time.monotonic()
        self.progress(f"sampling the CQL store (keyspace {self.cql.keyspace})")
        keys = list(
            dict.fromkeys(
                [
                    *(
                        ConversationKey(tenant, conversation)
                        for tenant, conversation in recent[
                            ["tenant_id", "conversation_id"]
                        ].itertuples(index=False)
                    ),
                    *self.cql.partitions("members", options.tenant, options.sample),
                    *self.cql.partitions("conversations", options.tenant, options.sample),
                ]
            )
        )
        conversations = self.cql.conversations(keys)
        members = self.cql.members(keys)
        self.progress(
            f"  {len(keys)} conversations sampled: {len(conversations)} conversation rows, "
            f"{len(members)} member rows"
        )
        settled_before = datetime.now(UTC) - options.thresholds.settle
        sampled = {(key.tenant_id, key.conversation_id) for key in keys}
        in_sample = pd.Series(
            [
                (tenant, conversation) in sampled
                for tenant, conversation in log[["tenant_id", "conversation_id"]].itertuples(
                    index=False
                )
            ],
            index=log.index,
            dtype=bool,
        )
        entries = log[in_sample & (log["record_timestamp"] < pd.Timestamp(settled_before))]
        timeline = self.cql.timeline(
            (ConversationKey(tenant, conversation), int(seq))
            for tenant, conversation, seq in entries[
                ["tenant_id", "conversation_id", "conversation_seq"]
            ].itertuples(index=False)
        )
        self.progress(
            f"  {len(entries)} sequenced entries looked up, {len(timeline)} found in the "
            f"timeline ({time.monotonic() - began:.1f}s)"
        )
        return {
            "timeline": timeline_frame(entries, timeline),
            "members": members_frame(members, conversations),
            "conversations": conversations_frame(conversations, members),
        }


def messages_frame(log: pd.DataFrame) -> pd.DataFrame:
    sent = log[log["event_type"] == MESSAGE_SENT_TYPE]
    return (
        sent[["tenant_id", "conversation_id", "conversation_seq", "event_id"]]
        .rename(columns={"event_id": "message_id"})
        .reset_index(drop=True)
    )


def conversation_log_frame(log: pd.DataFrame) -> pd.DataFrame:
    """Each entry with the previous entry's seq of its conversation (the rows come in Kafka order
    per conversation) and whether it follows it by exactly one; a conversation's first entry in
    the window has no previous one and passes."""
    table = log[["tenant_id", "conversation_id", "event_type", "conversation_seq"]].copy()
    previous = table.groupby(["tenant_id", "conversation_id"], sort=False)[
        "conversation_seq"
    ].shift(1)
    table["previous_seq"] = previous.astype("Int64")
    table["seq_follows_previous"] = (
        (table["previous_seq"].isna() | (table["conversation_seq"] == table["previous_seq"] + 1))
        .fillna(value=False)
        .astype(bool)
    )
    return table.reset_index(drop=True)


def sync_queue_frame(sync: pd.DataFrame) -> pd.DataFrame:
    """Each sync record with the user's previous sync id (Kafka order per user) and whether it
    is above it."""
    table = sync[["tenant_id", "user_id", "event_type", "sync_id"]].copy()
    previous = table.groupby(["tenant_id", "user_id"], sort=False)["sync_id"].shift(1)
    table["previous_sync_id"] = previous.astype("Int64")
    table["sync_id_increasing"] = (
        (table["previous_sync_id"].isna() | (table["sync_id"] > table["previous_sync_id"]))
        .fillna(value=False)
        .astype(bool)
    )
    return table.reset_index(drop=True)


def timeline_frame(entries: pd.DataFrame, found: list[Any]) -> pd.DataFrame:
    stored = {(row.tenant_id, row.conversation_id, row.seq): row.event_id for row in found}
    table = entries[["tenant_id", "conversation_id", "conversation_seq", "event_id"]].copy()
    table["in_timeline"] = [
        stored.get((tenant, conversation, int(seq))) == event_id
        for tenant, conversation, seq, event_id in table.itertuples(index=False)
    ]
    table["in_timeline"] = table["in_timeline"].astype(bool)
    return table.reset_index(drop=True)


def members_frame(members: list[Any], conversations: list[Any]) -> pd.DataFrame:
    existing = {(row.tenant_id, row.conversation_id) for row in conversations}
    return pd.DataFrame(
        {
            "tenant_id": pd.Series([row.tenant_id for row in members], dtype="object"),
            "conversation_id": pd.Series([row.conversation_id for row in members], dtype="object"),
            "user_id": pd.Series([row.user_id for row in members], dtype="object"),
            "conversation_exists": pd.Series(
                [(row.tenant_id, row.conversation_id) in existing for row in members], dtype=bool
            ),
        }
    )


def conversations_frame(conversations: list[Any], members: list[Any]) -> pd.DataFrame:
    counts: dict[tuple[str, str], int] = {}
    for row in members:
        key = (row.tenant_id, row.conversation_id)
        counts[key] = counts.get(key, 0) + 1
    alive = [row for row in conversations if not row.deleted]
    member_counts = [counts.get((row.tenant_id, row.conversation_id), 0) for row in alive]
    return pd.DataFrame(
        {
            "tenant_id": pd.Series([row.tenant_id for row in alive], dtype="object"),
            "conversation_id": pd.Series([row.conversation_id for row in alive], dtype="object"),
            "kind": pd.Series([row.kind for row in alive], dtype="object"),
            "members": pd.Series(member_counts, dtype="int64"),
            "has_members": pd.Series([count > 0 for count in member_counts], dtype=bool),
        }
    )


def _context(docs_dir: Path) -> Any:
    """An ephemeral context (in-memory stores: each run stands alone) whose one Data Docs site is
    ``docs_dir``; no usage statistics, no progress bars."""
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
        data_docs_sites={
            SITE_NAME: {
                "class_name": "SiteBuilder",
                "show_how_to_buttons": False,
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": f"{docs_dir}/",
                },
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            }
        },
    )
    return gx.get_context(project_config=config, mode="ephemeral")


def validate(
    frames: dict[str, pd.DataFrame],
    thresholds: Thresholds,
    docs_dir: Path,
    progress: Progress,
) -> tuple[list[CheckResult], Path]:
    """Run every suite on its frame (one checkpoint per suite: each validates another frame)
    and build Data Docs into ``docs_dir``; the results and the site's index."""
    try:
        docs_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise QualityError(
            QualityErrorCode.DOCS_UNWRITABLE,
            f"cannot create the Data Docs directory {docs_dir} ({error}); pass --docs-dir",
        ) from error
    context = _context(docs_dir)
    source = context.data_sources.add_pandas("imstream")
    results: list[CheckResult] = []
    for spec in SUITES:
        asset = source.add_dataframe_asset(spec.frame)
        batch = asset.add_batch_definition_whole_dataframe("window")
        suite = context.suites.add(
            gx.ExpectationSuite(name=spec.name, meta={"description": spec.description})
        )
        for check in spec.checks:
            expectation = check.expectation(thresholds)
            expectation.description = f"{check.name}: {check.describe(thresholds)}"
            expectation.meta = {"check": check.name}
            suite.add_expectation(expectation)
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=spec.name, data=batch, suite=suite)
        )
        checkpoint = context.checkpoints.add(
            gx.Checkpoint(
                name=f"imstream-quality-{spec.name}",
                validation_definitions=[definition],
                result_format={
                    "result_format": "SUMMARY",
                    "partial_unexpected_count": PARTIAL_UNEXPECTED,
                    "unexpected_index_column_names": list(spec.index_columns),
                },
            )
        )
        table = frames[spec.frame]
        outcome = checkpoint.run(batch_parameters={"dataframe": table})
        suite_results = [
            _result(spec, result) for run in outcome.run_results.values() for result in run.results
        ]
        results.extend(suite_results)
        failed = sum(not result.success for result in suite_results)
        progress(
            f"  {spec.name}: {len(table)} rows, {len(suite_results) - failed} passed, "
            f"{failed} failed"
        )
    try:
        context.build_data_docs(site_names=[SITE_NAME])
    except OSError as error:
        raise QualityError(
            QualityErrorCode.DOCS_UNWRITABLE,
            f"cannot write Data Docs into {docs_dir} ({error}); pass --docs-dir",
        ) from error
    return results, docs_dir / "index.html"


def _result(spec: SuiteSpec, result: Any) -> CheckResult:
    config = result.expectation_config
    check = str((config.meta or {}).get("check", config.type))
    return CheckResult(
        suite=spec.name,
        check=check,
        expectation=str(config.type),
        success=bool(result.success),
        observed=_observed(spec, result),
    )


def _observed(spec: SuiteSpec, result: Any) -> str:
    exception = result.exception_info or {}
    if exception.get("raised_exception"):
        return f"error: {exception.get('exception_message')}"
    found = result.result or {}
    total = found.get("element_count")
    unexpected = found.get("unexpected_count")
    if total is None or unexpected is None:
        return str(found.get("observed_value", "-"))
    if total == 0:
        return "no rows"
    observed = f"{unexpected} of {total} rows unexpected"
    examples = found.get("partial_unexpected_index_list") or []
    if examples:
        first = examples[0]
        described = " ".join(
            f"{column}={_plain(first.get(column))}" for column in spec.index_columns
        )
        observed += f"; e.g. {described}"
    return observed


def _plain(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, pd.Timestamp | datetime):
        return value.isoformat()
    return str(value)


def run_checks(  # noqa: PLR0917
    audit: AuditReader,
    cql: CqlSample,
    topics: Topics,
    options: CheckOptions,
    docs_dir: Path,
    progress: Progress,
) -> QualityReport:
    """Load, validate, build Data Docs; raises :class:`QualityError` when a store is out of
    reach."""
    if options.since >= options.until:
        raise QualityError(QualityErrorCode.INVALID_OPTION, "--since must be before --until")
    loaded = Loader(audit, cql, topics, options, progress).load()
    progress(f"validating {len(SUITES)} suites")
    results, index = validate(loaded.frames, options.thresholds, docs_dir, progress)
    return QualityReport(
        results=results,
        rows={name: len(table) for name, table in loaded.frames.items()},
        notes=loaded.notes,
        docs_index=index,
    )
