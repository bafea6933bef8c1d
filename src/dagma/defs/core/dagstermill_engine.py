"""The dagstermill engine: dagstermill's own execution, on a copy that keeps the defaults.

dagstermill starts the kernel, rebuilds the step's context there from the reconstructable job
(so `dagstermill.get_context()` is this run's), and loads each upstream value into a variable
of the input's name. What the notebook yields through `yield_event` comes back as events.
The lab's limits (cell and notebook timeouts, output cap, the kernel's run tag) apply through
an engine that adds them to dagstermill's own, chosen when dagstermill calls papermill.
"""

from __future__ import annotations

import contextvars
import functools
import pickle  # nosec B403 # only events dagstermill's own kernel-side manager wrote
from pathlib import Path
from typing import Any

import nbformat
import papermill
from dagstermill.engine import DagstermillNotebookClient
from papermill.engines import papermill_engines

from dagma.notebooks import parameterize
from dagma.notebooks.papermill_engine import LabClient, LabEngine, Limits

ENGINE = "dagma-dagstermill"
# The limits of the step running in this thread; dagstermill calls papermill without them.
_LIMITS: contextvars.ContextVar[Limits | None] = contextvars.ContextVar("limits", default=None)


class _Client(DagstermillNotebookClient, LabClient):
    """dagstermill's cell loop and teardown, with the lab's limits, kernel tag and spans."""

    def papermill_execute_cells(self) -> None:
        self.traced(lambda: DagstermillNotebookClient.papermill_execute_cells(self))


class _BoundedEngine(LabEngine):
    """The lab's engine, running dagstermill's client."""

    client_class = _Client


papermill_engines.register(ENGINE, _BoundedEngine)


def _bound_dagstermill_calls() -> None:
    """Route dagstermill's `papermill.execute_notebook` call through the bounded engine."""
    execute = papermill.execute_notebook
    if getattr(execute, "_dagma_bounded", False):
        return

    @functools.wraps(execute)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        limits = _LIMITS.get()
        if limits is not None and kwargs.get("engine_name") == "dagstermill":
            output = Path(str(args[1] if len(args) > 1 else kwargs.get("output_path", "")))
            trace_file = str(output.parent / "kernel-spans.jsonl") if output.name else ""
            kwargs.update(
                engine_name=ENGINE,
                **limits.papermill_kwargs(trace_file=trace_file, notebook=output.stem),
            )
        return execute(*args, **kwargs)

    bounded._dagma_bounded = True  # type: ignore[attr-defined]
    papermill.execute_notebook = bounded


_bound_dagstermill_calls()


class DagstermillEngine:
    """Runs one step's notebook with `dagstermill.factory.execute_notebook`."""

    passes_inputs = False  # dagstermill loads them in the kernel through the IO manager

    def __init__(
        self,
        step_context: Any,
        inputs: dict[str, Any],
        name: str,
        *,
        keep_defaults: bool = True,
        limits: Limits | None = None,
    ) -> None:
        self.step_context, self.inputs, self.name = step_context, inputs, name
        self.keep_defaults = keep_defaults
        self.limits = limits or Limits()
        self.events: list[Any] = []

    def run(self, source: Any, values: dict[str, Any], output: Path, cwd: Path) -> None:
        from dagstermill.factory import execute_notebook

        work = output.parent / "dagstermill"
        work.mkdir(parents=True, exist_ok=True)
        copy = work / output.name
        nbformat.write(
            parameterize.for_dagstermill(source, values, keep_defaults=self.keep_defaults), copy
        )
        bound = _LIMITS.set(self.limits)
        try:
            executed = execute_notebook(
                self.step_context,
                name=self.name,
                save_notebook_on_failure=False,  # the executed copy is kept below either way
                notebook_path=str(copy),
                output_notebook_dir=str(work),
                inputs=self.inputs,
            )
        except Exception:
            failed = sorted(work.glob("*-out.ipynb"), key=lambda p: p.stat().st_mtime)
            if failed:
                failed[-1].replace(output)
            raise
        finally:
            _LIMITS.reset(bound)
            for scratch in work.glob("*-inter.ipynb"):  # dagstermill's parameterized copy
                scratch.unlink(missing_ok=True)
        Path(executed).replace(output)
        self.events = events_of(output)


def events_of(executed: Path) -> list[Any]:
    """The Dagster events the notebook yielded with `dagstermill.yield_event`, in order."""
    import scrapbook

    events = []
    for key, scrap in scrapbook.read_notebook(str(executed)).scraps.items():
        if key.startswith("event-"):
            with open(scrap.data, "rb") as fh:
                events.append(pickle.load(fh))  # nosec B301 # written by dagstermill's kernel
    return events
