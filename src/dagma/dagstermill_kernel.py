"""What the kernel of a dagstermill-engine notebook imports first, in a run only.

dagstermill refuses `yield_result` inside an asset job, and its context has no partition key
(dagster #13952). Imported by the first cell of the copy Dagma executes, this module makes
`dagstermill.yield_result` hand the value to the asset, as `ctx.output` does, and gives the
context the run's `partition_key`. Opened by hand, a notebook never imports it, so
`get_context()` and `yield_result` are dagstermill's own.
"""

from __future__ import annotations

import os
from typing import Any

import dagstermill
from dagstermill.context import DagstermillExecutionContext
from dagstermill.manager import MANAGER_FOR_NOTEBOOK_INSTANCE as _MANAGER

from dagma import nb
from dagma.notebooks.spec import DAGSTERMILL_RESULT


def yield_result(value: Any, output_name: str = DAGSTERMILL_RESULT) -> Any:
    """dagstermill's `yield_result`, for the outputs of a Dagma notebook asset."""
    if not _MANAGER.in_job:
        return value
    nb.context().output(value, name=None if output_name == DAGSTERMILL_RESULT else output_name)
    return None


def _partition_key(self: DagstermillExecutionContext) -> str | None:
    step = getattr(self, "_step_context", None)
    return step.partition_key if step is not None and step.has_partition_key else None


def bind(context_path: str) -> None:
    """Point a plain `mlflow.start_run()` at the run Dagma created for this materialization."""
    ctx = nb.context()
    os.environ["MLFLOW_TRACKING_URI"] = ctx.tracking_uri
    run_id = ctx.mlflow_run_id or ctx.wait_for_run_id()
    if run_id:
        os.environ["MLFLOW_RUN_ID"] = run_id
    os.environ[nb.CONTEXT_ENV] = context_path


dagstermill.yield_result = yield_result
DagstermillExecutionContext.partition_key = property(_partition_key)  # type: ignore[attr-defined]
