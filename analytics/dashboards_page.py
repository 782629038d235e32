"""The built-in dashboards page of the process that owns ClickHouse (works on chDB locally).

``GET /dashboards`` lists the dashboards of ``dashboards/``; ``GET /dashboards/{name}`` runs each
panel's SQL (dashboards/macros.py: the range, bucket width and tenant bound by ClickHouse, never
pasted in) through the store's one thread, one panel after the other, and answers one HTML page
with a chart per panel drawn on the server as inline SVG (``dashboard_charts``): the browser needs
nothing but this port. ``GET /dashboards/{name}/data`` answers the same panels' rows as JSON.

Parameters: ``range`` (15m, 1h, 6h, 24h, 7d, 30d; the dashboard's default when absent), ``from``
and ``to`` (RFC 3339 with an offset; they override the range), ``tenant`` (absent or empty:
every tenant), ``refresh`` (``on``: the page reloads itself every dashboard's
``refresh_seconds``), declared as :class:`PageQuery`. A bad parameter is a 400 page with the
analytics error codes (``unknown-parameter``, ``invalid-parameter``); an unknown dashboard a 404
(``unknown-dashboard``); both answered by the app's one handler (``analytics.api``).

The HTML comes from the Jinja2 templates of ``analytics/templates/`` (autoescaped: every value is
text, but the charts' SVG, which escapes its own).

Each panel marks its state in the DOM — ``data-panel-status`` ``ok`` (a chart), ``empty`` (the
query answered no data), ``error`` (the query failed: the message is shown in the panel, and the
rest of the page renders as usual).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup
from pydantic import BeforeValidator, Field, model_validator

from analytics.access import principal_of
from analytics.dashboard_charts import (
    PALETTE,
    TIME_STEPS,
    Series,
    bar_svg,
    format_value,
    timeseries_svg,
)
from analytics.parameters import From, QueryModel, Tenant, To, once_each
from analytics.queries import AnalyticsError, AnalyticsErrorCode, json_value
from dashboards.definitions import (
    Dashboard,
    DashboardError,
    Panel,
    PanelKind,
    PanelSpec,
    TimeRange,
    load_dashboards,
)
from dashboards.macros import bound_sql
from sinks.clickhouse.schema import AUDIT_TABLE, quote_identifier
from sinks.clickhouse.store import ClickHouseStore

log = logging.getLogger(__name__)

#: The widest custom range (``from``/``to``).
MAX_WINDOW = timedelta(days=92)
#: Bucket widths a chart may use (seconds): the round steps up to a day; and how many buckets a
#: range aims at, at most.
INTERVALS = tuple(step for step in TIME_STEPS if step <= 86400)
MAX_BUCKETS = 150
#: The most rows a panel shows; a query that answers more is cut (and says so).
MAX_PANEL_ROWS = 10_000
#: Per query: ClickHouse stops a panel's query after this long (a slow panel, not a hung page).
#: Read-only; the time budget is the query pool's (``IM_SINKS__ANALYTICS_QUERY_TIMEOUT_SECONDS``).
QUERY_SETTINGS: dict[str, Any] = {"readonly": 2}
#: Pixel size of one grid row and the page's width at which charts are drawn 1:1.
ROW_PX = 30
GAP_PX = 8
PAGE_PX = 1440


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


def _time_range(value: str | None) -> TimeRange | None:
    if not value:
        return None
    try:
        return TimeRange(value)
    except ValueError:
        raise ValueError(f"range must be one of {', '.join(r.value for r in TimeRange)}") from None


class PageQuery(QueryModel):
    """``?tenant=&range=&from=&to=&refresh=`` of a dashboard (values trimmed; all optional)."""

    tenant: Tenant = None
    time_range: Annotated[TimeRange | None, Field(alias="range"), BeforeValidator(_time_range)] = (
        None
    )
    start: From = None
    end: To = None
    refresh: Annotated[bool, BeforeValidator(lambda value: value in ("on", "1", "true"))] = False

    @model_validator(mode="before")
    @classmethod
    def _trimmed(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        return {name: v.strip() if isinstance(v, str) else v for name, v in values.items()}

    def view(self, dashboard: Dashboard, now: datetime) -> View:
        """The range shown: ``range`` (the dashboard's default when absent) ending now, or
        ``from``/``to``, which override it; raises :class:`AnalyticsError`."""
        chosen = self.time_range or dashboard.layout.default_range
        start, end = self.start, self.end
        if start is None and end is None:
            end = now.astimezone(UTC)
            return View(
                end - timedelta(seconds=chosen.seconds), end, chosen, self.tenant, self.refresh
            )
        end = end or now.astimezone(UTC)
        start = start or end - timedelta(seconds=chosen.seconds)
        if start >= end:
            raise AnalyticsError(
                AnalyticsErrorCode.INVALID_PARAMETER, "from must be before to", "from"
            )
        if end - start > MAX_WINDOW:
            raise AnalyticsError(
                AnalyticsErrorCode.INVALID_PARAMETER,
                f"a dashboard shows at most {MAX_WINDOW.days} days at a time",
                "from",
            )
        return View(start, end, None, self.tenant, self.refresh)


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
        """The dashboard ``name`` (a path parameter); raises :class:`AnalyticsError`."""
        found = self.dashboards.get(name)
        if found is None:
            known = ", ".join(self.dashboards) or "none"
            raise AnalyticsError(
                AnalyticsErrorCode.UNKNOWN_DASHBOARD, f"no dashboard named {name!r}; known: {known}"
            )
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


@dataclass(frozen=True, slots=True)
class LegendItem:
    name: str
    colour: str
    summary: str | None = None


@dataclass(frozen=True, slots=True)
class Chart:
    """What a panel with data shows: a figure (a stat), or an SVG and its legend."""

    stat: str | None = None
    svg: Markup | None = None
    legend: tuple[LegendItem, ...] = ()


def _legend(names: Sequence[str], summaries: Sequence[str] | None = None) -> tuple[LegendItem, ...]:
    return tuple(
        LegendItem(name, PALETTE[index % len(PALETTE)], summaries[index] if summaries else None)
        for index, name in enumerate(names)
    )


def _chart(result: PanelResult, view: View) -> Chart:
    spec = result.panel.spec
    width, height = _panel_size(result.panel)
    if spec.kind is PanelKind.STAT:
        value = next((v for v in result.rows[0] if _numeric(v)), None)
        return Chart(stat=format_value(value, spec.unit, spec.decimals))
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
        legend = _legend([name for name, _ in bars]) if len(bars) > 1 else ()
        svg = bar_svg(
            categories,
            bars,
            unit=spec.unit,
            width=width,
            height=height - (22 if legend else 0),
            decimals=spec.decimals,
            title=spec.title,
        )
        return Chart(svg=Markup(svg), legend=legend)
    series = _series(result)
    if not series:
        raise ValueError("the query answered rows but no numbers")
    legend_rows = 1 + (len(series) - 1) // max(1, spec.grid.w // 4)
    svg = timeseries_svg(
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
    return Chart(svg=Markup(svg), legend=_legend([item.name for item in series], summaries))


@dataclass(frozen=True, slots=True)
class PanelView:
    """One panel as the page shows it."""

    spec: PanelSpec
    status: str
    rows: int
    meta: str
    chart: Chart | None = None
    error: str | None = None


def _panel_view(result: PanelResult, view: View) -> PanelView:
    spec = result.panel.spec
    status, chart = result.status, None
    if status == "ok":
        try:
            chart = _chart(result, view)
        except (ValueError, TypeError) as error:  # the SQL answered a shape the kind cannot show
            status, result.error = "error", f"cannot draw this answer: {error}"
    note = " · cut at 10,000 rows" if result.truncated else ""
    scope = "" if result.panel.follows_tenant else " · all tenants"
    bucket = (
        f" · {_duration(result.interval_seconds)} buckets"
        if spec.kind is PanelKind.TIMESERIES
        else ""
    )
    return PanelView(
        spec=spec,
        status=status,
        rows=len(result.rows),
        meta=f"{result.milliseconds:.0f} ms{bucket}{scope}{note}",
        chart=chart,
        error=result.error,
    )


def _duration(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds % size == 0:
            return f"{seconds // size} {unit}"
    return f"{seconds} s"


#: The page's templates (analytics/templates/); autoescaped: every value is text unless marked
#: safe (the charts' SVG, which escapes its own text).
_TEMPLATES = Environment(
    loader=PackageLoader("analytics", "templates"),
    autoescape=True,
    trim_blocks=True,
    lstrip_blocks=True,
    undefined=StrictUndefined,
)


def _render(template: str, title: str, *, refresh_seconds: int | None = None, **values: Any) -> str:
    """``template`` in the page around it (base.html.j2: ``title``, reloaded every
    ``refresh_seconds`` if given)."""
    return _TEMPLATES.get_template(template).render(
        title=title, refresh_seconds=refresh_seconds, **values
    )


def _nav_query(view: View) -> str:
    return f"?{view.query_string(range=view.range.value if view.range else None)}"


def render_dashboard(
    pages: DashboardPages,
    dashboard: Dashboard,
    view: View,
    results: list[PanelResult],
    tenants: list[str],
) -> str:
    scope = f"tenant {view.tenant}" if view.tenant else "all tenants"
    failed = sum(1 for result in results if result.status == "error")
    summary = (
        f"{view.start:%Y-%m-%d %H:%M:%S} → {view.end:%Y-%m-%d %H:%M:%S} UTC · {scope} · "
        f"{len(results)} panels" + (f", {failed} failed" if failed else "")
    )
    return _render(
        "dashboard.html.j2",
        f"{dashboard.title} · imstream",
        refresh_seconds=dashboard.layout.refresh_seconds if view.refresh and view.range else None,
        dashboards=pages.dashboards,
        dashboard=dashboard,
        view=view,
        query=_nav_query(view),
        tenants=sorted(set(tenants) | ({view.tenant} if view.tenant else set())),
        ranges=list(TimeRange),
        custom_from="" if view.range else f"{view.start:%Y-%m-%dT%H:%M:%SZ}",
        custom_to="" if view.range else f"{view.end:%Y-%m-%dT%H:%M:%SZ}",
        summary=summary,
        panels=[_panel_view(result, view) for result in results],
    )


def error_page(status: int, code: str, message: str) -> HTMLResponse:
    """The page of a refused request: its code (``data-error-code``) and message."""
    html = _render("error.html.j2", "imstream dashboards", code=code, message=message)
    return HTMLResponse(html, status_code=status)


def dashboards_router(pages: DashboardPages) -> APIRouter:
    """The routes of the built-in page over ``pages``. Refusals (an unknown dashboard, a bad
    parameter) are :class:`AnalyticsError` answered by the app's one handler (``analytics.api``):
    a page on the HTML routes, ``{"code", "message", "field"}`` on ``/data``."""
    router = APIRouter(dependencies=[Depends(once_each)])

    # The dependencies over ``pages`` are this router's own, so they are defaults (B008): an
    # ``Annotated`` alias would be a string annotation naming a local, which FastAPI cannot
    # resolve.
    def view(
        asked: Annotated[PageQuery, Query()],
        found: Dashboard = Depends(pages.dashboard),  # noqa: B008
    ) -> View:
        return asked.view(found, datetime.now(UTC))

    @router.get("/dashboards", response_class=HTMLResponse, summary="The dashboards")
    async def index() -> Response:
        if pages.load_error is not None:
            return error_page(503, str(pages.load_error.code), str(pages.load_error))
        if len(pages.dashboards) == 1:
            return RedirectResponse(f"/dashboards/{next(iter(pages.dashboards))}")
        html = _render("index.html.j2", "imstream dashboards", dashboards=pages.dashboards)
        return HTMLResponse(html)

    @router.get("/dashboards/{name}", response_class=HTMLResponse, summary="One dashboard")
    async def page(
        request: Request,
        found: Dashboard = Depends(pages.dashboard),  # noqa: B008
        shown: View = Depends(view),  # noqa: B008
    ) -> Response:
        principal = principal_of(request)
        one_tenant = not principal.all_tenants
        results = await pages.run(found, shown, one_tenant=one_tenant)
        tenants = [principal.tenant] if one_tenant else await pages.tenants(shown)
        return HTMLResponse(render_dashboard(pages, found, shown, results, tenants))

    @router.get("/dashboards/{name}/data", summary="One dashboard's panels as JSON")
    async def data(
        request: Request,
        found: Dashboard = Depends(pages.dashboard),  # noqa: B008
        shown: View = Depends(view),  # noqa: B008
    ) -> dict[str, Any]:
        one_tenant = not principal_of(request).all_tenants
        results = await pages.run(found, shown, one_tenant=one_tenant)
        return {
            "dashboard": found.name,
            "from": json_value(shown.start),
            "to": json_value(shown.end),
            "tenant": shown.tenant,
            "panels": [result.body() for result in results],
        }

    return router
