"""Where the CLI turns an error Dagma raised on purpose into one message and an exit code.

Every command group of `dagma` is a `DagmaCommands`: a `DagmaError` from any of its commands
prints `error: <message>` (red, not wrapped, so paths stay whole) and exits with the error's
`exit_code`. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

from typing import Any

import typer
from rich.console import Console
from typer.core import TyperGroup

from dagma.errors import DagmaError


class InputError(DagmaError):
    """What the command was given cannot be used; the message says what to change."""

    exit_code = 2


def report(error: DagmaError, console: Console | None = None) -> None:
    """Print `error` the one way the CLI prints errors."""
    (console or Console()).print(
        f"error: {error}", style="red", markup=False, highlight=False, soft_wrap=True
    )


class DagmaCommands(TyperGroup):
    """A command group that reports a `DagmaError` and exits with its code (see module doc)."""

    # Every error's exit code in this group, when set; else each error's own `exit_code`.
    exit_code: int | None = None

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except DagmaError as error:
            report(error)
            raise typer.Exit(self.exit_code or error.exit_code) from None
