"""Execute one notebook with papermill: validated parameters in, outputs and rendered copies out."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from dagma.errors import DagmaError
from dagma.lib.atomic import write_atomic
from dagma.lib.inert_html import inert_document, inert_notebook
from dagma.lib.run_folder import PickleFile, RunFolder, pickle_paths, write_pickle
from dagma.lib.telemetry import metrics, tracing
from dagma.nb import CONTEXT_VAR, NotebookContext, RunTarget
from dagma.notebooks import parameterize
from dagma.notebooks.spec import NotebookSpec, read_notebook

if TYPE_CHECKING:
    from dagma.notebooks.papermill_engine import Limits

KERNEL = (
    "python3"  # jupyter_client maps the native kernel to this very interpreter (sys.executable)
)


class NotebookFailed(DagmaError, RuntimeError):
    """A cell raised. The executed copy and its HTML are kept; the message says where."""

    def __init__(self, message: str, execution: Execution) -> None:
        super().__init__(message)
        self.execution = execution


@dataclass
class Execution:
    spec: NotebookSpec
    params: dict[str, Any]
    run_dir: Path
    ipynb: Path
    html: Path | None = None
    outputs: dict[str, Any] = field(default_factory=dict)
    output_metadata: dict[str, dict[str, Any]] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    mlflow_experiment_id: str | None = None
    seconds: float = 0.0
    error: str | None = None


class Engine(Protocol):
    """Executes a notebook in a fresh kernel; the executed copy is written even on failure."""

    # Whether upstream values reach the kernel through the run folder (else the engine's own way).
    passes_inputs: bool

    def run(self, source: Any, values: dict[str, Any], output: Path, cwd: Path) -> None: ...


class PapermillEngine:
    """The default bridge: papermill runs the notebook with its values after the parameters."""

    passes_inputs = True

    def __init__(self, limits: Limits | None = None, pool: Path | None = None) -> None:
        from dagma.notebooks.papermill_engine import Limits

        self.limits = limits or Limits()
        self.pool = pool  # a kernel pool's folder: the notebook starts on a spare kernel there
        self.pooled = False  # whether the last run did

    def run(self, source: Any, values: dict[str, Any], output: Path, cwd: Path) -> None:
        import papermill

        from dagma.notebooks import kernel_pool, kernel_warmup, papermill_engine

        # papermill logs a warning per injected name not in the parameters cell; ours is expected.
        logging.getLogger("papermill").setLevel(logging.ERROR)
        kwargs = self.limits.papermill_kwargs(
            trace_file=str(output.parent / "kernel-spans.jsonl"), notebook=output.stem
        )
        km = None
        if self.pool is not None:
            claimed = time.perf_counter()
            with tracing.span("notebook.kernel_claim", **{"dagma.kernel.spare": True}) as span:
                km = kernel_pool.take(
                    self.pool,
                    cwd=cwd,
                    env={**os.environ, **(kwargs.get("kernel_env") or {})},
                    modules=kernel_warmup.first_cell_imports(source),
                    run_id=self.limits.run_id,
                )
                if span is not None and km is None:
                    span.set_attribute("dagma.kernel.spare", False)
            if km is not None:
                metrics.record("dagma_kernel_pool_claims", result="warm")
                seconds = time.perf_counter() - claimed
                metrics.record(
                    "dagma_notebook_phase_duration_seconds",
                    seconds,
                    notebook=output.stem,
                    phase="kernel_start",
                )
        self.pooled = km is not None
        try:
            papermill.execute_notebook(
                parameterize.for_papermill(source, values),
                str(output),
                kernel_name=KERNEL,
                language="python",
                cwd=str(cwd),
                progress_bar=False,
                log_output=False,
                engine_name=papermill_engine.ENGINE,
                km=km,
                **kwargs,
            )
        finally:
            if km is not None:
                km.shutdown_kernel(now=True)  # one notebook per kernel, whatever happened


def notebook_value(execution: Execution) -> dict[str, str | None]:
    """The value of a notebook that hands none over: its executed copy, as with dagstermill."""
    return {
        "executed_notebook": str(execution.ipynb),
        "html": str(execution.html) if execution.html else None,
    }


class KernelError(DagmaError, RuntimeError):
    """The project's kernel cannot be used; the message says how to fix it."""


def check_kernel() -> None:
    """Fail before execution unless `python3` resolves to this very interpreter."""
    import os
    import sys

    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec(KERNEL)
    except NoSuchKernel:
        raise KernelError(
            f"No Jupyter kernel {KERNEL!r}: ipykernel is missing from {sys.prefix}. "
            "Run `uv sync --frozen` (or `make install`)."
        ) from None
    exe = spec.argv[0] if spec.argv else ""
    if exe in {"python", "python3", f"python{sys.version_info[0]}.{sys.version_info[1]}"}:
        return  # jupyter_client runs these names as sys.executable
    if not os.path.exists(exe) or not os.path.samefile(exe, sys.executable):
        raise KernelError(
            f"The Jupyter kernel {KERNEL!r} in {spec.resource_dir} runs {exe!r}, not this "
            f"project's interpreter {sys.executable}. Remove it with `jupyter kernelspec "
            f"remove {KERNEL}` so the project's own kernel is used."
        )


@lru_cache(maxsize=1)
def _html_exporter() -> Any:
    from nbconvert import HTMLExporter

    return HTMLExporter(embed_images=True)


def warm_html_exporter() -> None:
    """Import nbconvert and load its templates (about 2 s) while a kernel runs, not after."""
    import nbformat

    code = nbformat.v4.new_code_cell("print(1)")
    _html_exporter().from_notebook_node(nbformat.v4.new_notebook(cells=[code]))


def render_html(ipynb: Path) -> Path:
    """A self-contained, inert HTML copy (images inlined, no scripts) next to the notebook, and
    an inert `.view.ipynb` for Dagster's notebook viewer; each replaced whole."""
    import warnings

    import nbformat

    notebook = nbformat.read(ipynb, as_version=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # e.g. dagstermill's scraps: not shown
        body, _ = _html_exporter().from_notebook_node(notebook)
    html = ipynb.with_suffix(".html")
    write_atomic(html, inert_document(body))
    write_atomic(viewer_copy(ipynb), nbformat.writes(inert_notebook(notebook)))
    return html


def viewer_copy(ipynb: Path) -> Path:
    """Where `render_html` puts the notebook Dagster's viewer may open."""
    return ipynb.with_suffix(".view.ipynb")


def _failure_summary(exc: Exception) -> str:
    """The failing cell and the last lines of its traceback, from papermill's error."""
    if isinstance(exc, TimeoutError) and "max_runtime" in str(exc):  # NotebookTimeoutError
        return f"{type(exc).__name__}: {exc}"
    if isinstance(exc, TimeoutError):  # nbclient's CellTimeoutError
        return (
            f"{type(exc).__name__}: {str(exc).splitlines()[0]} Raise the notebook's "
            "asset['timeout'] (seconds per cell) or DAGMA_CELL_TIMEOUT if it needs longer."
        )
    ename = getattr(exc, "ename", type(exc).__name__)
    evalue = getattr(exc, "evalue", str(exc))
    cell = getattr(exc, "cell_index", None)
    source = getattr(exc, "source", "")
    where = f"cell {cell}" if cell is not None else "a cell"
    snippet = "\n    ".join(str(source).strip().splitlines()[-3:])
    return f"{ename}: {evalue} in {where}:\n    {snippet}" if snippet else f"{ename}: {evalue}"


def _start_mlflow_run(context: NotebookContext) -> tuple[str, str]:
    """One MLflow run per materialization, created before the kernel so it is never missing."""
    from dagma.lib import tracking

    experiment_id = tracking.setup_experiment(
        context.tracking_uri,
        context.experiment,
        Path(context.artifact_root) if context.artifact_root else None,
    )
    run = tracking.client(context.tracking_uri).create_run(
        experiment_id, run_name=context.notebook, tags=context.lineage()
    )
    return run.info.run_id, experiment_id


class _MlflowRunStarter(threading.Thread):
    """Creates the materialization's MLflow run in the background and records its id in the
    run folder's context, where the kernel (`ctx.start_run()`) and the app find it."""

    def __init__(self, context: NotebookContext, folder: RunFolder) -> None:
        super().__init__(name=f"mlflow-run-{context.notebook}", daemon=True)
        self.context, self.folder = context, folder
        self.ids: tuple[str, str] | None = None
        self.error: Exception | None = None

    def run(self) -> None:
        recorded = self.context.to_json()
        try:
            self.ids = _start_mlflow_run(self.context)
            recorded["mlflow_run_id"] = self.ids[0]
        except Exception as exc:
            self.error = exc
            recorded["mlflow_error"] = str(exc)
        self.folder.write_context(recorded)

    def result(self) -> tuple[str, str]:
        """The (run id, experiment id), or the creation error raised here."""
        self.join()
        if self.ids is None:
            raise self.error or RuntimeError("the MLflow run was not created")
        return self.ids


def _finish_mlflow_run(execution: Execution, target: RunTarget, failed: bool) -> None:
    """Attach the executed copies, then end the run as FINISHED or FAILED."""
    from dagma.lib import tracking

    if execution.mlflow_run_id is None:
        return
    tracking.end_notebook_run(
        target.tracking_uri, execution.mlflow_run_id, (execution.ipynb, execution.html), failed
    )


def _upstream_files(
    spec: NotebookSpec, folder: RunFolder, inputs: dict[str, Any]
) -> dict[str, str | dict[str, str]]:
    """Each upstream value's file: the lab's storage file the IO manager named, or, for a value
    that came in memory (another IO manager), a pickle in the run folder."""
    found: dict[str, str | dict[str, str]] = {}
    for name in spec.upstream:
        value = inputs.get(name)
        files = pickle_paths(value)
        if files is None:
            path = folder.inputs / f"{name}.pkl"
            write_pickle(path, value)
            files = str(path)
        found[name] = files
    return found


def execute(
    spec: NotebookSpec,
    *,
    runs_dir: Path,
    target: RunTarget,
    params: dict[str, Any] | None = None,
    inputs: dict[str, Any] | None = None,
    engine: Engine | None = None,
) -> Execution:
    """Run `spec` in a fresh kernel of this environment and collect what it hands over.

    Each output is a `PickleFile`: the file the kernel wrote, for the IO manager to move into
    its storage, so no value is unpickled here.
    """
    engine = engine or PapermillEngine()
    attributes = {"dagma.notebook": spec.name, "dagster.run_id": target.run_id}
    with tracing.span("notebook", **attributes) as span:
        return _execute(spec, runs_dir, target, params, inputs, engine, span)


def _execute(
    spec: NotebookSpec,
    runs_dir: Path,
    target: RunTarget,
    params: dict[str, Any] | None,
    inputs: dict[str, Any] | None,
    engine: Engine,
    span: Any,
) -> Execution:
    values = spec.validate_params(params)
    check_kernel()
    started = time.perf_counter()
    folder = RunFolder.of(runs_dir, target.run_id or "adhoc", spec.name).create()
    context = NotebookContext(
        notebook=spec.name,
        asset_names=list(spec.asset_names),
        target=target,
        upstream_paths=_upstream_files(spec, folder, inputs or {}) if engine.passes_inputs else {},
        outputs_dir=folder.outputs,
        code_version=spec.code_version,
    )
    execution = Execution(spec=spec, params=values, run_dir=folder.path, ipynb=folder.ipynb)
    folder.write_context(context.to_json())
    # MLflow's import and run creation overlap the kernel's start; the kernel waits for the
    # run's id in the context only when it calls ctx.start_run().
    mlflow_run = _MlflowRunStarter(context, folder)
    mlflow_run.start()
    warm = threading.Thread(target=warm_html_exporter, name="warm-nbconvert", daemon=True)
    warm.start()

    failure: Exception | None = None
    try:
        engine.run(
            read_notebook(spec.path),
            {**values, CONTEXT_VAR: str(folder.context_file)},
            execution.ipynb,
            spec.path.parent,
        )
    except Exception as exc:
        failure = exc
    execution.seconds = time.perf_counter() - started
    warm.join()
    if execution.ipynb.is_file():
        rendering = time.perf_counter()
        with tracing.span("notebook.render"):
            execution.html = render_html(execution.ipynb)
        _phase(spec.name, "render", rendering)
    try:
        execution.mlflow_run_id, execution.mlflow_experiment_id = mlflow_run.result()
    except Exception:
        if failure is None:
            raise
    if span is not None and execution.mlflow_run_id:  # the trace's way to the MLflow run
        span.set_attribute("mlflow.run_id", execution.mlflow_run_id)
        span.set_attribute("mlflow.experiment_id", execution.mlflow_experiment_id or "")
    if failure is not None:
        execution.error = _failure_summary(failure)
        _finish_mlflow_run(execution, target, failed=True)
        raise NotebookFailed(
            f"Notebook {spec.path.name} failed: {execution.error}\n"
            f"Executed copy: {execution.ipynb}\nHTML: {execution.html}",
            execution,
        ) from failure

    handing = time.perf_counter()
    with tracing.span("notebook.handover"):
        _hand_over(spec, folder, execution, target)
    _phase(spec.name, "handover", handing)
    _finish_mlflow_run(execution, target, failed=False)
    return execution


def _phase(notebook: str, phase: str, since: float) -> None:
    seconds = time.perf_counter() - since
    metrics.record("dagma_notebook_phase_duration_seconds", seconds, notebook=notebook, phase=phase)


def _hand_over(
    spec: NotebookSpec, folder: RunFolder, execution: Execution, target: RunTarget
) -> None:
    """Each declared output's file (or the executed copy, for a notebook that hands none)."""
    for name in spec.asset_names:
        path = folder.output_file(name)
        if not path.is_file() and not spec.outputs:
            execution.outputs[name] = notebook_value(execution)
            execution.output_metadata[name] = {}
            continue
        if not path.is_file():
            execution.error = (
                f"it never handed over its declared output {name!r} "
                f"(ctx.output(..., name={name!r}) or dagstermill.yield_result(..., {name!r}))"
            )
            _finish_mlflow_run(execution, target, failed=True)
            raise NotebookFailed(
                f"Notebook {spec.path.name} finished but {execution.error}. "
                f"Executed copy: {execution.ipynb}",
                execution,
            )
        execution.outputs[name] = PickleFile(str(path))
        meta = folder.output_metadata_file(name)
        execution.output_metadata[name] = json.loads(meta.read_text()) if meta.is_file() else {}
