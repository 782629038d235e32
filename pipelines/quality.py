"""Data quality: great-expectations suites over the ClickHouse audit and the CQL tables."""

from __future__ import annotations

import typer

quality_app = typer.Typer(
    help="Data quality: great-expectations suites over the ClickHouse audit and the CQL tables.",
    no_args_is_help=True,
)
