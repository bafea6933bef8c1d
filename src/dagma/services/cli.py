"""`dagma services up|down|status|logs|backup|restore`: services mode as local processes on
127.0.0.1."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from dagma.cli_errors import DagmaCommands


class ServicesCommands(DagmaCommands):
    """`dagma services` exits 1 on every error, as on an unhealthy service."""

    exit_code = 1


app = typer.Typer(
    cls=ServicesCommands,
    help="Services mode: Postgres, an MLflow server and Dagster's webserver, daemon and code "
    "server as local processes (no Docker).",
    no_args_is_help=True,
)
console = Console()


def _topology(extras: list[str] | None = None) -> Any:
    from dagma.services.config import get_config
    from dagma.services.supervisor import Topology

    return Topology(get_config(), extras or ())


@app.command()
def up(
    extras: Annotated[
        list[str] | None,
        typer.Option(
            "--with",
            metavar="observability",
            help="Start more: `observability` runs Prometheus (Debian's `prometheus`) scraping "
            "the services' metrics; a later `up` keeps it until `down`.",
        ),
    ] = None,
) -> None:
    """Start what is not running and wait until every service is healthy."""
    from dagma.services.config import get_config

    get_config().refuse_placeholders()  # before anything is created or started
    topology = _topology(extras)
    statuses = topology.up(progress=lambda line: console.print(f"  {line}"))
    _print_table(statuses)
    c = topology.config
    watched = any(s.name == "prometheus" for s in statuses)
    console.print(
        f"\nDagster UI  {c.dagster_url}\nMLflow      {c.mlflow_url} (user admin, basic auth)\n"
        f"API         {c.api_url} (a token: dagma token issue --scope search --ttl 1h)\n"
        f"Metrics     {c.metrics_url}/metrics (every service's, for Prometheus)\n"
        + (
            f"Prometheus  {c.prometheus_url} (the app's Metrics page: "
            f"export DAGMA_PROMETHEUS_URL={c.prometheus_url})\n"
            if watched
            else ""
        )
        + f"Use it from a shell: export MLFLOW_TRACKING_URI={c.mlflow_url} "
        "MLFLOW_TRACKING_USERNAME=admin MLFLOW_TRACKING_PASSWORD=<mlflow_admin in "
        f"{c.secrets_file}>",
        soft_wrap=True,
    )
    if not all(s.healthy for s in statuses):
        raise typer.Exit(1)


@app.command()
def down() -> None:
    """Stop exactly what `up` started; the data under DAGMA_HOME stays."""
    _topology().down(progress=lambda line: console.print(f"  {line}"))


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Each process: pid, alive, health and URL; and which vector store is in use."""
    from dagma.services.supervisor import vector_store

    topology = _topology()
    statuses = topology.status()
    vectors = vector_store(
        os.environ.get("QDRANT_URL") or None,
        os.environ.get("QDRANT_API_KEY") or None,
        topology.config.home / "qdrant",
    )
    healthy = all(s.healthy for s in statuses) and bool(vectors["healthy"])
    if as_json:
        print(
            json.dumps(
                {
                    "healthy": healthy,
                    "home": str(topology.config.home),
                    "services": [asdict(s) for s in statuses],
                    "vector_store": vectors,
                },
                indent=2,
            )
        )
    else:
        _print_table(statuses)
        state = "[green]ok[/green]" if vectors["healthy"] else "[red]not answering[/red]"
        console.print(f"vector store: {vectors['kind']} at {vectors['location']} ({state})")
    if not healthy:
        raise typer.Exit(1)


@app.command()
def logs(
    name: Annotated[
        str | None, typer.Argument(help="postgres, mlflow, code-server, metrics, prometheus, …")
    ] = None,
    lines: Annotated[int, typer.Option("-n", "--lines", help="Lines per log.")] = 40,
) -> None:
    """Print the last lines of each service's log."""
    from dagma.services.config import get_config
    from dagma.services.supervisor import iter_logs, tail

    for path in iter_logs(get_config(), name):
        console.rule(path.stem)
        console.print(tail(path, lines), markup=False, highlight=False)


@app.command()
def backup(
    archive: Annotated[
        Path | None,
        typer.Argument(help="The .tar.gz to write; default dagma-backup-<UTC time>.tar.gz here."),
    ] = None,
) -> None:
    """pg_dump every database, plus MLflow's artifacts, the vectors and executed notebooks."""
    from dagma.services.backup import backup as run_backup
    from dagma.services.config import get_config

    report = run_backup(get_config(), archive)
    console.print(
        report.summary("dagma services restore"), markup=False, highlight=False, soft_wrap=True
    )


@app.command()
def restore(
    archive: Annotated[Path, typer.Argument(help="A .tar.gz from `dagma services backup`.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Restore into an empty DAGMA_HOME: a new cluster, every database, the files; then stop."""
    from dagma.services.backup import restore as run_restore
    from dagma.services.config import get_config

    config = get_config()
    report, restored = run_restore(
        config, archive, progress=(lambda _: None) if as_json else console.print
    )
    if as_json:
        print(json.dumps({"home": str(config.home), "counts": restored, "files": report.files}))
        return
    console.print(
        f"Restored {report.files} files and {', '.join(f'{v} {k}' for k, v in restored.items())} "
        f"into {config.home} in {report.seconds:.1f} s. Start it with: dagma services up",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


def _print_table(statuses: list[Any]) -> None:
    table = Table("service", "pid", "alive", "health", "url")
    for s in statuses:
        health = "[green]healthy[/green]" if s.healthy else f"[red]{s.detail}[/red]"
        table.add_row(s.name, str(s.pid or "-"), "yes" if s.alive else "no", health, s.url or "")
    console.print(table)


if __name__ == "__main__":
    app()
