"""``imstream replay`` and ``imstream rebuild``: read the topics again into a store or a topic.

``replay`` (``core.replay``): one topic's range, by offsets or by time, into the CQL sink's
tables, the ClickHouse audit, or another topic; rate-limited, resumable, safe to run twice.
``rebuild``: the CQL serving tables or the ClickHouse audit, from the topics, into fresh tables,
then a swap. Jobs that write ClickHouse run in the process that owns it (chDB: one process per
data path), through its operator API; the others run here. Every run that writes ends with an
``operator.action`` audit event.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from types import FrameType
from typing import Annotated, Any

import httpx
import typer
from cassandra.cluster import Session

from core.connections import CqlUnavailableError, cql_session
from core.groups import cql_sink_group
from core.principals import StaffRole
from core.replay import (
    PartitionRange,
    ReplayError,
    ReplayProgress,
    ReplayResult,
    group_for,
    replay,
    resolve_ranges,
    run_id_for,
)
from core.settings import Settings
from pipelines.console import StatusLine, load_settings, table_text
from pipelines.dlq import DlqError, parse_since
from pipelines.operator_actions import OperatorAuditError, operator_name, record_operator_action
from pipelines.replay_targets import CqlTarget, ReplayInterruptedError, TopicTarget
from pipelines.staff_cli import (
    AnalyticsRefusalError,
    StaffCredential,
    analytics_base_url,
    call_analytics,
)
from schemas.events import OperatorOutcome
from schemas.topics import Topic, TopicCatalog, topic_catalog
from sinks.clickhouse.schema import audited_topics
from sinks.cql.migrate import MigrationError, check_keyspace_name, migrate
from sinks.cql.serving import serving_keyspace, swap_serving_keyspace
from sinks.cql.sink import CqlSink
from sinks.cql.verify import TableComparison, compare_keyspaces

log = logging.getLogger(__name__)

REPLAY_COMMAND = "replay"
EXIT_INTERRUPTED = 3
#: How often the CLI asks the ClickHouse-owning process how a job is doing.
JOB_POLL_SECONDS = 0.5
#: The token the CLI signs for the operator API lives this long.

rebuild_app = typer.Typer(
    help="Rebuild a store from the topics into fresh tables, then swap them in.",
    no_args_is_help=True,
)

Timeout = Annotated[
    float, typer.Option("--timeout", min=1.0, help="seconds to wait for Kafka/ClickHouse answers")
]
OperatorOption = Annotated[
    str | None,
    typer.Option("--operator", help="who runs this, for the audit (default: the login name)"),
]
DryRun = Annotated[bool, typer.Option("--dry-run", help="only show what would be done")]


def _settings() -> Settings:
    logging.getLogger("imstream.kafka").setLevel(logging.CRITICAL)
    return load_settings()


def _fail(code: str, message: str, exit_code: int = 1) -> typer.Exit:
    typer.echo(f"error: [{code}] {message}", err=True)
    return typer.Exit(exit_code)


def _seconds(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    whole = int(seconds)
    return f"{whole // 60}m{whole % 60:02d}s" if whole >= 60 else f"{whole}s"


class Progress(StatusLine):
    """The progress of a run on stderr: done/total, rate, ETA (``pipelines/console.py``: one
    replaced line on a terminal, a line every few seconds on a pipe, the final one always)."""

    def __init__(self, verb: str) -> None:
        super().__init__()
        self.verb = verb

    def __call__(self, done: int, total: int, rate: float, eta: float | None) -> None:
        percent = 100.0 * done / total if total else 100.0
        self.update(
            f"{self.verb} {done}/{total} offsets ({percent:.0f}%)  {rate:,.0f} records/s  "
            f"ETA {_seconds(eta)}",
            final=done >= total,
        )


@contextmanager
def _interruptible() -> Iterator[threading.Event]:
    """A stop event set by Ctrl-C/SIGTERM: the run stops after the chunk in hand."""
    stop = threading.Event()

    def interrupt(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    if threading.current_thread() is not threading.main_thread():  # called as a library
        yield stop
        return
    previous = (signal.signal(signal.SIGINT, interrupt), signal.signal(signal.SIGTERM, interrupt))
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])


def _audit(  # noqa: PLR0917
    settings: Settings,
    operator: str,
    command: str,
    arguments: dict[str, Any],
    counts: dict[str, int],
    outcome: OperatorOutcome,
    error: str | None = None,
) -> None:
    try:
        event = record_operator_action(
            settings,
            operator=operator,
            command=command,
            arguments=arguments,
            counts=counts,
            outcome=outcome,
            error=error,
        )
        typer.echo(f"audited as operator.action {event.event_id}", err=True)
    except OperatorAuditError as failure:
        typer.echo(f"warning: [audit-failed] the operator action was not recorded: {failure}")


def _catalog_topic(catalog: TopicCatalog, name: str) -> Topic:
    for topic in catalog:
        if name in {topic.name, topic.logical_name}:
            return topic
    raise ReplayError("topic-unknown", f"{name} is not a topic of the catalog (imstream topics)")


# -- the operator API of the ClickHouse-owning process --


@dataclass(frozen=True)
class OperatorApi:
    """``analytics.operator_api``, over HTTP with a staff token (``pipelines.staff_cli``):
    signed afresh for each call, so a long replay never outlives its token."""

    url: str
    credential: StaffCredential
    timeout: float

    @classmethod
    def of(cls, settings: Settings, operator: str, url: str | None, timeout: float) -> OperatorApi:
        try:
            credential = StaffCredential.of(settings, StaffRole.OPERATOR, operator)
        except ValueError as error:
            raise ReplayError("operator-token-unavailable", str(error)) from error
        base = url or analytics_base_url(settings)
        return cls(base.rstrip("/"), credential, timeout)

    @property
    def operator(self) -> str:
        """Who the API records as the operator: the token's ``sub``."""
        return self.credential.subject

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            return call_analytics(
                method,
                f"{self.url}{path}",
                self.credential.header(),
                body=body,
                timeout=self.timeout,
            )
        except AnalyticsRefusalError as error:
            if error.code is None or error.message is None:
                raise ReplayError(
                    "operator-api-failed", f"HTTP {error.status} from {self.url}{path}"
                ) from error
            raise ReplayError(error.code, error.message) from error
        except httpx.TransportError as error:
            raise ReplayError(
                "clickhouse-sink-unreachable",
                f"the ClickHouse sink's operator API at {self.url} does not answer ({error}); "
                "is `imstream run clickhouse-sink` (or `imstream up`) running?",
            ) from error

    def follow(
        self,
        job: dict[str, Any],
        stop: threading.Event,
        show: Callable[[dict[str, Any]], None],
    ) -> dict[str, Any]:
        """Poll the job until it ends; on ``stop`` ask it to stop and wait for that."""
        asked = False
        while job["state"] == "running":
            if stop.is_set() and not asked:
                job = self.call("DELETE", f"/v1/operator/jobs/{job['id']}")
                asked = True
            time.sleep(JOB_POLL_SECONDS)
            job = self.call("GET", f"/v1/operator/jobs/{job['id']}")
            show(job)
        return job


# -- replay --


def _ranges_text(ranges: list[PartitionRange]) -> str:
    return ", ".join(f"[{r.partition}] {r.start}..{r.end}" for r in ranges)


def replay_command(  # noqa: PLR0917 - typer maps each parameter to an option
    topic: Annotated[str, typer.Argument(help="the topic to read, e.g. im.messages.sequenced")],
    into: Annotated[
        str,
        typer.Option(
            "--into",
            help="where the records go: cql (the CQL sink's tables), clickhouse (the audit), or "
            "topic:NAME (re-published into that catalog topic)",
        ),
    ],
    partition: Annotated[
        list[int] | None, typer.Option("--partition", help="only this partition (repeatable)")
    ] = None,
    from_offset: Annotated[
        int | None, typer.Option("--from-offset", min=0, help="first offset (inclusive)")
    ] = None,
    to_offset: Annotated[
        int | None, typer.Option("--to-offset", min=0, help="end offset (exclusive)")
    ] = None,
    since: Annotated[
        str | None,
        typer.Option("--since", help="from the first record at/after this time (ISO or age: 6h)"),
    ] = None,
    until: Annotated[
        str | None,
        typer.Option("--until", help="up to the first record at/after this time (exclusive)"),
    ] = None,
    rate: Annotated[
        float, typer.Option("--rate", min=0.0, help="at most this many records/s (0: no limit)")
    ] = 5000.0,
    run_id: Annotated[
        str | None,
        typer.Option(
            "--run-id",
            help="the cursor's name (default: derived from the arguments, so the same command "
            "resumes an interrupted run and a finished one replays nothing)",
        ),
    ] = None,
    again: Annotated[
        bool,
        typer.Option("--again", help="replay even if this command ran before (a new run id)"),
    ] = False,
    dry_run: DryRun = False,
    analytics_url: Annotated[
        str | None,
        typer.Option(
            "--analytics-url", help="the ClickHouse sink's HTTP endpoint (default: the settings)"
        ),
    ] = None,
    operator: OperatorOption = None,
    timeout: Timeout = 30.0,
) -> None:
    """Replay a topic range into a sink or back into a topic.

    Rate-limited, resumable (Ctrl-C, then the same command continues after the last applied
    chunk) and safe to run twice: the same command finds its cursor at the end, and --again
    replays into sinks that write every record idempotently. Exit 3 when interrupted."""
    settings = _settings()
    catalog = topic_catalog(settings)
    who = operator_name(operator)
    if into == "clickhouse" and settings.staff_auth.token is not None:
        # The ClickHouse sink records the token's operator; the audit names the same one.
        who = StaffCredential.of(settings, StaffRole.OPERATOR, operator).subject
    try:
        source = _catalog_topic(catalog, topic)
        bounds = {
            "since": parse_since(since) if since else None,
            "until": parse_since(until, option="--until") if until else None,
        }
        ranges = resolve_ranges(
            settings,
            source.name,
            partitions=partition,
            from_offset=from_offset,
            to_offset=to_offset,
            timeout=timeout,
            **bounds,
        )
        arguments: dict[str, Any] = {
            "topic": source.logical_name,
            "into": into,
            "partitions": partition,
            "from_offset": from_offset,
            "to_offset": to_offset,
            "since": since,
            "until": until,
            "rate": rate,
        }
        run = run_id or run_id_for(
            REPLAY_COMMAND, *(f"{k}={v}" for k, v in sorted(arguments.items()) if k != "rate")
        )
        if again:
            run = run_id_for(run, datetime.now(UTC).isoformat())
        arguments["run_id"] = run
        total = sum(r.size for r in ranges)
        typer.echo(
            f"{'dry run: ' if dry_run else ''}replay {source.name} {_ranges_text(ranges)} "
            f"({total} offsets) into {into}, run {run} (cursor group {group_for(settings, run)})",
            err=True,
        )
        if dry_run:
            _check_target(catalog, source, into)
            typer.echo(f"dry run: would replay up to {total} records; nothing written")
            return
        with _interruptible() as stop, Progress("replayed") as show:
            result = _replay_into(
                settings,
                catalog,
                source,
                into,
                ranges,
                run,
                rate,
                stop,
                show,
                who,
                analytics_url,
                timeout,
            )
    except (ReplayError, DlqError) as error:
        raise _fail(error.code, error.message) from error
    outcome = OperatorOutcome.SUCCEEDED if result.finished else OperatorOutcome.INTERRUPTED
    _audit(settings, who, REPLAY_COMMAND, arguments, result.counts(), outcome)
    typer.echo(
        f"replayed {result.replayed} records of {source.name} into {into} in {result.chunks} "
        f"chunks ({result.elapsed:.1f} s); {result.already_done} offsets done by an earlier run "
        f"of {run}; {'finished' if result.finished else 'interrupted'}"
    )
    if not result.finished:
        typer.echo("interrupted: run the same command again to continue", err=True)
        raise typer.Exit(EXIT_INTERRUPTED)


def _check_target(catalog: TopicCatalog, source: Topic, into: str) -> None:
    if into == "cql":
        reads = CqlTarget.reads(catalog)
    elif into == "clickhouse":
        reads = audited_topics(catalog)
    elif into.startswith("topic:"):
        target = _catalog_topic(catalog, into.removeprefix("topic:"))
        if target.name == source.name:
            raise ReplayError(
                "target-is-source", "replaying a topic into itself would read its own output"
            )
        return
    else:
        raise ReplayError("target-unknown", f"--into {into!r}: use cql, clickhouse or topic:NAME")
    if source not in reads:
        names = ", ".join(topic.logical_name for topic in reads)
        raise ReplayError(
            "topic-not-read-by-target", f"{into} reads {names}, not {source.logical_name}"
        )


def _replay_into(  # noqa: PLR0917
    settings: Settings,
    catalog: TopicCatalog,
    source: Topic,
    into: str,
    ranges: list[PartitionRange],
    run: str,
    rate: float,
    stop: threading.Event,
    show: Progress,
    operator: str,
    analytics_url: str | None,
    timeout: float,
) -> ReplayResult:
    _check_target(catalog, source, into)

    def progress(state: ReplayProgress) -> None:
        show(state.done, state.total, state.rate, state.eta)

    if into == "clickhouse":
        api = OperatorApi.of(settings, operator, analytics_url, timeout)
        body = {"run_id": run, "ranges": [r.as_json() for r in ranges], "rate": rate or None}
        job = api.call("POST", "/v1/operator/replays", body)
        job = api.follow(
            job,
            stop,
            lambda j: show(j["done"], j["total"], j["rate"], j["eta_seconds"]),
        )
        if job["state"] == "failed":
            raise ReplayError(job["error_code"] or "job-failed", job["error"] or "the job failed")
        counts = job.get("counts") or {}
        result = ReplayResult(run_id=run, target=into, ranges=ranges)
        result.replayed = int(counts.get("replayed", 0))
        result.already_done = int(counts.get("already_done", 0))
        result.chunks = int(counts.get("chunks", 0))
        result.finished = job["state"] == "finished"
        return result
    if into.startswith("topic:"):
        target_topic = _catalog_topic(catalog, into.removeprefix("topic:"))
        target = TopicTarget(settings, target_topic, run, timeout)
        try:
            return replay(
                settings, ranges, target, run_id=run, rate=rate or None, stop=stop,
                progress=progress, timeout=timeout,
            )  # fmt: skip
        finally:
            target.close()
    with _cql(settings) as session:
        keyspace = serving_keyspace(session, settings.cql.keyspace)
        cql_target = CqlTarget(settings, session, catalog, keyspace, stop)
        try:
            return replay(
                settings, ranges, cql_target, run_id=run, rate=rate or None, stop=stop,
                progress=progress, timeout=timeout,
            )  # fmt: skip
        except ReplayInterruptedError:
            return ReplayResult(run_id=run, target=into, ranges=ranges)
        finally:
            cql_target.close()


@contextmanager
def _cql(settings: Settings) -> Iterator[Session]:
    logging.getLogger("cassandra").setLevel(logging.ERROR)
    try:
        with cql_session(settings) as session:
            yield session
    except CqlUnavailableError as error:
        raise ReplayError("cql-unavailable", str(error)) from error


# -- rebuild --


def _rebuild_run_id(explicit: str | None) -> str:
    if explicit is not None:
        return explicit
    return datetime.now(UTC).strftime("%Y%m%d%H%M%S")


@rebuild_app.command("clickhouse")
def rebuild_clickhouse(  # noqa: PLR0917 - typer maps each parameter to an option
    since: Annotated[
        str | None,
        typer.Option(
            "--since",
            help="rebuild from the first record at/after this time (ISO or age: 6h); older rows "
            "are copied from the live tables (default: everything from the topics)",
        ),
    ] = None,
    run_id: Annotated[
        str | None,
        typer.Option("--run-id", help="resume this rebuild (default: a new one, named by time)"),
    ] = None,
    dry_run: DryRun = False,
    analytics_url: Annotated[
        str | None, typer.Option("--analytics-url", help="the ClickHouse sink's HTTP endpoint")
    ] = None,
    operator: OperatorOption = None,
    timeout: Timeout = 30.0,
) -> None:
    """Rebuild the ClickHouse audit (audit_events, push_outcomes) from the topics into a fresh
    database, then swap the tables in (EXCHANGE TABLES) between two batches of the live sink.

    Runs in the ClickHouse sink process; the previous tables stay in the rebuild database
    (printed at the end) until you drop it. Exit 3 when interrupted (--run-id resumes)."""
    settings = _settings()
    who = operator_name(operator)
    run = _rebuild_run_id(run_id)
    try:
        start = parse_since(since) if since else None
        fresh = f"{settings.clickhouse.database}__rebuild_{run}"
        typer.echo(
            f"{'dry run: ' if dry_run else ''}rebuild ClickHouse database "
            f"{settings.clickhouse.database} into {fresh} from "
            f"{start.isoformat() if start else 'the beginning of every audited topic'}, then swap",
            err=True,
        )
        if dry_run:
            return
        api = OperatorApi.of(settings, who, analytics_url, timeout)
        who = api.operator
        with _interruptible() as stop, Progress("rebuilt") as show:
            job = api.call(
                "POST",
                "/v1/operator/rebuilds",
                {"run_id": run, "since": start.isoformat() if start else None},
            )
            job = api.follow(
                job, stop, lambda j: show(j["done"], j["total"], j["rate"], j["eta_seconds"])
            )
    except (ReplayError, DlqError) as error:
        raise _fail(error.code, error.message) from error
    arguments = {"since": since, "run_id": run}
    counts = {key: int(value) for key, value in (job.get("counts") or {}).items()}
    if job["state"] == "failed":
        _audit(settings, who, "rebuild clickhouse", arguments, counts, OperatorOutcome.FAILED,
               job["error"])  # fmt: skip
        raise _fail(job["error_code"] or "job-failed", job["error"] or "the rebuild failed")
    finished = job["state"] == "finished"
    outcome = OperatorOutcome.SUCCEEDED if finished else OperatorOutcome.INTERRUPTED
    _audit(settings, who, "rebuild clickhouse", arguments, counts, outcome)
    for key, value in sorted(counts.items()):
        typer.echo(f"  {key}: {value}")
    if not finished:
        typer.echo(f"interrupted: `imstream rebuild clickhouse --run-id {run}` continues", err=True)
        raise typer.Exit(EXIT_INTERRUPTED)
    typer.echo(f"rebuilt and swapped: {job['phase']}")


@rebuild_app.command("cql")
def rebuild_cql(
    keyspace: Annotated[
        str | None,
        typer.Option("--keyspace", help="the fresh keyspace (default: <keyspace>_r<time>)"),
    ] = None,
    swap: Annotated[
        bool,
        typer.Option(
            "--swap",
            help="once rebuilt, point the serving keyspace at it (only when it equals the live "
            "tables, unless --force); restart the CQL sink, then the ingress nodes",
        ),
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="swap even when the tables differ from the live ones")
    ] = False,
    dry_run: DryRun = False,
    operator: OperatorOption = None,
) -> None:
    """Rebuild the CQL serving tables from the topics, from the beginning, into a fresh
    keyspace; compare them with the live ones; with --swap, point the serving keyspace at it.

    The rebuild reads as the consumer group the CQL sink uses for that keyspace, so after the
    swap the restarted sink goes on exactly where the rebuild stopped. Run it again with the
    same --keyspace to resume. Exit 3 when interrupted, 4 when the tables differ (no swap)."""
    settings = _settings()
    who = operator_name(operator)
    anchor = settings.cql.keyspace
    fresh = keyspace or f"{anchor}_r{datetime.now(UTC).strftime('%Y%m%d%H%M%S')}"
    arguments: dict[str, Any] = {"keyspace": fresh, "swap": swap, "force": force}
    try:
        check_keyspace_name(fresh)
        if fresh == anchor:
            raise ReplayError("keyspace-is-live", f"{fresh} is the anchor keyspace itself")
        group = cql_sink_group(settings, fresh)
        typer.echo(
            f"{'dry run: ' if dry_run else ''}rebuild the CQL serving tables into keyspace "
            f"{fresh} (consumer group {group}) from the beginning of "
            f"{', '.join(t.logical_name for t in CqlTarget.reads(topic_catalog(settings)))}",
            err=True,
        )
        if dry_run:
            return
        with _cql(settings) as session, _interruptible() as stop:
            live = serving_keyspace(session, anchor)
            if live == fresh:
                raise ReplayError("keyspace-is-live", f"{fresh} serves already")
            migrate(session, fresh, settings.cql.replication_factor)
            finished, records = _fill(settings, session, fresh, stop)
            if not finished:
                _audit(settings, who, "rebuild cql", arguments, {"records": records},
                       OperatorOutcome.INTERRUPTED)  # fmt: skip
                typer.echo(f"interrupted: `imstream rebuild cql --keyspace {fresh}` continues")
                raise typer.Exit(EXIT_INTERRUPTED)
            typer.echo(f"compared with the live keyspace {live}:", err=True)
            comparisons = compare_keyspaces(session, live, fresh)
            _show(comparisons)
            equal = all(c.equal for c in comparisons)
            counts = {"records": records, "tables_differing": sum(not c.equal for c in comparisons)}
            swapped = False
            if swap and (equal or force):
                previous = swap_serving_keyspace(session, anchor, fresh, who)
                swapped = True
                typer.echo(
                    f"swapped: keyspace {fresh} serves (was {previous}); restart the CQL sink, "
                    "then the ingress nodes, for them to use it"
                )
            arguments["swapped"] = swapped
            _audit(settings, who, "rebuild cql", arguments, counts, OperatorOutcome.SUCCEEDED)
    except (ReplayError, MigrationError) as error:
        raise _fail(str(error.code), error.message) from error
    if swap and not swapped:
        typer.echo(f"not swapped: {counts['tables_differing']} tables differ (see above; --force)")
        raise typer.Exit(4)
    typer.echo(f"rebuilt {fresh} from {records} records; tables equal to the live ones: {equal}")


def _fill(
    settings: Settings, session: Session, keyspace: str, stop: threading.Event
) -> tuple[bool, int]:
    """Run the CQL sink into ``keyspace`` until it has read every input to its end."""
    sink = CqlSink(settings, session, keyspace=keyspace, stop=stop)
    done = threading.Event()
    started = time.monotonic()

    def counts() -> str:
        records = sink.stats.records
        rate = records / max(time.monotonic() - started, 1e-9)
        return f"rebuilt: {records} records  {rate:,.0f} records/s"

    def report(line: StatusLine) -> None:
        while not done.wait(1.0):
            line.update(counts())

    with StatusLine() as line:
        watcher = threading.Thread(target=report, args=(line,), daemon=True)
        watcher.start()
        try:
            sink.run(stop, until_caught_up=True)
        finally:
            done.set()
            watcher.join()
        line.update(counts(), final=True)
    return not stop.is_set(), sink.stats.records


def _show(comparisons: list[TableComparison]) -> None:
    rows = [
        (c.table, str(c.live_rows), str(c.rebuilt_rows), "equal" if c.equal else "DIFFERENT")
        for c in comparisons
    ]
    header = ("TABLE", "LIVE ROWS", "REBUILT ROWS", "RESULT")
    typer.echo(table_text(header, rows, right={"LIVE ROWS", "REBUILT ROWS"}))
