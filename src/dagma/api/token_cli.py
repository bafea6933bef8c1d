"""`dagma token issue`: a local API token on stdout, so `TOKEN=$(dagma token issue ...)` works."""

from __future__ import annotations

import datetime
import re
from typing import Annotated, Any

import typer
from rich.console import Console

from dagma.cli_errors import DagmaCommands, InputError, report
from dagma.errors import DagmaError

_TTL = re.compile(r"(\d+)\s*([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


class TokenCommands(DagmaCommands):
    """Errors go to stderr: stdout holds the token alone, for a shell to capture."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super(DagmaCommands, self).invoke(ctx)
        except DagmaError as error:
            report(error, Console(stderr=True))
            raise typer.Exit(error.exit_code) from None


app = typer.Typer(cls=TokenCommands, help="Tokens for `dagma serve`.", no_args_is_help=True)


def parse_ttl(text: str) -> datetime.timedelta:
    """`30m`, `1h`, `7d` (or `45s`) as a timedelta; InputError naming the format otherwise."""
    match = _TTL.fullmatch(text.strip().lower())
    amount = int(match.group(1)) if match else 0
    if not match or amount <= 0:
        raise InputError(
            f"--ttl {text!r} is not a lifetime: write a positive whole number and a unit, "
            "s, m, h or d (e.g. 30m, 1h, 7d)"
        )
    return datetime.timedelta(**{_UNITS[match.group(2)]: amount})


@app.command()
def issue(
    scope: Annotated[
        list[str],
        typer.Option(
            "--scope",
            "-s",
            help="A scope the token grants; repeat for more: predict, search, ask, ui.",
            show_default=False,
        ),
    ],
    ttl: Annotated[str, typer.Option("--ttl", help="How long it is valid: 30m, 1h, 7d.")] = "1h",
    subject: Annotated[
        str, typer.Option("--subject", help="Who the token is for (its `sub`).")
    ] = "dagma-cli",
) -> None:
    """Print a token signed with DAGMA_API_SECRET (HS256) and nothing else.

    Use it as `Authorization: Bearer $TOKEN`. A token cannot be taken back before it expires:
    keep lifetimes short; changing DAGMA_API_SECRET ends every token issued with it.
    """
    from dagma.api.auth import issue_token
    from dagma.settings import get_settings

    lifetime = parse_ttl(ttl)
    settings = get_settings()
    if not (settings.dagma_api_secret and settings.dagma_api_secret.get_secret_value()):
        # Services mode generates the secret when none is set; its API checks with that one.
        from pydantic import SecretStr

        from dagma.services.config import stored_api_secret

        stored = stored_api_secret(settings.dagma_home)
        if stored:
            settings = settings.model_copy(update={"dagma_api_secret": SecretStr(stored)})
    typer.echo(issue_token(settings, scope, lifetime, subject=subject))
