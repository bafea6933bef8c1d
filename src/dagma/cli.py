"""The `dagma` command: run the lab and see its state."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from dagma.services.cli import app as services_app
from dagma.settings import get_settings

app = typer.Typer(help="Dagma: a reproducible ML lab of notebook assets.", no_args_is_help=True)
notebook_app = typer.Typer(help="Author production notebooks.", no_args_is_help=True)
app.add_typer(notebook_app, name="notebook")
app.add_typer(services_app, name="services")
console = Console()


@notebook_app.command("new")
def notebook_new(
    name: Annotated[str, typer.Argument(help="Asset name, snake_case.")],
    upstream: Annotated[str, typer.Option(help="Comma-separated upstream assets.")] = "",
    group: Annotated[str | None, typer.Option(help="Asset group.")] = None,
) -> None:
    """Scaffold notebooks/NAME.ipynb following the conventions (see docs/notebooks.md)."""
    from dagma.notebooks.scaffold import scaffold

    ups = [u.strip() for u in upstream.split(",") if u.strip()]
    path = scaffold(name, get_settings().notebooks_dir, ups, group)
    console.print(f"Created {path}. It is the asset {name!r} at the next definitions load.")


@app.command()
def demo(
    seed: Annotated[int | None, typer.Option(help="Override every notebook's seed.")] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the summary as JSON; progress goes to stderr.")
    ] = False,
) -> None:
    """Materialize the whole demo graph on the embedded defaults and summarise it."""
    from dagma import lab

    settings = get_settings()
    out = Console(stderr=True) if as_json else console
    result = lab.materialize(settings, selection=None, seed=seed, console=out)
    if as_json:
        typer.echo(json.dumps(lab.summary(result, settings), indent=2, default=str))
    else:
        lab.print_summary(result, settings, console)
    if not result.success:
        raise typer.Exit(1)


@app.command()
def run(
    assets: Annotated[
        list[str] | None, typer.Argument(help="Asset keys; all when omitted.")
    ] = None,
    stale: Annotated[bool, typer.Option(help="Only what is stale or missing.")] = False,
    param: Annotated[
        list[str] | None,
        typer.Option(
            "--param",
            "-p",
            help="NOTEBOOK.NAME=VALUE, or NAME=VALUE when one notebook is selected; "
            "coerced to the declared type.",
        ),
    ] = None,
) -> None:
    """Materialize some or all assets."""
    from dagma import lab

    settings = get_settings()
    params = _notebook_params(param or [], assets or [], settings)
    result = lab.materialize(
        settings, selection=assets, stale_only=stale, params=params, console=console
    )
    if result.run_id is None:
        console.print("[green]Nothing is stale: every asset is up to date.[/green]")
        return
    lab.print_summary(result, settings, console)
    if not result.success:
        raise typer.Exit(1)


def _notebook_params(
    pairs: list[str], selection: list[str], settings: Any
) -> dict[str, dict[str, Any]]:
    """`-p` strings -> typed values per notebook, validated like a run would validate them."""
    from dagma.notebooks.spec import NotebookError, discover

    specs = {s.name: s for s in discover(settings.notebooks_dir)}
    chosen = [name for name in selection if name in specs]
    raw: dict[str, dict[str, str]] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise NotebookError(f"--param {pair!r}: write NAME=VALUE or NOTEBOOK.NAME=VALUE.")
        notebook, dot, name = key.rpartition(".")
        if not dot:
            if len(chosen) != 1:
                raise NotebookError(
                    f"--param {pair!r}: name the notebook (NOTEBOOK.{key}=...) unless exactly "
                    "one notebook asset is selected."
                )
            notebook = chosen[0]
        if notebook not in specs:
            raise NotebookError(
                f"--param {pair!r}: {notebook!r} is not a notebook asset "
                f"(notebooks: {', '.join(sorted(specs))})."
            )
        raw.setdefault(notebook, {})[name] = value
    return {
        nb: {k: v for k, v in specs[nb].validate_params(values).items() if k in values}
        for nb, values in raw.items()
    }


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """The last materialization of each asset, the latest MLflow runs and the collections."""
    from dagma import lab

    report = lab.status(get_settings())
    if as_json:
        typer.echo(json.dumps(report, indent=2, default=str))
        return
    _print_status(report)


@app.command()
def doctor(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Check this environment against what is pinned, with the fix for each failure."""
    from dagma.doctor import run as run_doctor

    raise typer.Exit(run_doctor(as_json))


def _print_status(report: dict[str, Any]) -> None:
    assets = Table(title="Assets", title_justify="left")
    for col in ("asset", "group", "last materialized", "run", "stale"):
        assets.add_column(col)
    for row in report["assets"]:
        assets.add_row(
            row["key"],
            row["group"] or "",
            row["last_materialized"] or "never",
            (row["run_id"] or "")[:8],
            "yes" if row["stale"] else "no",
        )
    console.print(assets)
    runs = Table(title="Latest MLflow runs", title_justify="left")
    for col in ("run", "name", "status", "metrics"):
        runs.add_column(col)
    for row in report["mlflow"]["runs"]:
        metrics = ", ".join(f"{k}={v:.3g}" for k, v in sorted(row["metrics"].items())[:4])
        runs.add_row(row["run_id"][:8], row["name"], row["status"], metrics)
    console.print(runs)
    vectors = Table(
        title=f"Vector store ({report['vectors']['kind']}: {report['vectors']['location']})",
        title_justify="left",
    )
    for col in ("collection", "version", "points", "dim"):
        vectors.add_column(col)
    for row in report["vectors"]["collections"]:
        vectors.add_row(row["collection"], str(row["version"]), str(row["points"]), str(row["dim"]))
    console.print(vectors)
    for problem in report.get("problems", []):
        console.print(f"[yellow]! {problem}[/yellow]")
    console.print(
        f"Dagster UI: {report['links']['dagster']}   MLflow UI: {report['links']['mlflow']}"
    )


def main() -> None:
    """Console entry point: known input errors print their message, not a traceback."""
    from dagma.notebooks.spec import NotebookError

    try:
        app()
    except NotebookError as exc:
        console.print(f"Notebook error: {exc}", style="red", markup=False, highlight=False)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
