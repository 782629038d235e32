"""The built-in dashboards page of the process that owns ClickHouse (works on chDB locally).

``GET /dashboards`` lists the dashboards of ``dashboards/``; ``GET /dashboards/{name}`` runs each
panel's SQL (dashboards/macros.py: the range, bucket width and tenant bound by ClickHouse, never
pasted in) through the store's one thread, one panel after the other, and answers one HTML page
with a chart per panel drawn on the server as inline SVG (``dashboard_charts``): the browser needs
nothing but this port. ``GET /dashboards/{name}/data`` answers the same panels' rows as JSON.

Parameters: ``range`` (15m, 1h, 6h, 24h, 7d, 30d; the dashboard's default when absent), ``from``
and ``to`` (RFC 3339 with an offset; they override the range), ``tenant`` (absent or empty:
every tenant), ``refresh`` (``on``: the page reloads itself every dashboard's
``refresh_seconds``). A bad parameter is a 400 page with the analytics error codes
(``unknown-parameter``, ``invalid-parameter``); an unknown dashboard a 404 (``unknown-dashboard``).

Each panel marks its state in the DOM — ``data-panel-status`` ``ok`` (a chart), ``empty`` (the
query answered no data), ``error`` (the query failed: the message is shown in the panel, and the
rest of the page renders as usual).
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from html import escape
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from analytics.access import principal_of
from analytics.dashboard_charts import (
    Series,
    bar_svg,
    format_value,
    legend_html,
    timeseries_svg,
)
from analytics.queries import (
    AnalyticsError,
    AnalyticsErrorCode,
    json_value,
    parse_time,
)
from dashboards.definitions import (
    Dashboard,
    DashboardError,
    Panel,
    PanelKind,
    TimeRange,
    load_dashboards,
)
from dashboards.macros import bound_sql
from sinks.clickhouse.schema import AUDIT_TABLE, quote_identifier
from sinks.clickhouse.store import ClickHouseStore

log = logging.getLogger(__name__)

PARAMETERS = ("range", "from", "to", "tenant", "refresh")
#: The widest custom range (``from``/``to``).
MAX_WINDOW = timedelta(days=92)
#: Bucket widths a chart may use (seconds), and how many buckets a range aims at, at most.
INTERVALS = (
    1,
    2,
    5,
    10,
    15,
    30,
    60,
    120,
    300,
    600,
    900,
    1800,
    3600,
    7200,
    10800,
    21600,
    43200,
    86400,
)
MAX_BUCKETS = 150
#: The most rows a panel shows; a query that answers more is cut (and says so).
MAX_PANEL_ROWS = 10_000
#: Per query: ClickHouse stops a panel's query after this long (a slow panel, not a hung page).
#: Read-only; the time budget is the query pool's (``IM_SINKS__ANALYTICS_QUERY_TIMEOUT_SECONDS``).
QUERY_SETTINGS: dict[str, Any] = {"readonly": 2}
_TENANT = re.compile(r"^[A-Za-z0-9._:@+=-]{1,64}$")
#: Pixel size of one grid row and the page's width at which charts are drawn 1:1.
ROW_PX = 30
GAP_PX = 8
PAGE_PX = 1440
UNKNOWN_DASHBOARD = "unknown-dashboard"


@dataclass(frozen=True, slots=True)
class View:
    """What the page shows: the range, the bucket width, the tenant."""

    start: datetime
    end: datetime
    range: TimeRange | None
    tenant: str | None
    refresh: bool

    def interval_for(self, panel: Panel) -> int:
        span = (self.end - self.start).total_seconds()
        fitting = next((step for step in INTERVALS if span / step <= MAX_BUCKETS), INTERVALS[-1])
        return max(fitting, panel.spec.min_interval_seconds)

    def query_string(self, **changes: str | None) -> str:
        values: dict[str, str | None] = {
            "range": self.range.value if self.range else None,
            "from": None if self.range else json_value(self.start),
            "to": None if self.range else json_value(self.end),
            "tenant": self.tenant,
            "refresh": "on" if self.refresh else None,
        }
        values.update(changes)
        return urlencode({key: value for key, value in values.items() if value})


@dataclass
class PanelResult:
    panel: Panel
    status: str  # ok | empty | error
    interval_seconds: int
    columns: list[str] = field(default_factory=list)
    rows: list[Sequence[Any]] = field(default_factory=list)
    error: str | None = None
    truncated: bool = False
    milliseconds: float = 0.0

    def body(self) -> dict[str, Any]:
        return {
            "id": self.panel.id,
            "title": self.panel.spec.title,
            "kind": str(self.panel.spec.kind),
            "status": self.status,
            "interval_seconds": self.interval_seconds,
            "columns": self.columns,
            "rows": [[json_value(value) for value in row] for row in self.rows],
            "truncated": self.truncated,
            "error": self.error,
            "milliseconds": round(self.milliseconds, 1),
        }


def parse_view(dashboard: Dashboard, items: Sequence[tuple[str, str]], now: datetime) -> View:
    """The request's parameters, validated; raises :class:`AnalyticsError`."""
    values: dict[str, str] = {}
    for name, value in items:
        if name not in PARAMETERS:
            raise AnalyticsError(
                AnalyticsErrorCode.UNKNOWN_PARAMETER,
                f"unknown parameter {name!r}; dashboards take {', '.join(PARAMETERS)}",
                name,
            )
        if name in values:
            raise AnalyticsError(
                AnalyticsErrorCode.INVALID_PARAMETER, f"{name} is given more than once", name
            )
        values[name] = value.strip()
    tenant = values.get("tenant") or None
    if tenant is not None and not _TENANT.match(tenant):
        raise AnalyticsError(
            AnalyticsErrorCode.INVALID_PARAMETER,
            "tenant must be 1-64 characters of A-Z a-z 0-9 . _ : @ + = -",
            "tenant",
        )
    refresh = values.get("refresh", "") in ("on", "1", "true")
    chosen: TimeRange | None = None
    if values.get("range"):
        try:
            chosen = TimeRange(values["range"])
        except ValueError as error:
            raise AnalyticsError(
                AnalyticsErrorCode.INVALID_PARAMETER,
                f"range must be one of {', '.join(r.value for r in TimeRange)}",
                "range",
            ) from error
    start, end = _time(values.get("from"), "from"), _time(values.get("to"), "to")
    if start is None and end is None:
        chosen = chosen or dashboard.layout.default_range
        end = now.astimezone(UTC)
        return View(end - timedelta(seconds=chosen.seconds), end, chosen, tenant, refresh)
    end = end or now.astimezone(UTC)
    if start is None:
        seconds = (chosen or dashboard.layout.default_range).seconds
        start = end - timedelta(seconds=seconds)
    if start >= end:
        raise AnalyticsError(AnalyticsErrorCode.INVALID_PARAMETER, "from must be before to", "from")
    if end - start > MAX_WINDOW:
        raise AnalyticsError(
            AnalyticsErrorCode.INVALID_PARAMETER,
            f"a dashboard shows at most {MAX_WINDOW.days} days at a time",
            "from",
        )
    return View(start, end, None, tenant, refresh)


def _time(value: str | None, name: str) -> datetime | None:
    return parse_time(
        value,
        name,
        lambda message: AnalyticsError(AnalyticsErrorCode.INVALID_PARAMETER, message, name),
    )


class DashboardPages:
    """Runs dashboards' panels over one store and renders them."""

    def __init__(
        self, store: ClickHouseStore, dashboards: Sequence[Dashboard] | None = None
    ) -> None:
        self.store = store
        self.load_error: DashboardError | None = None
        if dashboards is None:
            try:
                dashboards = load_dashboards()
            except DashboardError as error:  # the sink keeps running; the page says why
                log.error("the dashboard definitions cannot be used: %s", error)
                self.load_error = error
                dashboards = ()
        self.dashboards = {dashboard.name: dashboard for dashboard in dashboards}

    def dashboard(self, name: str) -> Dashboard:
        found = self.dashboards.get(name)
        if found is None:
            raise LookupError(name)
        return found

    async def run_panel(self, panel: Panel, view: View) -> PanelResult:
        """The panel's rows; a failing query is an ``error`` result, never an exception."""
        interval = view.interval_for(panel)
        query = bound_sql(
            panel.sql,
            database=self.store.database,
            start=view.start,
            end=view.end,
            interval_seconds=interval,
            tenant=view.tenant,
        )
        began = time.perf_counter()
        try:
            result = await self.store.call_async(
                lambda client: client.query(
                    query.sql,
                    parameters=query.parameters,
                    settings=QUERY_SETTINGS,
                    query_tz="UTC",
                )
            )
        except Exception as error:  # shown in the panel; the other panels still render
            log.warning("dashboard panel %s failed: %s", panel.id, error)
            return PanelResult(
                panel,
                "error",
                interval,
                error=_short_error(error),
                milliseconds=(time.perf_counter() - began) * 1000,
            )
        rows = list(result.result_rows)
        return PanelResult(
            panel,
            _status(panel, rows),
            interval,
            columns=list(result.column_names),
            rows=rows[:MAX_PANEL_ROWS],
            truncated=len(rows) > MAX_PANEL_ROWS,
            milliseconds=(time.perf_counter() - began) * 1000,
        )

    async def run(
        self, dashboard: Dashboard, view: View, *, one_tenant: bool = False
    ) -> list[PanelResult]:
        """The panels' rows; ``one_tenant`` (an analyst's page) leaves out the panels that do
        not follow the tenant selector, which would show every tenant."""
        panels = [panel for panel in dashboard.panels if panel.follows_tenant or not one_tenant]
        return [await self.run_panel(panel, view) for panel in panels]

    async def tenants(self, view: View) -> list[str]:
        """Tenants seen in the audit around the range (for the selector); [] if unknown."""
        sql = (
            f"SELECT DISTINCT tenant_id FROM {quote_identifier(self.store.database)}.{AUDIT_TABLE} "
            "WHERE tenant_id != '' AND occurred_at >= {since:DateTime64(3, 'UTC')} "
            "ORDER BY tenant_id LIMIT 500"
        )
        try:
            result = await self.store.call_async(
                lambda client: client.query(
                    sql,
                    parameters={"since": view.start - timedelta(days=30)},
                    settings=QUERY_SETTINGS,
                )
            )
        except Exception as error:  # the selector then offers the current choice only
            log.warning("dashboard tenant list failed: %s", error)
            return []
        return [str(row[0]) for row in result.result_rows]


def _short_error(error: Exception) -> str:
    text = " ".join(str(error).split())
    return text[:600] + ("…" if len(text) > 600 else "")


def _numeric(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and not (isinstance(value, float) and math.isnan(value))
    )


def _status(panel: Panel, rows: list[Sequence[Any]]) -> str:
    if not rows:
        return "empty"
    if panel.spec.kind is PanelKind.STAT:
        return "ok" if any(_numeric(value) for value in rows[0]) else "empty"
    return "ok"


# ---------------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------------


def _as_time(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    raise TypeError(f"the time column holds {type(value).__name__}, not a time")


def _series(result: PanelResult) -> list[Series]:
    """Time-series rows as series: by the ``series`` column's values, else by value column."""
    columns = result.columns
    if "time" not in columns:
        raise ValueError(f"a time series query answers a 'time' column; it answered {columns}")
    time_index = columns.index("time")
    series_index = columns.index("series") if "series" in columns else None
    value_indexes = [
        index for index in range(len(columns)) if index not in (time_index, series_index)
    ]
    found: dict[str, Series] = {}
    for row in result.rows:
        moment = _as_time(row[time_index])
        for index in value_indexes:
            value = row[index]
            if value is None or not _numeric(value):
                continue
            if series_index is not None:
                name = str(row[series_index])
                if len(value_indexes) > 1:
                    name = f"{name} {columns[index]}"
            else:
                name = columns[index].replace("_", " ")
            found.setdefault(name, Series(name)).points[moment] = float(value)
    return list(found.values())


def _panel_size(panel: Panel) -> tuple[int, int]:
    """The chart's drawing size at the page's full width (the CSS grid: 24 columns and rows of
    ``ROW_PX`` with 8 px gaps; a panel has 12 px of padding and a 22 px header)."""
    grid = panel.spec.grid
    column = (PAGE_PX + GAP_PX) / 24
    width = int(column * grid.w - GAP_PX - 2 * 12 - 2)
    height = int(grid.h * (ROW_PX + GAP_PX) - GAP_PX - 2 * 8 - 2 - 22)
    return width, height


def _chart(result: PanelResult, view: View) -> str:
    spec = result.panel.spec
    width, height = _panel_size(result.panel)
    if spec.kind is PanelKind.STAT:
        value = next((v for v in result.rows[0] if _numeric(v)), None)
        return (
            f"<div class='stat' data-chart='stat'>"
            f"{escape(format_value(value, spec.unit, spec.decimals))}</div>"
        )
    if spec.kind is PanelKind.BAR:
        columns = result.columns
        if "category" not in columns:
            raise ValueError(f"a bar query answers a 'category' column; it answered {columns}")
        at = columns.index("category")
        categories = [str(row[at]) for row in result.rows]
        bars = [
            (name, [float(row[index]) if _numeric(row[index]) else 0.0 for row in result.rows])
            for index, name in enumerate(columns)
            if index != at
        ]
        legend = legend_html([name for name, _ in bars]) if len(bars) > 1 else ""
        return (
            bar_svg(
                categories,
                bars,
                unit=spec.unit,
                width=width,
                height=height - (22 if legend else 0),
                decimals=spec.decimals,
                title=spec.title,
            )
            + legend
        )
    series = _series(result)
    if not series:
        raise ValueError("the query answered rows but no numbers")
    legend_rows = 1 + (len(series) - 1) // max(1, spec.grid.w // 4)
    chart = timeseries_svg(
        series,
        start=view.start,
        end=view.end,
        interval_seconds=result.interval_seconds,
        unit=spec.unit,
        width=width,
        height=max(80, height - 18 * legend_rows - 4),
        chart_id=result.panel.id,
        stack=spec.stack,
        bars=spec.style == "bars",
        decimals=spec.decimals,
        title=spec.title,
    )
    summaries = [
        "max " + format_value(max(item.points.values()), spec.unit, spec.decimals)
        for item in series
    ]
    return chart + legend_html([item.name for item in series], summaries)


def _panel_html(result: PanelResult, view: View) -> str:
    spec = result.panel.spec
    grid = spec.grid
    status, body = result.status, ""
    if status == "ok":
        try:
            body = _chart(result, view)
        except (ValueError, TypeError) as error:  # the SQL answered a shape the kind cannot show
            status, result.error = "error", f"cannot draw this answer: {error}"
    if status == "empty":
        body = "<div class='empty'>No data in this range</div>"
    if status == "error":
        body = (
            "<div class='error' role='alert'><b>Query failed</b>"
            f"<pre>{escape(result.error or '')}</pre></div>"
        )
    note = " · cut at 10,000 rows" if result.truncated else ""
    scope = "" if result.panel.follows_tenant else " · all tenants"
    bucket = (
        f" · {_duration(result.interval_seconds)} buckets"
        if spec.kind is PanelKind.TIMESERIES
        else ""
    )
    return (
        f"<section class='panel panel-{spec.kind}' data-panel-id='{escape(spec.id)}' "
        f"data-panel-kind='{spec.kind}' data-panel-status='{status}' "
        f"data-rows='{len(result.rows)}' "
        f"style='grid-column:{grid.x + 1} / span {grid.w};grid-row:{grid.y + 1} / span {grid.h}'>"
        f"<header><h2 title='{escape(spec.description)}'>{escape(spec.title)}</h2>"
        f"<span class='meta'>{result.milliseconds:.0f} ms{bucket}{scope}{note}</span></header>"
        f"<div class='body'>{body}</div></section>"
    )


def _duration(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds % size == 0:
            return f"{seconds // size} {unit}"
    return f"{seconds} s"


_STYLE = """
*{box-sizing:border-box}
body {
  margin:0;
  background:#f4f5f7;
  color:#111827;
  font:14px system-ui,-apple-system,'Segoe UI',sans-serif;
}
.top {
  display:flex;
  align-items:center;
  gap:18px;
  flex-wrap:wrap;
  padding:10px 20px;
  background:#111827;
  color:#f9fafb;
}
.top h1{font-size:17px;margin:0;font-weight:600}
.top nav a{color:#cbd5e1;text-decoration:none;margin-right:12px;font-size:14px}
.top nav a.current{color:#fff;border-bottom:2px solid #60a5fa;padding-bottom:2px}
form.selectors{display:flex;gap:8px;align-items:center;margin-left:auto;flex-wrap:wrap}
form.selectors label{font-size:12px;color:#cbd5e1}
form.selectors select,form.selectors input {
  font:13px system-ui,sans-serif;
  padding:4px 6px;
  border-radius:4px;
  border:1px solid #4b5563;
  background:#1f2937;
  color:#f9fafb;
}
form.selectors input[type=text]{width:190px}
form.selectors button {
  font:13px system-ui,sans-serif;
  padding:5px 12px;
  border-radius:4px;
  border:0;
  background:#2563eb;
  color:#fff;
  cursor:pointer;
}
.range{padding:8px 20px 0;color:#4b5563;font-size:12.5px}
.grid {
  display:grid;
  grid-template-columns:repeat(24,minmax(0,1fr));
  grid-auto-rows:30px;
  gap:8px;
  padding:10px 20px 24px;
  max-width:1480px;
}
.panel {
  background:#fff;
  border:1px solid #e5e7eb;
  border-radius:6px;
  padding:8px 12px;
  display:flex;
  flex-direction:column;
  overflow:hidden;
}
.panel header {
  display:flex;
  align-items:baseline;
  justify-content:space-between;
  gap:8px;
  height:22px;
}
.panel h2 {
  font-size:13.5px;
  margin:0;
  font-weight:600;
  white-space:nowrap;
  overflow:hidden;
  text-overflow:ellipsis;
  cursor:help;
}
.panel .meta{font-size:11px;color:#9ca3af;white-space:nowrap}
.panel .body{flex:1;min-height:0;display:flex;flex-direction:column;justify-content:center}
.stat{font-size:34px;font-weight:600;text-align:center;color:#0f172a;letter-spacing:-.5px}
.panel-stat .body{justify-content:center}
.empty{color:#9ca3af;text-align:center;font-size:13px}
.error {
  color:#991b1b;
  background:#fef2f2;
  border:1px solid #fecaca;
  border-radius:4px;
  padding:6px 8px;
  font-size:12px;
  overflow:auto;
}
.error pre{white-space:pre-wrap;margin:4px 0 0;font-size:11.5px}
svg.chart{display:block;flex:1;min-height:0}
.legend {
  list-style:none;
  margin:2px 0 0;
  padding:0;
  display:flex;
  flex-wrap:wrap;
  gap:2px 14px;
  font-size:11.5px;
  color:#374151;
}
.legend li{display:flex;align-items:center;gap:5px}
.legend .swatch{width:10px;height:10px;border-radius:2px;display:inline-block}
.legend-value{color:#9ca3af}
.list{padding:20px}
.list a{display:block;font-size:16px;margin:10px 0;color:#1d4ed8}
.list p{margin:2px 0 14px;color:#4b5563}
"""


def _page(title: str, body: str, *, refresh_seconds: int | None = None) -> str:
    refresh = f"<meta http-equiv='refresh' content='{refresh_seconds}'>" if refresh_seconds else ""
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<meta name='viewport' content='width=device-width, initial-scale=1'>{refresh}"
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head><body>{body}</body></html>"
    )


def _nav(pages: DashboardPages, current: str | None, view: View | None) -> str:
    links = []
    for name, dashboard in pages.dashboards.items():
        query = (
            f"?{view.query_string(range=view.range.value if view.range else None)}" if view else ""
        )
        css = " class='current'" if name == current else ""
        links.append(
            f"<a href='/dashboards/{escape(name)}{escape(query)}'{css}>"
            f"{escape(dashboard.title)}</a>"
        )
    return f"<nav>{''.join(links)}</nav>"


def _selectors(dashboard: Dashboard, view: View, tenants: list[str]) -> str:
    options = ["<option value=''>All tenants</option>"]
    known = sorted(set(tenants) | ({view.tenant} if view.tenant else set()))
    for tenant in known:
        selected = " selected" if tenant == view.tenant else ""
        options.append(f"<option value='{escape(tenant)}'{selected}>{escape(tenant)}</option>")
    ranges = []
    for choice in TimeRange:
        selected = " selected" if view.range is choice else ""
        ranges.append(f"<option value='{choice.value}'{selected}>last {choice.value}</option>")
    if view.range is None:
        ranges.append("<option value='' selected>custom</option>")
    custom_from = "" if view.range else f"{view.start:%Y-%m-%dT%H:%M:%SZ}"
    custom_to = "" if view.range else f"{view.end:%Y-%m-%dT%H:%M:%SZ}"
    checked = " checked" if view.refresh else ""
    return (
        f"<form class='selectors' method='get' action='/dashboards/{escape(dashboard.name)}'>"
        "<label for='tenant'>Tenant</label>"
        f"<select id='tenant' name='tenant'>{''.join(options)}</select>"
        "<label for='range'>Range</label>"
        f"<select id='range' name='range'>{''.join(ranges)}</select>"
        f"<label for='from'>or from</label><input id='from' type='text' name='from' "
        f"placeholder='2026-03-01T10:00:00Z' value='{escape(custom_from)}'>"
        f"<label for='to'>to</label><input id='to' type='text' name='to' "
        f"placeholder='now' value='{escape(custom_to)}'>"
        f"<label><input type='checkbox' name='refresh' value='on'{checked}> auto-refresh</label>"
        "<button type='submit'>Apply</button></form>"
    )


def render_dashboard(
    pages: DashboardPages,
    dashboard: Dashboard,
    view: View,
    results: list[PanelResult],
    tenants: list[str],
) -> str:
    panels = "".join(_panel_html(result, view) for result in results)
    scope = f"tenant {view.tenant}" if view.tenant else "all tenants"
    failed = sum(1 for result in results if result.status == "error")
    summary = (
        f"{view.start:%Y-%m-%d %H:%M:%S} → {view.end:%Y-%m-%d %H:%M:%S} UTC · {scope} · "
        f"{len(results)} panels" + (f", {failed} failed" if failed else "")
    )
    body = (
        f"<div class='top'><h1>imstream · {escape(dashboard.title)}</h1>"
        f"{_nav(pages, dashboard.name, view)}{_selectors(dashboard, view, tenants)}</div>"
        f"<div class='range' title='{escape(dashboard.layout.description)}'>{escape(summary)}</div>"
        f"<main class='grid' data-dashboard='{escape(dashboard.name)}'>{panels}</main>"
    )
    refresh = dashboard.layout.refresh_seconds if view.refresh and view.range else None
    return _page(f"{dashboard.title} · imstream", body, refresh_seconds=refresh)


def _error_page(status: int, code: str, message: str) -> HTMLResponse:
    body = (
        "<div class='top'><h1>imstream dashboards</h1><nav><a href='/dashboards'>all dashboards"
        f"</a></nav></div><div class='list'><div class='error' role='alert' data-error-code='"
        f"{escape(code)}'><b>[{escape(code)}]</b> {escape(message)}</div></div>"
    )
    return HTMLResponse(_page("imstream dashboards", body), status_code=status)


def dashboards_router(pages: DashboardPages) -> APIRouter:
    """The routes of the built-in page over ``pages``."""
    router = APIRouter()

    @router.get("/dashboards", response_class=HTMLResponse, summary="The dashboards")
    async def index() -> Response:
        if pages.load_error is not None:
            return _error_page(503, str(pages.load_error.code), str(pages.load_error))
        if len(pages.dashboards) == 1:
            return RedirectResponse(f"/dashboards/{next(iter(pages.dashboards))}")
        items = "".join(
            f"<a href='/dashboards/{escape(name)}'>{escape(dashboard.title)}</a>"
            f"<p>{escape(dashboard.layout.description)}</p>"
            for name, dashboard in pages.dashboards.items()
        )
        body = (
            "<div class='top'><h1>imstream dashboards</h1>"
            f"{_nav(pages, None, None)}</div><div class='list'>{items}</div>"
        )
        return HTMLResponse(_page("imstream dashboards", body))

    def resolve(name: str, request: Request) -> tuple[Dashboard, View] | Response:
        try:
            dashboard = pages.dashboard(name)
        except LookupError:
            known = ", ".join(pages.dashboards) or "none"
            return _error_page(
                404, UNKNOWN_DASHBOARD, f"no dashboard named {name!r}; known: {known}"
            )
        try:
            view = parse_view(dashboard, request.query_params.multi_items(), datetime.now(UTC))
        except AnalyticsError as error:
            return _error_page(error.code.http_status, str(error.code), error.message)
        return dashboard, view

    @router.get("/dashboards/{name}", response_class=HTMLResponse, summary="One dashboard")
    async def page(name: str, request: Request) -> Response:
        resolved = resolve(name, request)
        if isinstance(resolved, Response):
            return resolved
        dashboard, view = resolved
        principal = principal_of(request)
        one_tenant = not principal.all_tenants
        results = await pages.run(dashboard, view, one_tenant=one_tenant)
        tenants = [principal.tenant] if one_tenant else await pages.tenants(view)
        return HTMLResponse(render_dashboard(pages, dashboard, view, results, tenants))

    @router.get("/dashboards/{name}/data", summary="One dashboard's panels as JSON")
    async def data(name: str, request: Request) -> Response:
        try:
            dashboard = pages.dashboard(name)
        except LookupError:
            return JSONResponse(
                {
                    "code": UNKNOWN_DASHBOARD,
                    "message": f"no dashboard named {name!r}",
                    "field": None,
                },
                status_code=404,
            )
        try:
            view = parse_view(dashboard, request.query_params.multi_items(), datetime.now(UTC))
        except AnalyticsError as error:
            return JSONResponse(error.body(), status_code=error.code.http_status)
        results = await pages.run(dashboard, view, one_tenant=not principal_of(request).all_tenants)
        return JSONResponse(
            {
                "dashboard": dashboard.name,
                "from": json_value(view.start),
                "to": json_value(view.end),
                "tenant": view.tenant,
                "panels": [result.body() for result in results],
            }
        )

    return router
