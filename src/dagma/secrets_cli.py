"""`dagma secrets init`: fresh random values in `.env` for every secret compose.yaml requires."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from dagma.cli_errors import DagmaCommands

app = typer.Typer(
    cls=DagmaCommands, help="The secrets compose.yaml reads from .env.", no_args_is_help=True
)


@app.command()
def init(
    env_file: Annotated[
        Path, typer.Option("--env-file", help="The .env to fill in (created when missing).")
    ] = Path(".env"),
) -> None:
    """Give each required secret that is missing or a placeholder a random value (mode 600).

    Real values are never replaced: rotating a password Postgres or MLflow already stored
    needs a change on the server too. Only names are printed, never values.
    """
    from dagma.env_secrets import init as fill_in

    Console().print(fill_in(env_file).summary(), markup=False, highlight=False, soft_wrap=True)
