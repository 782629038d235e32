"""Full-text message search over the ClickHouse audit (analysts).

``imstream search messages --tenant T QUERY`` asks the analytics API of the process that owns the
ClickHouse data path (``imstream run clickhouse-sink``; chDB allows one process per data path)
and prints the hits as a table, or as JSON with ``--json``. The query is checked here first, so a
bad one is refused with its code without a round trip (docs/analytics.md#search).
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import httpx
import typer

from core.principals import StaffRole
from pipelines.console import load_settings, table_text
from pipelines.staff_cli import AnalyticsRefusalError, StaffCredential, call_analytics
from schemas.search import DEFAULT_LIMIT, SearchError, parse_query

search_app = typer.Typer(
    help="Full-text message search over the ClickHouse audit (analysts).", no_args_is_help=True
)

_SNIPPET_WIDTH = 80


@search_app.command("messages")
def messages(  # noqa: PLR0917 - typer maps each parameter to an option
    query: Annotated[
        str, typer.Argument(help='Words and "quoted phrases", all required, any case')
    ],
    tenant: Annotated[str, typer.Option("--tenant", help="The tenant to search")],
    since: Annotated[
        str | None, typer.Option("--from", help="Sent at or after (RFC 3339 with an offset)")
    ] = None,
    until: Annotated[
        str | None, typer.Option("--to", help="Sent before (RFC 3339 with an offset)")
    ] = None,
    conversation: Annotated[
        str | None, typer.Option("--conversation", help="Only this conversation")
    ] = None,
    sender: Annotated[str | None, typer.Option("--sender", help="Only this sender")] = None,
    limit: Annotated[int, typer.Option("--limit", help="Hits per page (≤ 100)")] = DEFAULT_LIMIT,
    cursor: Annotated[
        str | None, typer.Option("--cursor", help="The next page: the cursor a search printed")
    ] = None,
    url: Annotated[
        str | None,
        typer.Option(
            "--url",
            help="The analytics API; default http://IM_SINKS__ANALYTICS_HOST:_PORT",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="The API's answer as JSON")] = False,
) -> None:
    """Messages of a tenant whose latest text matches QUERY, newest first (recalled ones never)."""
    try:
        parse_query(query)
    except SearchError as error:
        typer.echo(f"error: [{error.code}] {error.message}", err=True)
        raise typer.Exit(2) from error
    settings = load_settings()
    base = url or f"http://{settings.sinks.analytics_host}:{settings.sinks.analytics_port}"
    parameters = {
        "tenant": tenant,
        "q": query,
        "from": since,
        "to": until,
        "conversation": conversation,
        "sender": sender,
        "limit": str(limit),
        "cursor": cursor,
    }
    address = f"{base.rstrip('/')}/v1/search"
    try:
        # The least it needs: an analyst of the tenant searched.
        credential = StaffCredential.of(settings, StaffRole.ANALYST, tenant=tenant)
    except ValueError as error:
        typer.echo(f"error: [staff-token-unavailable] {error}", err=True)
        raise typer.Exit(1) from error
    try:
        answer = call_analytics(
            "GET",
            address,
            credential.header(),
            params={k: v for k, v in parameters.items() if v is not None},
            timeout=30,
        )
    except AnalyticsRefusalError as error:
        code = error.code or "unavailable"
        typer.echo(f"error: [{code}] {error.message or error}", err=True)
        raise typer.Exit(2 if error.status == 400 else 1) from error
    except httpx.TransportError as error:
        typer.echo(
            f"error: [analytics-unreachable] {base} did not answer ({error}); is `imstream run "
            "clickhouse-sink` (or `imstream up`) running? Else pass --url",
            err=True,
        )
        raise typer.Exit(1) from error
    if as_json:
        typer.echo(json.dumps(answer, indent=2, ensure_ascii=False))
    else:
        _print_table(answer["hits"])
    more = f"; next page: --cursor {answer['next_cursor']}" if answer.get("next_cursor") else ""
    typer.echo(
        f"{len(answer['hits'])} hit(s) for {answer['query']!r} in tenant {tenant} "
        f"({answer['elapsed_ms']:.1f} ms in ClickHouse){more}",
        err=True,
    )


def _print_table(hits: list[dict[str, Any]]) -> None:
    header = ("SENT AT", "CONVERSATION", "SEQ", "SENDER", "TEXT")
    rows = [
        (
            hit["sent_at"],
            hit["conversation_id"],
            str(hit["seq"]),
            hit["sender_id"] + (" (edited)" if hit["edited"] else ""),
            _one_line(hit["snippet"]),
        )
        for hit in hits
    ]
    typer.echo(table_text(header, rows))


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _SNIPPET_WIDTH else text[: _SNIPPET_WIDTH - 1] + "…"
