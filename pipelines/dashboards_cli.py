"""Dashboards: the versioned definitions in dashboards/, for Grafana and the built-in page."""

from __future__ import annotations

import typer

dashboards_app = typer.Typer(
    help="Dashboards: the versioned definitions in dashboards/, for Grafana and the built-in page.",
    no_args_is_help=True,
)
