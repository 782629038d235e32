"""``imstream quality check``: run the quality suites, print a summary, write Data Docs.

Exit codes: 0 every expectation passed, 1 at least one failed, 2 the checks could not run (a bad
option, a store out of reach: ``error: [code] what to do``).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import typer
from cassandra import DriverException
from cassandra.cluster import NoHostAvailable, Session

from analytics.quality_api import MAX_ROWS
from core.connections import CqlUnavailableError, clickhouse_client, cql_session
from core.principals import StaffRole
from core.settings import Settings
from core.timeargs import parse_moment
from pipelines.console import load_settings, table_text
from pipelines.quality.sources import (
    AuditReader,
    CqlSample,
    DirectAuditReader,
    HttpAuditReader,
    QualityError,
    QualityErrorCode,
    cql_unavailable,
)
from pipelines.staff_cli import StaffCredential
from schemas.topics import topic_catalog
from sinks.cql.migrate import MigrationError
from sinks.cql.serving import serving_keyspace

quality_app = typer.Typer(
    help="Data quality: great-expectations suites over the ClickHouse audit and the CQL tables.",
    no_args_is_help=True,
)

EXIT_FAILED = 1
EXIT_CANNOT_RUN = 2


def _moment(value: str, option: str, *, relative_to: datetime) -> datetime:
    """The CLI's time argument (``core/timeargs.py``): an age back from ``relative_to`` or an
    ISO time (UTC without an offset)."""
    return parse_moment(
        value,
        option,
        relative_to=relative_to,
        invalid=lambda message: QualityError(QualityErrorCode.INVALID_OPTION, message),
    )


def _progress(line: str) -> None:
    typer.echo(line, err=True)


def audit_reader(settings: Settings, api_url: str | None) -> AuditReader:
    """A ClickHouse server is read directly; chDB through the API of the process that owns the
    data path (``--api-url``, default the analytics endpoint's address)."""
    if settings.clickhouse.url and api_url is None:
        try:
            client = clickhouse_client(settings)
        except Exception as error:  # the client's errors have no common base worth naming
            raise QualityError(
                QualityErrorCode.AUDIT_UNAVAILABLE,
                f"cannot reach ClickHouse at {settings.clickhouse.url} ({error}); check "
                "IM_CLICKHOUSE__URL and that the server is up",
            ) from error
        return DirectAuditReader(client, settings.clickhouse.database, settings.clickhouse.url)
    sinks = settings.sinks
    try:
        credential = StaffCredential.of(settings, StaffRole.PLATFORM_ANALYST)
    except ValueError as error:
        raise QualityError(QualityErrorCode.AUDIT_UNAVAILABLE, str(error)) from error
    return HttpAuditReader(
        api_url or f"http://{sinks.analytics_host}:{sinks.analytics_port}", credential.header
    )


def serving(session: Session, anchor: str) -> str:
    """The keyspace that serves (a rebuilt one may be swapped in for the anchor)."""
    try:
        return serving_keyspace(session, anchor)
    except MigrationError as error:
        raise QualityError(QualityErrorCode.CQL_SCHEMA_MISSING, error.message) from error
    except (NoHostAvailable, DriverException) as error:
        raise cql_unavailable(error) from error


@quality_app.command("check")
def check(  # noqa: PLR0917 (a typer command: one parameter per option)
    tenant: Annotated[
        str | None, typer.Option(help="Check one tenant only (default: every tenant)")
    ] = None,
    since: Annotated[
        str,
        typer.Option(
            help="Start of the window on the Kafka record time: an ISO time (UTC without an "
            "offset), or a duration back from --until (90m, 24h, 7d)"
        ),
    ] = "24h",
    until: Annotated[
        str | None, typer.Option(help="End of the window (exclusive); default now")
    ] = None,
    sample: Annotated[
        int,
        typer.Option(
            min=1,
            max=10_000,
            help="Conversations sampled for the CQL checks from each source: the audit's most "
            "recent ones, and partitions of members and of conversations",
        ),
    ] = 100,
    max_rows: Annotated[
        int, typer.Option(min=1, max=MAX_ROWS, help="Rows read per audit dataset at most")
    ] = 100_000,
    timestamp_floor: Annotated[
        str, typer.Option(help="No event may have occurred before this time")
    ] = "2020-01-01T00:00:00Z",
    max_clock_skew_seconds: Annotated[
        float,
        typer.Option(min=0, help="How far occurred_at may run ahead of the Kafka record timestamp"),
    ] = 300.0,
    max_push_failure_share: Annotated[
        float,
        typer.Option(
            min=0, max=1, help="Per provider: deliveries whose last attempt failed or throttled"
        ),
    ] = 0.05,
    max_push_invalid_token_share: Annotated[
        float, typer.Option(min=0, max=1, help="Per provider: deliveries to an invalid token")
    ] = 0.5,
    push_min_deliveries: Annotated[
        int, typer.Option(min=1, help="Providers with fewer deliveries are not judged")
    ] = 20,
    settle_seconds: Annotated[
        float,
        typer.Option(
            min=0, help="Entries younger than this are not yet expected in the CQL timeline"
        ),
    ] = 60.0,
    docs_dir: Annotated[
        Path | None,
        typer.Option(help="Where to write Data Docs (default <state dir>/quality/data_docs)"),
    ] = None,
    api_url: Annotated[
        str | None,
        typer.Option(
            help="The ClickHouse sink's HTTP API (default http://<IM_SINKS__ANALYTICS_HOST>:"
            "<IM_SINKS__ANALYTICS_PORT>); used with chDB, or to read through it anyway"
        ),
    ] = None,
) -> None:
    """Validate the audit and a sample of the CQL tables; exit 0 all passed, 1 a check failed,
    2 the checks could not run."""
    settings = load_settings()
    began = time.monotonic()
    try:
        # great-expectations takes seconds to import: only when checks run.
        from pipelines.quality.checks import (  # noqa: PLC0415
            CheckOptions,
            Thresholds,
            Topics,
            run_checks,
        )

        now = datetime.now(UTC)
        end = _moment(until, "--until", relative_to=now) if until else now
        options = CheckOptions(
            tenant=tenant or None,
            since=_moment(since, "--since", relative_to=end),
            until=end,
            sample=sample,
            max_rows=max_rows,
            thresholds=Thresholds(
                timestamp_floor=_moment(timestamp_floor, "--timestamp-floor", relative_to=now),
                max_clock_skew=timedelta(seconds=max_clock_skew_seconds),
                max_push_failure_share=max_push_failure_share,
                max_push_invalid_token_share=max_push_invalid_token_share,
                push_min_deliveries=push_min_deliveries,
                settle=timedelta(seconds=settle_seconds),
            ),
        )
        if options.since >= options.until:
            raise QualityError(QualityErrorCode.INVALID_OPTION, "--since must be before --until")
        catalog = topic_catalog(settings)
        topics = Topics(
            conversation_log=catalog.messages_sequenced.name,
            sync_events=catalog.sync_events.name,
        )
        target = docs_dir or settings.stack.state_dir / "quality" / "data_docs"
        audit = audit_reader(settings, api_url)
        _progress(
            f"quality check of {tenant or 'every tenant'}, records from "
            f"{options.since.isoformat()} to {options.until.isoformat()}"
        )
        try:
            with cql_session(settings) as session:
                cql = CqlSample(
                    session,
                    serving(session, settings.cql.keyspace),
                    settings.sinks.timeline_bucket_size,
                )
                report = run_checks(audit, cql, topics, options, target.resolve(), _progress)
        except CqlUnavailableError as error:
            raise QualityError(QualityErrorCode.CQL_UNAVAILABLE, str(error)) from error
    except QualityError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(EXIT_CANNOT_RUN) from error

    rows = [
        (result.suite, result.check, "pass" if result.success else "FAIL", result.observed)
        for result in report.results
    ]
    typer.echo(table_text(("SUITE", "EXPECTATION", "RESULT", "OBSERVED"), rows))
    for note in report.notes:
        typer.echo(f"note: {note}")
    failed = sum(not result.success for result in report.results)
    typer.echo(f"data docs: {report.docs_index}")
    typer.echo(
        f"quality: {len(report.results)} expectations over "
        f"{sum(report.rows.values())} rows, {failed} failed, in "
        f"{time.monotonic() - began:.1f}s"
    )
    if failed:
        raise typer.Exit(EXIT_FAILED)
