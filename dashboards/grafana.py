"""Grafana dashboards from the definitions: one JSON model per dashboard, for file provisioning.

The panels query the provisioned ClickHouse data source (uid :data:`DATASOURCE_UID`, the
``grafana-clickhouse-datasource`` plugin) with the panel's SQL rendered by
``dashboards.macros.grafana_sql``: the plugin's own macros for the time range and bucket width,
a multi-value ``tenant`` variable (``All`` by default) for the tenant filter, and table names
without a database (the data source's default database). ``imstream dashboards export-grafana``
writes them; ``dashboards/grafana/`` holds the committed copies that compose.yaml provisions, and
a test keeps them equal to a fresh export.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dashboards.definitions import Dashboard, Panel, PanelKind, Unit
from dashboards.macros import grafana_sql

DATASOURCE_UID = "imstream-clickhouse"
DATASOURCE: dict[str, str] = {"type": "grafana-clickhouse-datasource", "uid": DATASOURCE_UID}
#: Where compose.yaml mounts the exported files, and the folder they appear in.
EXPORT_DIR = Path(__file__).resolve().parent / "grafana"
FOLDER = "imstream"
SCHEMA_VERSION = 41
#: The ClickHouse plugin's query formats (sqlds): 0 time series, 1 table.
_FORMAT_TIME_SERIES = 0
_FORMAT_TABLE = 1
_UNITS = {
    Unit.COUNT: "short",
    Unit.PER_MINUTE: "cpm",
    Unit.MILLISECONDS: "ms",
    Unit.RATIO: "percentunit",
}
_TENANT_SQL = (
    "SELECT DISTINCT tenant_id FROM audit_events "
    "WHERE tenant_id != '' AND $__timeFilter(occurred_at) ORDER BY tenant_id"
)


def uid_of(dashboard: Dashboard) -> str:
    return f"imstream-{dashboard.name}"


def _target(panel: Panel) -> dict[str, Any]:
    timeseries = panel.spec.kind is PanelKind.TIMESERIES
    return {
        "refId": "A",
        "datasource": DATASOURCE,
        "editorType": "sql",
        "format": _FORMAT_TIME_SERIES if timeseries else _FORMAT_TABLE,
        "queryType": "timeseries" if timeseries else "table",
        "rawSql": grafana_sql(panel.sql),
    }


def _field_defaults(panel: Panel) -> dict[str, Any]:
    spec = panel.spec
    defaults: dict[str, Any] = {
        "unit": _UNITS[spec.unit],
        "decimals": spec.decimals,
        "min": 0,
        "color": {"mode": "palette-classic" if spec.kind is not PanelKind.STAT else "fixed"},
    }
    if spec.kind is PanelKind.STAT:
        defaults["color"]["fixedColor"] = "text"
    if spec.kind is PanelKind.TIMESERIES:
        bars = spec.style == "bars"
        defaults["custom"] = {
            "drawStyle": "bars" if bars else "line",
            "lineWidth": 2,
            "fillOpacity": 80 if bars else (35 if spec.stack else 10),
            "showPoints": "auto",
            "pointSize": 4,
            "spanNulls": False,
            "stacking": {"mode": "normal" if spec.stack else "none", "group": "A"},
            "axisSoftMin": 0,
        }
    return defaults


def _options(panel: Panel) -> dict[str, Any]:
    spec = panel.spec
    legend = {"displayMode": "list", "placement": "bottom", "showLegend": True, "calcs": ["max"]}
    if spec.kind is PanelKind.TIMESERIES:
        return {"legend": legend, "tooltip": {"mode": "multi", "sort": "desc"}}
    if spec.kind is PanelKind.BAR:
        return {
            "xField": "category",
            "orientation": "vertical",
            "showValue": "always",
            "stacking": "normal" if spec.stack else "none",
            "legend": {**legend, "calcs": []},
            "tooltip": {"mode": "single", "sort": "none"},
        }
    return {
        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        "colorMode": "value",
        "graphMode": "none",
        "justifyMode": "center",
        "textMode": "value",
    }


def _panel(panel: Panel, panel_id: int) -> dict[str, Any]:
    spec = panel.spec
    grid = spec.grid
    model: dict[str, Any] = {
        "id": panel_id,
        "type": {"timeseries": "timeseries", "bar": "barchart", "stat": "stat"}[spec.kind],
        "title": spec.title,
        "description": spec.description,
        "datasource": DATASOURCE,
        "gridPos": {"x": grid.x, "y": grid.y, "w": grid.w, "h": grid.h},
        "targets": [_target(panel)],
        "fieldConfig": {"defaults": _field_defaults(panel), "overrides": []},
        "options": _options(panel),
    }
    if spec.min_interval_seconds > 1:
        model["interval"] = f"{spec.min_interval_seconds}s"
    if spec.kind is PanelKind.TIMESERIES:
        model["maxDataPoints"] = 150
    return model


def dashboard_model(dashboard: Dashboard) -> dict[str, Any]:
    """The Grafana dashboard JSON model of ``dashboard``."""
    layout = dashboard.layout
    return {
        "uid": uid_of(dashboard),
        "title": f"imstream · {layout.title}",
        "description": layout.description,
        "tags": ["imstream", "generated"],
        "timezone": "utc",
        "editable": False,
        "graphTooltip": 1,
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "refresh": f"{layout.refresh_seconds}s",
        "time": {"from": f"now-{layout.default_range.value}", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "tenant",
                    "label": "Tenant",
                    "type": "query",
                    "datasource": DATASOURCE,
                    "definition": _TENANT_SQL,
                    "query": _TENANT_SQL,
                    "refresh": 2,
                    "includeAll": True,
                    "multi": True,
                    "sort": 1,
                    "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
                }
            ]
        },
        "links": [
            {
                "title": "imstream dashboards",
                "type": "dashboards",
                "tags": ["imstream"],
                "asDropdown": False,
            }
        ],
        "panels": [_panel(panel, index + 1) for index, panel in enumerate(dashboard.panels)],
        "annotations": {"list": []},
    }


def render(dashboard: Dashboard) -> str:
    """The model as the committed file holds it (stable: same definitions, same bytes)."""
    return json.dumps(dashboard_model(dashboard), indent=2, ensure_ascii=False) + "\n"


def export(dashboards: Sequence[Dashboard], directory: Path) -> list[Path]:
    """Write ``<uid>.json`` per dashboard into ``directory`` and remove stale exports there;
    returns the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for dashboard in dashboards:
        path = directory / f"{uid_of(dashboard)}.json"
        path.write_text(render(dashboard), encoding="utf-8")
        written.append(path)
    for stale in directory.glob("imstream-*.json"):
        if stale not in written:
            stale.unlink()
    return written
