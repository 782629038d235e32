"""What every ``imstream`` command shares: loading settings with an operator-readable error, and
printing tables and progress lines."""

from __future__ import annotations

import io
import shutil
import sys
import time
from collections.abc import Collection, Iterable, Sequence
from typing import Self

import typer
from pydantic import ValidationError
from rich.console import Console, RenderableType
from rich.status import Status
from rich.table import Table
from rich.text import Text

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
    return _rendered(grid)


def _rendered(renderable: RenderableType) -> str:
    """``renderable`` as the text to echo to stdout: styled for a terminal, plain on a pipe
    (``typer.echo`` drops the styles there too), without trailing spaces."""
    terminal = sys.stdout.isatty()
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


class StatusLine:
    """A progress line on stderr that each update replaces: on a terminal rich's status line (a
    spinner and the latest text); on a pipe a plain line at most every ``min_interval`` seconds,
    so that a log keeps a trace without a line per update. A lasting line (:meth:`print`, or an
    update with ``final``) is printed either way. Use it as a context manager around the work,
    so that the status line stops even when the work fails."""

    def __init__(self, min_interval: float = 3.0) -> None:
        self.console = Console(stderr=True, markup=False, emoji=False, highlight=False)
        self.min_interval = min_interval
        self.last_emit = 0.0
        self.status: Status | None = None

    def update(self, text: str, *, final: bool = False) -> None:
        if final:
            self.print(text)
        elif self.console.is_terminal:
            if self.status is None:
                self.status = self.console.status(Text(text))
                self.status.start()
            else:
                self.status.update(Text(text))
        elif time.monotonic() - self.last_emit >= self.min_interval:
            self.print(text)

    def print(self, text: str) -> None:
        """A line that stays (the status line, if shown, disappears first)."""
        self.close()
        if self.console.is_terminal:
            self.console.print(text)
        else:
            typer.echo(text, err=True)
        self.last_emit = time.monotonic()

    def close(self) -> None:
        """Stop the status line, if one is shown (it disappears, as a replaced line should)."""
        if self.status is not None:
            self.status.stop()
            self.status = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
