"""What every ``imstream`` command shares: loading settings with an operator-readable error."""

from __future__ import annotations

import typer
from pydantic import ValidationError

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
