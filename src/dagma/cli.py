"""The `dagma` command: run the lab and see its state.

Errors Dagma raises on purpose are printed and turned into exit codes in one place:
`dagma.cli_errors.DagmaCommands`, the class of every command group here.

Longer than 450 lines because each command's options and help sit beside it, as typer wants
them; the work each command does lives in the modules it calls.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from dagma.api.token_cli import app as token_app
from dagma.cli_errors import DagmaCommands, InputError
from dagma.notebooks import kernel_pool
from dagma.secrets_cli import app as secrets_app
from dagma.services.cli import app as services_app
from dagma.services.gateway import app as gateway_app
from dagma.settings import get_settings

app = typer.Typer(
    cls=DagmaCommands, help="Dagma: a reproducible ML lab of notebook assets.", no_args_is_help=True
)
notebook_app = typer.Typer(help="Author production notebooks.", no_args_is_help=True)
llm_app = typer.Typer(help="The chat model behind the RAG chain.", no_args_is_help=True)
app.add_typer(notebook_app, name="notebook")
app.add_typer(llm_app, name="llm")
app.add_typer(services_app, name="services")
app.add_typer(secrets_app, name="secrets")
app.add_typer(token_app, name="token")
app.add_typer(gateway_app, name="gateway")
console = Console()


def _print_version(value: bool) -> None:
    if value:
        from dagma.version import describe

        typer.echo(describe())
        raise typer.Exit()


@app.callback()
def _root(
    _version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_print_version,
            is_eager=True,
            help="Print the version and the git commit, then exit.",
        ),
    ] = False,
) -> None:
    pass


Processes = Annotated[
    int | None,
    typer.Option(
        "--processes",
        "-j",
        min=1,
        envvar="DAGMA_PROCESSES",
        help="Steps run at once, each in its own process (default 1). 2 overlaps independent "
        "notebooks and the demo's two branches.",
        show_default=False,
    ),
]


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


@notebook_app.command("adopt")
def notebook_adopt(
    path: Annotated[Path, typer.Argument(help="The dagstermill notebook (.ipynb).")],
    ins: Annotated[
        list[str] | None,
        typer.Option(
            "--ins",
            metavar="VARIABLE=ASSET",
            help="The parameters cell's variable that reads ASSET; repeatable. "
            "Default: its variables named like an asset.",
        ),
    ] = None,
    group: Annotated[str | None, typer.Option(help="Asset group.")] = None,
    to: Annotated[
        str | None,
        typer.Option(
            "--to",
            metavar="native",
            help="Rewrite it for the default engine instead of keeping dagstermill.",
        ),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the diff only.")] = False,
) -> None:
    """Bring a dagstermill notebook into notebooks/ as an asset (or onto the default engine)."""
    import os
    from unittest import mock

    from dagma.notebooks import adopt

    if to not in (None, "native"):
        raise typer.BadParameter(
            "the only choice is 'native' (the default engine).", param_hint="--to"
        )
    settings = get_settings()

    def lab_assets(hidden: Path) -> list[str]:
        from dagma.lab import load_definitions

        env = mock.patch.dict(os.environ)  # loading exports the lab's paths; undone after
        with adopt.lab_without(settings.notebooks_dir, hidden) as folder, env:
            os.environ["DAGMA_NOTEBOOKS_DIR"] = str(folder)
            graph = load_definitions(get_settings()).resolve_asset_graph()
        return [key.to_user_string() for key in graph.get_all_asset_keys()]

    say: dict[str, Any] = {"markup": False, "highlight": False, "soft_wrap": True}
    plan = adopt.plan(
        path,
        settings.notebooks_dir,
        lab_assets,
        ins=adopt.parse_ins(ins, path) if ins else None,
        group=group,
        native=to == "native",
    )
    for line in plan.diff.splitlines():
        style = "bold" if line[:3] in ("+++", "---") else {"+": "green", "-": "red"}.get(line[:1])
        console.print(line, style=style, **say)
    for note in plan.notes:
        console.print(f"note: {note}", style="yellow", **say)
    if dry_run:
        console.print("Dry run: nothing written.", **say)
        return
    spec = plan.write()
    inputs = ", ".join(f"{v} <- {a}" for v, a in plan.ins.items()) or "none"
    run = " ".join([*spec.upstream, *spec.asset_names])
    console.print(
        f"Adopted {adopt.shown(plan.source)} as {adopt.shown(plan.target)}: the asset "
        f"{spec.name!r} on the {spec.engine} engine, inputs: {inputs}. Run it: dagma run {run}",
        **say,
    )


@app.command()
def gc(
    keep: Annotated[
        int | None,
        typer.Option(min=0, help="Newest executed notebooks kept per notebook (DAGMA_KEEP_RUNS)."),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list what would go.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Prune executed notebooks under $DAGMA_HOME/runs; never one a materialization links."""
    import dagster as dg

    from dagma.gc import collect

    settings = get_settings()
    settings.ensure_dirs()
    settings.export_env()  # DAGSTER_HOME for the instance below
    with dg.DagsterInstance.get() as instance:
        report = collect(
            settings,
            instance,
            keep=settings.dagma_keep_runs if keep is None else keep,
            dry_run=dry_run,
        )
    if as_json:
        typer.echo(json.dumps(report.__dict__, indent=2))
        return
    verb = "Would delete" if dry_run else "Deleted"
    console.print(
        f"{verb} {len(report.deleted)} executed notebooks under {settings.runs_dir} "
        f"({report.bytes_freed / 1e6:.1f} MB freed); kept {report.kept}."
    )
    for item in report.deleted:
        console.print(f"  {item}")


@app.command()
def demo(
    seed: Annotated[int | None, typer.Option(help="Override every notebook's seed.")] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the summary as JSON; progress goes to stderr.")
    ] = False,
    processes: Processes = None,
) -> None:
    """Materialize the whole demo graph on the embedded defaults and summarise it."""
    settings = get_settings()
    pool = kernel_pool.for_command(settings, None, processes)
    from dagma import lab
    from dagma.lib import arrivals

    out = Console(stderr=True) if as_json else console
    try:
        if not arrivals.landed(settings.inbox_dir):
            path = arrivals.write_sample(settings.inbox_dir)
            out.print(f"Dropped sample arrivals into the empty inbox: {path}")
        result = lab.materialize(
            settings, selection=None, seed=seed, console=out, processes=processes
        )
    finally:
        if pool is not None:
            pool.close()
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
    processes: Processes = None,
    local: Annotated[
        bool, typer.Option("--local", help="Run in this process even when the lab is up.")
    ] = False,
    push_metrics: Annotated[
        str | None,
        typer.Option(
            "--push-metrics",
            metavar="URL",
            envvar="DAGMA_METRICS_PUSH_URL",
            help="After a run in this process, push its metrics to this Prometheus "
            "Pushgateway (job dagma_run).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Materialize some or all assets.

    With the lab's services up in this home (`dagma services up`), a selection of unpartitioned
    assets runs there, on the warm code server and its spare kernels; otherwise, or with
    `--local`, it runs in this process.
    """
    if not push_metrics:
        if not _run(assets, stale, param, processes, local, pushing=False)[1]:
            raise typer.Exit(1)
        return
    import os
    import shutil
    import tempfile

    from dagma.lib.telemetry import metrics

    # A folder of this run's own, set before anything imports prometheus_client: the figures
    # of steps in child processes (-j) are pushed too, and none of an enclosing lab's.
    folder = Path(tempfile.mkdtemp(prefix="dagma-run-metrics-"))
    os.environ.update(metrics.shared_dir_env(folder, fresh=True))
    try:
        here, success = _run(assets, stale, param, processes, local, pushing=True)
        if here:  # a failed run's figures too: its failed steps are what to look at
            metrics.push(push_metrics, job="dagma_run")
            console.print(f"Pushed the run's metrics to {push_metrics} (job dagma_run).")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if not success:
        raise typer.Exit(1)


def _run(
    assets: list[str] | None,
    stale: bool,
    param: list[str] | None,
    processes: int | None,
    local: bool,
    pushing: bool,
) -> tuple[bool, bool]:
    """`dagma run`: whether it ran in this process (its metrics are here), and succeeded."""
    settings = get_settings()
    params = _notebook_params(param or [], assets or [], settings)
    if assets and not (local or stale or processes):
        from dagma.services.remote import run_in_the_lab

        done = run_in_the_lab(settings.home, assets, params, console)
        if done is not None:
            if pushing:
                console.print(
                    "Not pushed: the run was in the lab's services, whose metrics exporter "
                    "Prometheus scrapes (`dagma services status`). Run with --local to push.",
                    markup=False,
                )
            return False, done.success
    # Spare kernels start now, while Dagster is imported and the definitions load.
    pool = None if stale else kernel_pool.for_command(settings, assets, processes)
    from dagma import lab

    try:
        result = lab.materialize(
            settings,
            selection=assets,
            stale_only=stale,
            params=params,
            console=console,
            processes=processes,
        )
    finally:
        if pool is not None:
            pool.close()
    if result.run_id is None:
        console.print("[green]Nothing is stale: every asset is up to date.[/green]")
        return False, True
    lab.print_summary(result, settings, console)
    return True, result.success


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
    return {nb: specs[nb].coerce(values) for nb, values in raw.items()}


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
    lab.print_status(report, console)


@app.command()
def backup(
    archive: Annotated[
        Path | None,
        typer.Argument(help="The .tar.gz to write; default dagma-backup-<UTC time>.tar.gz here."),
    ] = None,
) -> None:
    """Copy the embedded lab (Dagster runs, MLflow runs and models, vectors) into one archive."""
    from dagma.backup import backup as run_backup

    report = run_backup(get_settings(), archive)
    console.print(
        report.summary("dagma restore"),
        markup=False,
        highlight=False,
        soft_wrap=True,  # paths stay whole, to copy and paste
    )


@app.command()
def restore(
    archive: Annotated[Path, typer.Argument(help="A .tar.gz written by `dagma backup`.")],
) -> None:
    """Restore a backup into an empty DAGMA_HOME, checking every file first."""
    from dagma.backup import restore as run_restore

    settings = get_settings()
    report = run_restore(settings, archive)
    console.print(
        f"Restored {report.files} files into {settings.home} in {report.seconds:.1f} s. "
        "Check it with: dagma status",
        markup=False,
        highlight=False,
        soft_wrap=True,  # paths stay whole, to copy and paste
    )


@app.command()
def doctor(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
    fix: Annotated[
        bool, typer.Option("--fix", help="Apply the safe fixes: free slots of dead runs.")
    ] = False,
) -> None:
    """Check this environment against what is pinned, with the fix for each failure."""
    from dagma.doctor import run as run_doctor

    raise typer.Exit(run_doctor(as_json, fix=fix))


@app.command()
def ask(
    question: Annotated[str, typer.Argument(help="The question, in quotes.")],
    k: Annotated[int, typer.Option(min=1, max=20, help="Passages given to the model.")] = 4,
    source: Annotated[
        str | None, typer.Option(help="Only passages of this source, e.g. pydoc:try.")
    ] = None,
    mmr: Annotated[bool, typer.Option(help="Diverse passages (maximal marginal relevance).")] = (
        False
    ),
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the whole answer as JSON instead of streaming.")
    ] = False,
) -> None:
    """Answer a question from the document collection: streams the answer, then its sources."""
    from functools import partial

    from dagma.lib import rag
    from dagma.lib.llm import LLMSettings, chat_model, check_backend
    from dagma.lib.sentences import settled_prefix
    from dagma.qa import open_pipeline

    try:
        question = rag.validate_question(question)
        llm_settings = LLMSettings.from_env()
        check_backend(llm_settings)
        with open_pipeline(
            get_settings(), chat_model(llm_settings), k=k, source=source, mmr=mmr
        ) as pipeline:
            if as_json:
                typer.echo(pipeline.answer(question).model_dump_json(indent=2))
                return
            docs = pipeline.retrieve(question)
            text = shown = ""
            say = partial(console.print, end="", markup=False, highlight=False, soft_wrap=True)
            for chunk in pipeline.stream(question, docs):
                text += chunk
                settled = settled_prefix(text)  # sentence by sentence: none is shown cut
                say(settled[len(shown) :])
                shown = settled
            answer = pipeline.assemble(question, docs, text)
            start = shown.strip()
            say(answer.text[len(start) :] if answer.text.startswith(start) else answer.text)
            console.print()
    except ValueError as exc:  # an empty question, or one the model's context cannot hold
        raise InputError(str(exc)) from exc
    _print_sources(answer)


def _print_sources(answer: Any) -> None:
    from dagma.lib.answers import answer_lines

    lines = answer_lines(answer)
    console.print("Each sentence, the passage that supports it ([?]: none) and the score:")
    for line in lines[2 : lines.index("Sources:")]:
        console.print(line, markup=False, highlight=False)
    table = Table(title="Sources", title_justify="left")
    for col in ("", "source", "score", "passage"):
        table.add_column(col)
    for s in answer.sources:
        mark = "cited" if s.cited else ""
        table.add_row(f"[{s.rank}] {mark}", s.source, f"{s.score:.3f}", s.snippet)
    console.print(table)
    console.print(f"confidence {answer.confidence:.2f}")


@app.command()
def serve(
    host: Annotated[
        str, typer.Option(help="Address to listen on; loopback unless a gateway fronts it.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8000,
) -> None:
    """Serve the API (predict, search, ask) with uvicorn until Ctrl-C; OpenAPI docs at /docs."""
    import ipaddress

    import uvicorn

    from dagma.api.app import create_app

    api = create_app(get_settings())  # no token secret or issuer: fails here, naming the fix
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}"
    say: dict[str, Any] = {"markup": False, "highlight": False, "soft_wrap": True}
    console.print(f"Serving the Dagma API on {url} (Ctrl-C stops it)", **say)
    console.print(f"  docs  {url}/docs", **say)
    console.print("  token dagma token issue --scope predict --scope search --scope ask", **say)
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        console.print(
            f"warning: {host} is reachable from other machines over plain HTTP; put the "
            "gateway (TLS) in front of it.",
            style="bold yellow",
            **say,
        )
    uvicorn.run(api, host=host, port=port, log_level="info")


@llm_app.command("serve")
def llm_serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
    alias: Annotated[str, typer.Option(help="Model name clients ask for.")] = "smollm2",
) -> None:
    """Serve the offline model over the OpenAI protocol (llama.cpp's server) until Ctrl-C."""
    import os
    import subprocess  # nosec B404 # argv below is built by openai_server_command, no shell

    from dagma.lib.llm import LLMSettings, openai_server_command

    argv = openai_server_command(
        LLMSettings.from_env(backend="local"), host, port, model_alias=alias
    )
    console.print(
        f"Serving {alias} on http://{host}:{port}/v1. Use it with:\n"
        f"  DAGMA_LLM=openai OPENAI_BASE_URL=http://{host}:{port}/v1 DAGMA_LLM_MODEL={alias}",
        markup=False,
    )
    try:
        code = subprocess.call(argv, env=os.environ.copy())  # nosec B603 # our argv, no shell
    except KeyboardInterrupt:
        code = 0
    raise typer.Exit(code)


@app.command("lab")
def lab_command(
    dagster_port: Annotated[int, typer.Option(help="Port of dagster dev.")] = 3000,
    mlflow_port: Annotated[int, typer.Option(help="Port of the MLflow UI.")] = 5000,
    jupyter_port: Annotated[int, typer.Option(help="Port of JupyterLab.")] = 8888,
    app_port: Annotated[int, typer.Option(help="Port of the Streamlit app.")] = 8501,
    metrics_port: Annotated[
        int,
        typer.Option(
            min=0,
            max=65535,
            help="Port of the lab's Prometheus metrics (every process's); 0 turns them off.",
        ),
    ] = 9464,
    jupyter: Annotated[bool, typer.Option(help="Start JupyterLab too.")] = True,
) -> None:
    """dagster dev, the MLflow UI, JupyterLab (behind a token) and the app together; Ctrl-C,
    SIGTERM or closing the terminal stops them all."""
    from dagma.services import devlab

    settings = get_settings()
    ports = {"dagster": dagster_port, "mlflow": mlflow_port, "jupyter": jupyter_port}
    plan = devlab.plan(
        settings, {**ports, "app": app_port, "metrics": metrics_port}, jupyter=jupyter
    )
    say: dict[str, Any] = {"markup": False, "highlight": False, "soft_wrap": True}
    for warning in plan.warnings:
        console.print(warning, style="bold yellow", **say)

    def ready() -> None:  # plain lines: a table would wrap the tokenized URL, breaking a copy
        console.print("Dagma lab (Ctrl-C stops everything)", style="bold", **say)
        width = max(map(len, plan.urls))
        for name, url in plan.urls.items():
            console.print(f"  {name:<{width}}  {url}", **say)
        for name, why in plan.skipped.items():
            console.print(f"  {name} not started: {why}", **say)

    devlab.Lab(settings, plan).run(lambda line: console.print(line, **say), ready)


def main() -> None:
    """Console entry point; errors Dagma raises on purpose print as `dagma.cli_errors` says."""
    app()


if __name__ == "__main__":
    main()
