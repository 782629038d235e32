"""What every ``imstream`` command shares: loading settings with an operator-readable error, and
printing tables."""

from __future__ import annotations

import io
import shutil
import sys
from collections.abc import Collection, Iterable, Sequence

import typer
from pydantic import ValidationError
from rich.console import Console, RenderableType
from rich.table import Table

from core.settings import Settings


def load_settings() -> Settings:
    """The settings from the environment, or exit 2 naming each wrong ``IM_`` variable."""
    try:
        return Settings()
    except ValidationError as error:
        problems = "; ".join(
            f"IM_{'__'.join(str(part).upper() for part in problem['loc'])}: {problem['msg']}"
            for problem in error.errors()
        )
        typer.echo(f"error: [settings-invalid] {problems}", err=True)
        raise typer.Exit(2) from error


def table_text(
    header: Sequence[str], rows: Iterable[Sequence[str]], *, right: Collection[str] = ()
) -> str:
    """A table as the CLI prints it: a header line and a line per row, columns two spaces apart
    (the ``right`` ones aligned right), no rules.

    rich lays it out; on a pipe it is exactly that plain text (what scripts, and the tests, split
    on whitespace), on a terminal the header is bold and a long cell folds at the terminal's
    width. Cells are text, never rich markup: an error code in brackets stays as it is.
    """
    grid = Table(box=None, pad_edge=False, header_style="bold")
    for name in header:
        grid.add_column(name, justify="right" if name in right else "left", overflow="fold")
    for row in rows:
        grid.add_row(*row)
    return rendered(grid)


def rendered(renderable: RenderableType, *, err: bool = False) -> str:
    """``renderable`` as the text to echo to stdout (``err``: stderr): styled for a terminal,
    plain on a pipe (``typer.echo`` drops the styles there too), without trailing spaces."""
    terminal = (sys.stderr if err else sys.stdout).isatty()
    buffer = io.StringIO()
    console = Console(
        file=buffer,
        force_terminal=terminal,
        no_color=not terminal,
        # On a pipe nothing folds: a line per row, however long.
        width=shutil.get_terminal_size().columns if terminal else 100_000,
        markup=False,
        emoji=False,
        highlight=False,
    )
    console.print(renderable)
    output = buffer.getvalue()
    return "\n".join(line.rstrip() for line in output.rstrip("\n").split("\n"))
