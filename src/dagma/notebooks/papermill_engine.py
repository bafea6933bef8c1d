"""Dagma's papermill engine: each cell's output capped, each kernel tagged with its run.

A cell that prints without end would otherwise be kept whole in memory, re-saved after every
cell and rendered to HTML: past the cap, the kernel's further output is read and dropped, and
the cell says where it was cut. The kernel's environment names its Dagster run, so the kernel
of a run whose process was killed can be found and stopped (see `dagma.reaping`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat
from nbclient.exceptions import CellTimeoutError
from nbclient.util import run_sync
from papermill.clientwrap import PapermillNotebookClient
from papermill.engines import NBClientEngine, papermill_engines
from papermill.log import logger
from papermill.utils import merge_kwargs, remove_args
from traitlets import Dict, Float, Integer, Unicode

from dagma.errors import DagmaError
from dagma.lib.telemetry import metrics, tracing

ENGINE = "dagma"
RUN_ENV = "DAGMA_KERNEL_RUN_ID"


class NotebookTimeoutError(DagmaError, CellTimeoutError):
    """The whole notebook ran past its `max_runtime`."""


@dataclass(frozen=True)
class Limits:
    """What bounds one notebook's execution, whichever engine runs it."""

    cell_timeout: float | None = None  # seconds per cell
    max_runtime: float | None = None  # seconds for the whole notebook, kernel start included
    max_output: int | None = None  # bytes of output kept per cell
    run_id: str | None = None  # tags the kernel, so a dead run's kernel can be found

    def papermill_kwargs(self, trace_file: str = "", notebook: str = "") -> dict[str, Any]:
        """For `papermill.execute_notebook` with one of Dagma's engines.

        `trace_file` is where the kernel writes its cell spans while tracing is on.
        """
        return {
            "trace_file": trace_file,
            "notebook_name": notebook,
            # nbclient takes whole seconds
            "execution_timeout": math.ceil(self.cell_timeout) if self.cell_timeout else None,
            "max_runtime": self.max_runtime or 0.0,
            "max_output_bytes": self.max_output or 0,
            "kernel_env": {RUN_ENV: self.run_id} if self.run_id else None,
        }


def _size(output: Any) -> int:
    if output.get("output_type") == "stream":
        return len(str(output.get("text", "")))
    return sum(len(str(value)) for value in output.get("data", {}).values()) or 64


class LabClient(PapermillNotebookClient):
    max_output_bytes = Integer(0, help="Most bytes of output kept per cell; 0 keeps all.").tag(
        config=True
    )
    kernel_env = Dict(help="Variables added to the kernel's environment.").tag(config=True)
    max_runtime = Float(0.0, help="Seconds the whole notebook may run; 0: no limit.").tag(
        config=True
    )
    trace_file = Unicode("", help="Where the kernel writes its spans while tracing is on.").tag(
        config=True
    )
    notebook_name = Unicode("", help="The notebook, for its spans and metrics.").tag(config=True)

    async def async_start_new_kernel(self, **kwargs: Any) -> None:
        if self.kernel_env:
            kwargs["env"] = {**os.environ, **kwargs.get("env", {}), **self.kernel_env}
        started = time.perf_counter()
        with tracing.span("notebook.kernel_start", **{"dagma.kernel.spare": False}):
            await super().async_start_new_kernel(**kwargs)
        metrics.record("dagma_kernel_pool_claims", result="cold")
        seconds = time.perf_counter() - started
        name = self.notebook_name
        metrics.record(
            "dagma_notebook_phase_duration_seconds", seconds, notebook=name, phase="kernel_start"
        )

    # nbclient binds the sync form to its own coroutine at class creation: bind ours.
    start_new_kernel = run_sync(async_start_new_kernel)

    def setup_kernel(self, **kwargs: Any) -> Any:
        # A spare kernel from the pool (`km=`) runs this one notebook: shut it down after.
        kwargs.setdefault("cleanup_kc", True)
        return super().setup_kernel(**kwargs)

    def papermill_execute_cells(self) -> None:
        self.traced(super().papermill_execute_cells)

    def traced(self, execute_cells: Callable[[], None]) -> None:
        """Run the cell loop in an execute span, with the kernel recording a span per cell."""
        started = time.perf_counter()
        with tracing.span("notebook.execute", **{"dagma.notebook": self.notebook_name}):
            trace_file = Path(self.trace_file) if self.trace_file else None
            install = tracing.kernel_install_code(trace_file) if trace_file else None
            if install is not None:  # silent: no execution count, no cell span, no output
                self.wait_for_reply(self.kc.execute(install, silent=True, store_history=False))
            try:
                execute_cells()
            finally:
                self._account(time.perf_counter() - started)

    def _account(self, seconds: float) -> None:
        """Each cell's time and the execution's, and the kernel's spans handed to the exporter."""
        name = self.notebook_name
        metrics.record(
            "dagma_notebook_phase_duration_seconds", seconds, notebook=name, phase="execute"
        )
        index: dict[int, int] = {}
        for i, cell in enumerate(self.nb.cells):
            if cell.get("cell_type") != "code":
                continue
            if cell.get("execution_count"):
                index[cell["execution_count"]] = i
            duration = cell.get("metadata", {}).get("papermill", {}).get("duration")
            if isinstance(duration, int | float):
                metrics.record("dagma_notebook_cell_duration_seconds", duration, notebook=name)
        if self.trace_file:
            tracing.import_kernel_spans(Path(self.trace_file), index)

    def __init__(self, nb_man: Any, **kwargs: Any) -> None:
        super().__init__(nb_man, **kwargs)
        self._kept: dict[int, int] = {}
        self._cut: set[int] = set()
        self._deadline = time.monotonic() + self.max_runtime if self.max_runtime else None
        if self._deadline is not None:
            self.timeout_func = self._time_left

    def _time_left(self, cell: Any) -> float:
        """A cell's timeout: its own, or less when the notebook's time runs out sooner."""
        deadline = self._deadline or time.monotonic()
        left = max(deadline - time.monotonic(), 0.01)  # 0 would mean "no timeout"
        return min(self.timeout, left) if self.timeout else left

    async def _async_handle_timeout(self, timeout: int, cell: Any = None) -> Any:
        try:
            return await super()._async_handle_timeout(timeout, cell)
        except CellTimeoutError as exc:
            if self._deadline is None or time.monotonic() < self._deadline - 0.05:
                raise
            raise NotebookTimeoutError(
                f"The notebook ran past its max_runtime of {self.max_runtime:g} seconds. Raise "
                "the notebook's asset['max_runtime'] or DAGMA_NOTEBOOK_TIMEOUT if it needs longer."
            ) from exc

    def output(
        self, outs: list[Any], msg: dict[str, Any], display_id: str | None, cell_index: int
    ) -> Any:
        limit = self.max_output_bytes
        if cell_index in self._cut:
            return None
        kept = self._kept.get(cell_index, 0)
        out = super().output(outs, msg, display_id, cell_index)
        if not limit or out is None:
            return out
        room = limit - kept
        kept += _size(out)
        self._kept[cell_index] = kept
        if kept <= limit:
            return out
        if out.get("output_type") == "stream":  # keep the part that fits
            out["text"] = str(out["text"])[: max(0, room)]
        elif out in outs:
            outs.remove(out)
        self._cut.add(cell_index)  # past the cap: say so once, in the cell itself
        outs.append(
            nbformat.v4.new_output(
                "stream",
                name="stderr",
                text=f"\n[Dagma: this cell's output was cut at {limit:,} bytes. Raise the "
                "notebook's asset['max_output'] or DAGMA_MAX_CELL_OUTPUT to keep more.]\n",
            )
        )
        return None


class LabEngine(NBClientEngine):
    """papermill's nbclient engine, with the lab's limits and kernel tag for its client."""

    client_class: type[LabClient] = LabClient

    @classmethod
    def execute_managed_notebook(
        cls,
        nb_man: Any,
        kernel_name: str,
        log_output: bool = False,
        stdout_file: Any = None,
        stderr_file: Any = None,
        start_timeout: int = 60,
        execution_timeout: int | None = None,
        max_output_bytes: int = 0,
        kernel_env: dict[str, str] | None = None,
        max_runtime: float = 0.0,
        trace_file: str = "",
        notebook_name: str = "",
        **kwargs: Any,
    ) -> Any:
        kwargs = remove_args(["input_path", "timeout", "startup_timeout"], **kwargs)
        final = merge_kwargs(
            kwargs,
            timeout=execution_timeout,
            startup_timeout=start_timeout,
            kernel_name=kernel_name,
            log=logger,
            log_output=log_output,
            stdout_file=stdout_file,
            stderr_file=stderr_file,
        )
        client = cls.client_class(
            nb_man,
            max_output_bytes=max_output_bytes,
            kernel_env=kernel_env or {},
            max_runtime=max_runtime,
            trace_file=trace_file,
            notebook_name=notebook_name,
            **final,
        )
        return client.execute()


papermill_engines.register(ENGINE, LabEngine)
