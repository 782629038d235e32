"""The dashboard definitions: one directory per dashboard, a layout file and one SQL file per panel.

::

    dashboards/<name>/dashboard.toml   title, description, default range, the panels' layout
    dashboards/<name>/<panel id>.sql   the panel's query (ClickHouse SQL with the macros of
                                       dashboards/macros.py)

``load_dashboards`` reads and checks them all; a bad definition is a :class:`DashboardError`
naming the file (and the line or field) and what is wrong, with a stable code. Both renderers —
the Grafana export (``dashboards.grafana``) and the built-in page of the ClickHouse sink
(``analytics.dashboards_page``) — take what it returns, so they show the same panels with
the same SQL.

What a panel's query returns, by kind:

- ``timeseries``: a ``time`` column (DateTime), optionally a ``series`` column (String: one line
  per value), then one or more numeric columns (one line each, named by the column).
- ``bar``: a ``category`` column (String, in the order to show), then numeric columns (one bar
  per category and column).
- ``stat``: one row; its first numeric column is the figure.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dashboards.macros import MacroError, check, macros_used

#: Where the definitions shipped with imstream live.
DEFINITIONS_DIR = Path(__file__).resolve().parent
LAYOUT_FILE = "dashboard.toml"
GRID_COLUMNS = 24
_NAME = re.compile(r"^[a-z][a-z0-9-]{0,47}$")


class DashboardErrorCode(StrEnum):
    """The ``code`` of a definition error; never changes meaning once released."""

    NOT_FOUND = "dashboard-not-found"
    INVALID_LAYOUT = "dashboard-invalid-layout"
    INVALID_SQL = "dashboard-invalid-sql"
    MISSING_SQL = "dashboard-missing-sql"
    UNUSED_SQL = "dashboard-unused-sql"
    OVERLAP = "dashboard-panels-overlap"


class DashboardError(Exception):
    """A definition that cannot be used: its code, the file, and what is wrong."""

    def __init__(self, code: DashboardErrorCode, path: Path, message: str) -> None:
        super().__init__(f"[{code}] {path}: {message}")
        self.code = code
        self.path = path
        self.message = message


class PanelKind(StrEnum):
    TIMESERIES = "timeseries"
    BAR = "bar"
    STAT = "stat"


class Unit(StrEnum):
    """What a panel's numbers are; both renderers format them from this."""

    COUNT = "count"
    PER_MINUTE = "per_minute"
    MILLISECONDS = "ms"
    RATIO = "ratio"  # 0..1, shown as a percentage


class TimeRange(StrEnum):
    """The ranges the selectors offer, as Grafana spells them (``now-<range>``)."""

    MINUTES_15 = "15m"
    HOUR_1 = "1h"
    HOURS_6 = "6h"
    HOURS_24 = "24h"
    DAYS_7 = "7d"
    DAYS_30 = "30d"

    @property
    def seconds(self) -> int:
        number, unit = int(self.value[:-1]), self.value[-1]
        return number * {"m": 60, "h": 3600, "d": 86400}[unit]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Grid(_Strict):
    """Where the panel sits on a 24-column grid (Grafana's ``gridPos``; rows of ~30 px)."""

    x: Annotated[int, Field(ge=0, lt=GRID_COLUMNS)]
    y: Annotated[int, Field(ge=0)]
    w: Annotated[int, Field(ge=1, le=GRID_COLUMNS)]
    h: Annotated[int, Field(ge=3, le=30)]

    @model_validator(mode="after")
    def _fits(self) -> Grid:
        if self.x + self.w > GRID_COLUMNS:
            raise ValueError(f"x + w must be at most {GRID_COLUMNS}, is {self.x + self.w}")
        return self

    def cells(self) -> set[tuple[int, int]]:
        return {
            (x, y) for x in range(self.x, self.x + self.w) for y in range(self.y, self.y + self.h)
        }


class PanelSpec(_Strict):
    """A panel as its layout file states it (its SQL is ``<id>.sql`` next to the layout)."""

    id: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
    title: Annotated[str, Field(min_length=1, max_length=80)]
    description: str = ""
    kind: PanelKind
    unit: Unit = Unit.COUNT
    grid: Grid
    #: Time series: stacked areas (parts of a whole) instead of lines.
    stack: bool = False
    #: Time series: draw bars per bucket instead of lines (counts of discrete things per day).
    style: Literal["line", "bars"] = "line"
    #: The narrowest bucket that makes sense (panels over per-minute views: 60).
    min_interval_seconds: Annotated[int, Field(ge=1, le=86400)] = 1
    #: Fractional digits to show.
    decimals: Annotated[int, Field(ge=0, le=4)] = 0


class LayoutSpec(_Strict):
    title: Annotated[str, Field(min_length=1, max_length=80)]
    description: str = ""
    default_range: TimeRange = TimeRange.HOURS_6
    #: Seconds between refreshes (the built-in page and Grafana).
    refresh_seconds: Annotated[int, Field(ge=5, le=3600)] = 30
    panels: Annotated[list[PanelSpec], Field(min_length=1)]


@dataclass(frozen=True, slots=True)
class Panel:
    spec: PanelSpec
    #: The SQL as written, with the macros (dashboards/macros.py).
    sql: str
    sql_path: Path
    #: Whether the SQL filters by the tenant selector (``$__tenantFilter``).
    follows_tenant: bool

    @property
    def id(self) -> str:
        return self.spec.id


@dataclass(frozen=True, slots=True)
class Dashboard:
    name: str
    layout: LayoutSpec
    panels: tuple[Panel, ...]
    path: Path

    @property
    def title(self) -> str:
        return self.layout.title

    def panel(self, panel_id: str) -> Panel | None:
        return next((panel for panel in self.panels if panel.id == panel_id), None)


def _field_errors(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        parts.append(f"{where}: {item['msg']}")
    return "; ".join(parts)


def _describe_location(data: dict[str, Any], error: ValidationError) -> str:
    """Name panels by their id rather than their index where possible."""
    message = _field_errors(error)
    panels = data.get("panels")
    if isinstance(panels, list):
        for index, panel in enumerate(panels):
            if isinstance(panel, dict) and isinstance(panel.get("id"), str):
                message = message.replace(f"panels.{index}.", f"panel {panel['id']!r}: ")
    return message


def load_dashboard(directory: Path) -> Dashboard:
    """One dashboard from ``directory``; raises :class:`DashboardError`."""
    layout_path = directory / LAYOUT_FILE
    name = directory.name
    if not _NAME.match(name):
        raise DashboardError(
            DashboardErrorCode.INVALID_LAYOUT,
            directory,
            "a dashboard's directory name is its name: lower-case letters, digits and '-'",
        )
    try:
        data = tomllib.loads(layout_path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise DashboardError(
            DashboardErrorCode.NOT_FOUND, layout_path, f"no {LAYOUT_FILE} in {directory}"
        ) from error
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise DashboardError(
            DashboardErrorCode.INVALID_LAYOUT, layout_path, f"not valid TOML: {error}"
        ) from error
    try:
        layout = LayoutSpec.model_validate(data)
    except ValidationError as error:
        raise DashboardError(
            DashboardErrorCode.INVALID_LAYOUT, layout_path, _describe_location(data, error)
        ) from error

    seen: dict[str, PanelSpec] = {}
    occupied: dict[tuple[int, int], str] = {}
    panels: list[Panel] = []
    for spec in layout.panels:
        if spec.id in seen:
            raise DashboardError(
                DashboardErrorCode.INVALID_LAYOUT,
                layout_path,
                f"panel id {spec.id!r} is used twice",
            )
        seen[spec.id] = spec
        for cell in spec.grid.cells():
            other = occupied.setdefault(cell, spec.id)
            if other != spec.id:
                raise DashboardError(
                    DashboardErrorCode.OVERLAP,
                    layout_path,
                    f"panels {other!r} and {spec.id!r} overlap at x={cell[0]}, y={cell[1]}",
                )
        sql_path = directory / f"{spec.id}.sql"
        try:
            sql = sql_path.read_text(encoding="utf-8").strip().rstrip(";").strip()
        except FileNotFoundError as error:
            raise DashboardError(
                DashboardErrorCode.MISSING_SQL,
                sql_path,
                f"panel {spec.id!r} of {layout_path.name} has no SQL file",
            ) from error
        if not sql:
            raise DashboardError(DashboardErrorCode.INVALID_SQL, sql_path, "the file is empty")
        if ";" in sql:
            raise DashboardError(
                DashboardErrorCode.INVALID_SQL, sql_path, "one statement per panel (found ';')"
            )
        try:
            check(sql)
            used = macros_used(sql)
        except MacroError as error:
            raise DashboardError(DashboardErrorCode.INVALID_SQL, sql_path, str(error)) from error
        if spec.kind is not PanelKind.STAT and not used & {
            "timeFilter",
            "dateFilter",
            "fromTime",
            "toTime",
        }:
            raise DashboardError(
                DashboardErrorCode.INVALID_SQL,
                sql_path,
                "a chart's query must follow the time range ($__timeFilter, $__dateFilter, "
                "$__fromTime or $__toTime)",
            )
        panels.append(Panel(spec, sql, sql_path, "tenantFilter" in used))

    unused = sorted(path.name for path in directory.glob("*.sql") if path.stem not in seen)
    if unused:
        raise DashboardError(
            DashboardErrorCode.UNUSED_SQL,
            directory / unused[0],
            f"no panel of {layout_path.name} uses {', '.join(unused)}",
        )
    return Dashboard(name=name, layout=layout, panels=tuple(panels), path=directory)


def load_dashboards(root: Path = DEFINITIONS_DIR) -> tuple[Dashboard, ...]:
    """Every dashboard under ``root`` (each subdirectory with a layout file), by name."""
    directories = sorted(path.parent for path in root.glob(f"*/{LAYOUT_FILE}"))
    if not directories:
        raise DashboardError(
            DashboardErrorCode.NOT_FOUND, root, f"no dashboards (*/{LAYOUT_FILE}) here"
        )
    return tuple(load_dashboard(directory) for directory in directories)
