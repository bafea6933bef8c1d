"""Spans from inside a notebook's kernel: one per code cell, and any a cell opens itself.

The runner installs this in the kernel with the trace context of its execute span, and names a
file; each span finished here is one JSON line there, and the runner hands them to its exporter
after the notebook ends. A kernel therefore never imports OpenTelemetry and never connects to a
collector, and its cells sit under their step in the run's trace. Standard library only.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

CELL_SPAN = "notebook.cell"


@dataclass
class _Recorder:
    trace_id: str  # 32 hex digits
    root: str  # the runner's execute span: 16 hex digits
    path: str
    open: list[str] = field(default_factory=list)
    started: dict[str, int] = field(default_factory=dict)

    def begin(self) -> tuple[str, str]:
        span_id = secrets.token_hex(8)
        parent = self.open[-1] if self.open else self.root
        self.open.append(span_id)
        self.started[span_id] = time.time_ns()
        return span_id, parent

    def end(
        self,
        span_id: str,
        parent: str,
        name: str,
        attributes: dict[str, Any],
        error: str | None = None,
    ) -> None:
        if span_id in self.open:
            self.open.remove(span_id)
        line = {
            "name": name,
            "trace_id": self.trace_id,
            "span_id": span_id,
            "parent_id": parent,
            "start_ns": self.started.pop(span_id, time.time_ns()),
            "end_ns": time.time_ns(),
            "attributes": attributes,
            "error": error,
        }
        # One write per line: a kernel killed mid-write leaves at most one partial last line.
        with open(self.path, "a", encoding="utf-8") as out:
            out.write(json.dumps(line, default=str) + "\n")


_recorder: _Recorder | None = None
_cell: tuple[str, str] | None = None


def active() -> bool:
    """Whether this process is a kernel whose spans go to the runner."""
    return _recorder is not None


def install(traceparent: str, path: str) -> bool:
    """Record a span per executed cell under `traceparent`, into `path` (JSON lines)."""
    global _recorder
    parts = traceparent.split("-")
    if len(parts) != 4 or len(parts[1]) != 32 or len(parts[2]) != 16:
        return False
    from IPython import get_ipython

    shell = get_ipython()
    if shell is None:
        return False
    _recorder = _Recorder(trace_id=parts[1], root=parts[2], path=path)
    shell.events.register("pre_run_cell", _pre_run_cell)
    shell.events.register("post_run_cell", _post_run_cell)
    return True


def _pre_run_cell(info: Any) -> None:
    global _cell
    if _recorder is not None:
        _cell = _recorder.begin()


def _post_run_cell(result: Any) -> None:
    global _cell
    if _recorder is None or _cell is None:
        return
    error = result.error_in_exec or result.error_before_exec
    span_id, parent = _cell
    _cell = None
    _recorder.end(
        span_id,
        parent,
        CELL_SPAN,
        {"dagma.cell.execution_count": result.execution_count or 0},
        error=f"{type(error).__name__}: {error}" if error else None,
    )


@contextmanager
def span(name: str, attributes: dict[str, Any]) -> Iterator[None]:
    """A span of the kernel's own work, under the cell that opens it."""
    if _recorder is None:
        yield
        return
    span_id, parent = _recorder.begin()
    error: str | None = None
    try:
        yield
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        _recorder.end(span_id, parent, name, attributes, error)
