"""Full-text message search over the ClickHouse audit (analysts)."""

from __future__ import annotations

import typer

search_app = typer.Typer(
    help="Full-text message search over the ClickHouse audit (analysts).", no_args_is_help=True
)
