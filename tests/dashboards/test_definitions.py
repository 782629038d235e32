"""The dashboard definitions: the shipped ones load, cover what analysts asked for and match the
committed Grafana export; a bad definition is refused with its code and file; the macros render
the way each side understands them."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dashboards.definitions import (
    DEFINITIONS_DIR,
    DashboardError,
    DashboardErrorCode,
    PanelKind,
    load_dashboards,
)
from dashboards.grafana import DATASOURCE_UID, EXPORT_DIR, dashboard_model, render, uid_of
from dashboards.macros import bound_sql, grafana_sql
from pipelines.cli import app

#: What issue 8 asks the dashboards to show, as panel ids (and the kind each is drawn as).
REQUIRED = {
    "messages_per_minute": PanelKind.TIMESERIES,
    "daily_active_users": PanelKind.TIMESERIES,
    "monthly_active_users": PanelKind.STAT,
    "dau_over_mau": PanelKind.STAT,
    "active_conversations": PanelKind.TIMESERIES,
    "group_sizes": PanelKind.BAR,
    "delivery_latency": PanelKind.TIMESERIES,
    "push_outcomes": PanelKind.TIMESERIES,
    "dead_letters": PanelKind.TIMESERIES,
    "consumer_lag": PanelKind.TIMESERIES,
}

GOOD_LAYOUT = """
title = "Test"
[[panels]]
id = "messages"
title = "Messages"
kind = "timeseries"
grid = { x = 0, y = 0, w = 12, h = 8 }
"""
GOOD_SQL = (
    "SELECT $__timeInterval(occurred_at) AS time, count() AS messages\n"
    "FROM $__db.sequenced_events\n"
    "WHERE $__timeFilter(occurred_at) AND $__tenantFilter(tenant_id)\n"
    "GROUP BY time ORDER BY time\n"
)


def write(root: Path, layout: str = GOOD_LAYOUT, **sql: str) -> Path:
    directory = root / "test"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "dashboard.toml").write_text(layout)
    for name, text in (sql or {"messages": GOOD_SQL}).items():
        (directory / f"{name}.sql").write_text(text)
    return directory


def refused(root: Path) -> DashboardError:
    with pytest.raises(DashboardError) as caught:
        load_dashboards(root)
    return caught.value


def test_the_shipped_dashboards_load_and_show_every_panel_analysts_asked_for() -> None:
    dashboards = load_dashboards()
    assert [dashboard.name for dashboard in dashboards] == ["activity", "delivery"]
    kinds = {panel.id: panel.spec.kind for d in dashboards for panel in d.panels}
    assert {panel: kinds.get(panel) for panel in REQUIRED} == REQUIRED
    # Everything an analyst filters by tenant follows the selector; lag is per process.
    follows = {panel.id: panel.follows_tenant for d in dashboards for panel in d.panels}
    assert follows["messages_per_minute"] and follows["delivery_latency"]
    assert not follows["consumer_lag"]


def test_the_committed_grafana_json_is_a_fresh_export(tmp_path: Path) -> None:
    dashboards = load_dashboards()
    for dashboard in dashboards:
        committed = (EXPORT_DIR / f"{uid_of(dashboard)}.json").read_text(encoding="utf-8")
        assert committed == render(dashboard), (
            f"dashboards/grafana/{uid_of(dashboard)}.json is stale: run "
            "imstream dashboards export-grafana"
        )
    result = CliRunner().invoke(app, ["dashboards", "export-grafana", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in EXPORT_DIR.glob("*.json")
    )
    assert "2 Grafana dashboards exported" in result.output
    checked = CliRunner().invoke(app, ["dashboards", "export-grafana", "--check", str(tmp_path)])
    assert checked.exit_code == 0, checked.output


def test_a_stale_export_is_caught_by_check(tmp_path: Path) -> None:
    CliRunner().invoke(app, ["dashboards", "export-grafana", str(tmp_path)])
    stale = tmp_path / "imstream-delivery.json"
    stale.write_text(stale.read_text().replace("Send → delivery", "Send to delivery"))
    result = CliRunner().invoke(app, ["dashboards", "export-grafana", "--check", str(tmp_path)])
    assert result.exit_code == 1
    assert "imstream-delivery.json" in result.output


def test_grafana_panels_use_the_plugins_macros_and_the_tenant_variable() -> None:
    activity = next(d for d in load_dashboards() if d.name == "activity")
    model = dashboard_model(activity)
    assert model["uid"] == "imstream-activity"
    assert [v["name"] for v in model["templating"]["list"]] == ["tenant"]
    by_title = {panel["title"]: panel for panel in model["panels"]}
    messages = by_title["Messages per minute by tenant and kind"]
    assert messages["type"] == "timeseries" and messages["interval"] == "60s"
    (target,) = messages["targets"]
    assert target["datasource"]["uid"] == DATASOURCE_UID
    assert target["format"] == 0  # time series: the plugin turns the series column into labels
    sql = target["rawSql"]
    assert "$__timeFilter(occurred_at)" in sql and "$__timeInterval(sent.occurred_at)" in sql
    assert "$__conditionalAll(tenant_id IN (${tenant:singlequote}), $tenant)" in sql
    assert "$__db" not in sql and "FROM sequenced_events" in sql
    assert by_title["Group size distribution"]["type"] == "barchart"
    assert by_title["DAU / MAU"]["fieldConfig"]["defaults"]["unit"] == "percentunit"
    json.dumps(model)  # serialisable as is


def test_the_built_in_rendering_binds_every_value() -> None:
    start, end = datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 3, 2, tzinfo=UTC)
    query = bound_sql(
        GOOD_SQL, database="imstream", start=start, end=end, interval_seconds=300, tenant="acme"
    )
    assert "$" not in query.sql
    assert "FROM `imstream`.sequenced_events" in query.sql
    assert "INTERVAL {dashboard_interval_s:UInt32} SECOND" in query.sql
    assert "({dashboard_tenant:Nullable(String)} IS NULL OR tenant_id = " in query.sql
    assert query.parameters == {
        "dashboard_from": start,
        "dashboard_to": end,
        "dashboard_interval_s": 300,
        "dashboard_tenant": "acme",
    }
    assert grafana_sql(GOOD_SQL).startswith("SELECT $__timeInterval(occurred_at) AS time")


@pytest.mark.parametrize(
    ("layout", "sql", "code", "file", "words"),
    [
        (
            GOOD_LAYOUT.replace('kind = "timeseries"', 'kind = "pie"'),
            None,
            DashboardErrorCode.INVALID_LAYOUT,
            "dashboard.toml",
            "panel 'messages': kind",
        ),
        (
            GOOD_LAYOUT + "colour = 'red'\n",
            None,
            DashboardErrorCode.INVALID_LAYOUT,
            "dashboard.toml",
            "colour",
        ),
        (
            GOOD_LAYOUT.replace("w = 12", "w = 20").replace("x = 0", "x = 10"),
            None,
            DashboardErrorCode.INVALID_LAYOUT,
            "dashboard.toml",
            "x + w must be at most 24",
        ),
        (
            GOOD_LAYOUT + GOOD_LAYOUT.split("\n", 2)[2].replace('"messages"', '"other"'),
            None,
            DashboardErrorCode.OVERLAP,
            "dashboard.toml",
            "overlap",
        ),
        (
            "title = 'x'\n[[panels]\n",
            None,
            DashboardErrorCode.INVALID_LAYOUT,
            "dashboard.toml",
            "not valid TOML",
        ),
        (
            GOOD_LAYOUT,
            {"other": GOOD_SQL},
            DashboardErrorCode.MISSING_SQL,
            "messages.sql",
            "has no SQL file",
        ),
        (
            GOOD_LAYOUT,
            {"messages": GOOD_SQL, "orphan": GOOD_SQL},
            DashboardErrorCode.UNUSED_SQL,
            "orphan.sql",
            "no panel",
        ),
        (
            GOOD_LAYOUT,
            {"messages": GOOD_SQL.replace("$__timeFilter", "$__timeFiltr")},
            DashboardErrorCode.INVALID_SQL,
            "messages.sql",
            "line 3: unknown macro $__timeFiltr",
        ),
        (
            GOOD_LAYOUT,
            {"messages": GOOD_SQL + "AND tenant_id = {t:String}"},
            DashboardErrorCode.INVALID_SQL,
            "messages.sql",
            "Grafana does not bind",
        ),
        (
            GOOD_LAYOUT,
            {"messages": GOOD_SQL.replace("$__tenantFilter(tenant_id)", "$tenant")},
            DashboardErrorCode.INVALID_SQL,
            "messages.sql",
            "'$' starts no known macro",
        ),
        (
            GOOD_LAYOUT,
            {"messages": GOOD_SQL.replace("$__timeFilter(occurred_at)", "1")},
            DashboardErrorCode.INVALID_SQL,
            "messages.sql",
            "must follow the time range",
        ),
        (
            GOOD_LAYOUT,
            {"messages": GOOD_SQL + "; DROP TABLE x"},
            DashboardErrorCode.INVALID_SQL,
            "messages.sql",
            "one statement",
        ),
        (
            GOOD_LAYOUT,
            {"messages": GOOD_SQL.replace("(tenant_id)", "(tenant_id")},
            DashboardErrorCode.INVALID_SQL,
            "messages.sql",
            "never closed",
        ),
    ],
    ids=[
        "unknown-kind",
        "unknown-key",
        "off-grid",
        "overlap",
        "bad-toml",
        "missing-sql",
        "unused-sql",
        "unknown-macro",
        "query-parameter",
        "grafana-variable",
        "no-time-range",
        "two-statements",
        "unclosed-macro",
    ],
)
def test_a_bad_definition_is_refused_naming_the_file_and_the_problem(  # noqa: PLR0917 - pytest parameters
    tmp_path: Path,
    layout: str,
    sql: dict[str, str] | None,
    code: DashboardErrorCode,
    file: str,
    words: str,
) -> None:
    write(tmp_path, layout, **(sql or {}))
    error = refused(tmp_path)
    assert error.code is code
    assert error.path.name == file
    assert words in error.message
    assert str(error).startswith(f"[{code}] {error.path}")


def test_check_lists_the_panels_and_fails_with_the_code(tmp_path: Path) -> None:
    good = CliRunner().invoke(app, ["dashboards", "check"])
    assert good.exit_code == 0, good.output
    assert "2 dashboards, 16 panels: valid" in good.output
    shutil.copytree(DEFINITIONS_DIR / "activity", tmp_path / "activity")
    (tmp_path / "activity" / "group_sizes.sql").unlink()
    bad = CliRunner().invoke(app, ["dashboards", "check", "--definitions", str(tmp_path)])
    assert bad.exit_code == 2
    assert "[dashboard-missing-sql]" in bad.output and "group_sizes.sql" in bad.output
