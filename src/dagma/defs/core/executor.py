"""The lab's default executor: Dagster's own, except that a run of one step runs it in the run's
process instead of starting a step process that imports Dagster and loads the code location
again (2 to 3 s per run here).

A run of one step is already isolated in its own run worker, so the step loses nothing; runs of
several steps, and `execution: {config: {in_process: {}}}` or `multiprocess: {...}` in run
config, behave exactly as with Dagster's default executor. This applies to runs launched by the
Dagster CLI, the UI, sensors and backfills; `dagma run` picks its own executor per batch.
"""

from __future__ import annotations

from typing import Any, cast

import dagster as dg
from dagster._core.definitions.executor_definition import multi_or_in_process_executor
from dagster._core.executor.base import Executor
from dagster._core.executor.in_process import InProcessExecutor


class OneStepInProcess(Executor):
    """Dagster's multiprocess executor, with a one-step plan executed in this process."""

    def __init__(self, multiprocess: Executor) -> None:
        self.multiprocess = multiprocess
        self.in_process = InProcessExecutor(
            retries=multiprocess.retries,
            step_dependency_config=multiprocess.step_dependency_config,
        )

    @property
    def retries(self) -> Any:
        return self.multiprocess.retries

    @property
    def step_dependency_config(self) -> Any:
        return self.multiprocess.step_dependency_config

    def execute(self, plan_context: Any, execution_plan: Any) -> Any:
        one = len(execution_plan.step_keys_to_execute) == 1
        return (self.in_process if one else self.multiprocess).execute(plan_context, execution_plan)


@dg.executor(
    name="dagma_lab_executor",
    config_schema=cast(Any, multi_or_in_process_executor.config_schema),
    requirements=multi_or_in_process_executor.get_requirements,
)
def lab_executor(init_context: dg.InitExecutorContext) -> Executor:
    """`multi_or_in_process_executor`, whose multiprocess mode runs a lone step in-process."""
    creation = cast(Any, multi_or_in_process_executor.executor_creation_fn)
    chosen = creation(init_context)
    if "multiprocess" in init_context.executor_config:
        return OneStepInProcess(chosen)
    return chosen


defs = dg.Definitions(executor=lab_executor)
