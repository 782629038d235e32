"""Dashboards: the versioned definitions in dashboards/, for Grafana and the built-in page.

- ``imstream dashboards check`` — load and validate every definition, list the panels;
- ``imstream dashboards export-grafana [DIR]`` — write the Grafana JSON models (by default into
  ``dashboards/grafana/``, which compose.yaml provisions); ``--check`` only compares them with
  what is in DIR and exits 1 if they differ (a definition changed without a fresh export).

A bad definition exits 2 with its code and file: ``error: [dashboard-invalid-sql] …/x.sql: …``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dashboards.definitions import DEFINITIONS_DIR, Dashboard, DashboardError, load_dashboards
from dashboards.grafana import EXPORT_DIR, export, render, uid_of

dashboards_app = typer.Typer(
    help="Dashboards: the versioned definitions in dashboards/, for Grafana and the built-in page.",
    no_args_is_help=True,
)

Definitions = Annotated[
    Path,
    typer.Option("--definitions", help="The directory of the definitions (one subdirectory each)"),
]


def _load(root: Path) -> tuple[Dashboard, ...]:
    try:
        return load_dashboards(root)
    except DashboardError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from error


@dashboards_app.command("check")
def check_command(definitions: Definitions = DEFINITIONS_DIR) -> None:
    """Validate every definition and list its panels."""
    dashboards = _load(definitions)
    for dashboard in dashboards:
        typer.echo(f"{dashboard.name}: {dashboard.title} ({len(dashboard.panels)} panels)")
        for panel in dashboard.panels:
            scope = "" if panel.follows_tenant else "  (all tenants)"
            typer.echo(f"  {panel.id:28} {panel.spec.kind!s:10} {panel.spec.unit!s:10}{scope}")
    panels = sum(len(dashboard.panels) for dashboard in dashboards)
    typer.echo(f"{len(dashboards)} dashboards, {panels} panels: valid")


@dashboards_app.command("export-grafana")
def export_grafana_command(
    directory: Annotated[
        Path, typer.Argument(help="Where to write <uid>.json (compose.yaml provisions the default)")
    ] = EXPORT_DIR,
    definitions: Definitions = DEFINITIONS_DIR,
    check: Annotated[
        bool, typer.Option("--check", help="Compare with DIR instead of writing; exit 1 if stale")
    ] = False,
) -> None:
    """Write the Grafana dashboard JSON of every definition into DIR."""
    dashboards = _load(definitions)
    if check:
        stale = []
        for dashboard in dashboards:
            path = directory / f"{uid_of(dashboard)}.json"
            current = path.read_text(encoding="utf-8") if path.exists() else None
            if current != render(dashboard):
                stale.append(path.name)
        if stale:
            typer.echo(
                f"stale in {directory}: {', '.join(stale)}; run imstream dashboards export-grafana",
                err=True,
            )
            raise typer.Exit(1)
        typer.echo(f"{len(dashboards)} Grafana dashboards in {directory} are up to date")
        return
    written = export(dashboards, directory)
    for path in written:
        typer.echo(f"wrote {path}")
    typer.echo(f"{len(written)} Grafana dashboards exported to {directory}")
