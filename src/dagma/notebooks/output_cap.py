"""A papermill engine that keeps at most N bytes of each cell's output, with a visible marker.

A cell that prints without end would otherwise be kept whole in memory, re-saved after every
cell and rendered to HTML. Past the cap, the kernel's further output is read and dropped.
"""

from __future__ import annotations

from typing import Any

import nbformat
from papermill.clientwrap import PapermillNotebookClient
from papermill.engines import NBClientEngine, papermill_engines
from papermill.log import logger
from papermill.utils import merge_kwargs, remove_args
from traitlets import Integer

ENGINE = "dagma"


def _size(output: Any) -> int:
    if output.get("output_type") == "stream":
        return len(str(output.get("text", "")))
    return sum(len(str(value)) for value in output.get("data", {}).values()) or 64


class CappedClient(PapermillNotebookClient):
    max_output_bytes = Integer(0, help="Most bytes of output kept per cell; 0 keeps all.").tag(
        config=True
    )

    def __init__(self, nb_man: Any, **kwargs: Any) -> None:
        super().__init__(nb_man, **kwargs)
        self._kept: dict[int, int] = {}
        self._cut: set[int] = set()

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


class CappedEngine(NBClientEngine):
    """papermill's nbclient engine, with `max_output_bytes` passed to its client."""

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
        return CappedClient(nb_man, max_output_bytes=max_output_bytes, **final).execute()


papermill_engines.register(ENGINE, CappedEngine)
