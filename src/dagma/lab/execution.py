"""Running the planned batches: in this process, or forked from the warm fork server.

Each batch is one Dagster run, executed in a worker thread: in-process (`execute_in_process`)
or, for a batch that fans out or holds a dagstermill step, as a reconstructable job
(`execute_job`, in-process or multiprocess executor). Batches start as `planning.gate` allows,
and their events are shown as they land (`dagma.lab.output`).
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console

from dagma import reaping
from dagma.dagster_fixes import remove_dagstermill_scratch
from dagma.dagster_state import staleness
from dagma.lab import output, planning
from dagma.lab.definitions import load_definitions, shared_definitions, step_definitions
from dagma.lab.forkserver import preload_modules, start_forkserver
from dagma.lab.patches import no_logging_reconfiguration, quiet_notebook_engines
from dagma.lab.planning import LabError
from dagma.nb import VALUE_METADATA
from dagma.reaping import free_slots_of_finished_runs, reap_dead_runs
from dagma.settings import Settings

# Steps at once by default; `dagma run --processes N` or DAGMA_PROCESSES change it.
DEFAULT_PROCESSES = 1
PROCESSES_ENV = "DAGMA_PROCESSES"
# Tag of each run started here, so a run made by execute_job can be found by its launcher.
LAUNCH_TAG = "dagma/launch"


@dataclass
class LabRun:
    """What a `dagma run` did. `values` holds each asset's small dict value, as its
    materialization recorded it (metadata entry `dagma.nb.VALUE_METADATA`)."""

    run_id: str | None
    success: bool = True
    materialized: list[str] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, bool] = field(default_factory=dict)
    run_ids: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0
    links: dict[str, str] = field(default_factory=dict)  # asset -> its MLflow run's URL
    engines: dict[str, str] = field(default_factory=dict)  # notebook asset -> its engine


def resolve_processes(processes: int | None = None) -> int:
    """Steps that may run at once: `processes`, else $DAGMA_PROCESSES, else DEFAULT_PROCESSES."""
    if processes is None:
        raw = os.environ.get(PROCESSES_ENV, "").strip()
        if not raw:
            return DEFAULT_PROCESSES
        try:
            processes = int(raw)
        except ValueError:
            raise LabError(f"{PROCESSES_ENV}={raw!r}: write a whole number, e.g. 2.") from None
    if processes < 1:
        raise LabError(f"processes = {processes}: at least 1 is needed.")
    return processes


def materialize(
    settings: Settings,
    *,
    selection: list[str] | None = None,
    stale_only: bool = False,
    seed: int | None = None,
    params: dict[str, dict[str, Any]] | None = None,
    console: Console | None = None,
    processes: int | None = None,
) -> LabRun:
    """Materialize `selection` (default: everything) with a progress bar.

    `params` maps a notebook to typed parameter values, passed as its run config.

    Unpartitioned assets run first; partitioned ones then run for their latest partition, each
    batch a Dagster run. With one process (the default, see `resolve_processes`) every run is
    executed in this process, one after the other. With more, a run whose assets can overlap uses
    Dagster's multiprocess executor, its steps forked from a server that has the code location
    loaded, and a partition run starts as soon as its upstream assets are materialized, while
    the first run goes on.
    """
    import dagster as dg

    from dagma.defs.core.notebook_assets import engine_of, needs_reconstructable_job

    limit = resolve_processes(processes)
    console = console or Console()
    log = settings.dagster_dir / "step-processes.log"
    reaping.own_processes()  # before any process starts, so that each one is marked
    if limit > 1 and not stale_only and (not selection or len(selection) > 1):
        # Likely to fan out: the server imports and loads while this process does the same.
        settings.ensure_dirs()
        settings.export_env()
        start_forkserver(preload_modules(), log)
    definitions = load_definitions(settings)
    graph = definitions.resolve_asset_graph()
    all_keys = sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string())
    keys = planning.select(all_keys, selection)
    instance = dg.DagsterInstance.get()
    for run_id in reap_dead_runs(instance, settings):
        console.print(f"[yellow]Run {run_id[:8]} was marked failed: its process is gone.[/yellow]")
    for run_id in free_slots_of_finished_runs(instance):
        console.print(f"[yellow]Freed the pool slots run {run_id[:8]} held when it ended.[/yellow]")
    partitions = planning.latest_partitions(graph, keys)
    if stale_only:
        stale = planning.stale_keys(keys, staleness(instance, graph, keys, partitions))
        keys = planning.and_downstream(graph, keys, stale)
        if not keys:
            return LabRun(run_id=None)

    job = definitions.resolve_implicit_global_asset_job_def()
    runs = [
        RunningBatch(
            plan,
            # dagstermill's kernel rebuilds its step from a reconstructable job, never in-process.
            reconstructable=plan.fan_out
            or any(needs_reconstructable_job(job.asset_layer.get(k).assets_def) for k in plan.keys),
        )
        for plan in planning.batches(graph, keys, partitions, limit)
    ]
    if any(r.reconstructable for r in runs):
        shared_definitions(settings, loaded=definitions)
    if any(r.plan.fan_out for r in runs):
        start_forkserver(preload_modules(), log)
    config = _run_config(job, keys, seed, params)
    no_logging_reconfiguration()
    quiet_notebook_engines()
    runner = _Runner(definitions, instance, config, limit)
    _orchestrate(runner, runs, limit, console, settings)

    total = LabRun(run_id=None, seconds=runner.seconds)
    for batch in runs:
        if batch.outcome is None:
            continue
        run = batch.outcome
        total.run_id = total.run_id or run.run_id
        total.run_ids.append(run.run_id or "")
        total.materialized += run.materialized
        total.values.update(run.values)
        total.checks.update(run.checks)
        total.links.update(run.links)
        if not run.success and total.success:
            total.success, total.error = False, run.error
    for name in total.materialized:
        engine = engine_of(graph.get(dg.AssetKey.from_user_string(name)).assets_def)
        if engine is not None:
            total.engines[name] = engine
    remove_dagstermill_scratch(settings.scratch_dir, filter(None, total.run_ids))
    return total


@dataclass
class RunningBatch:
    """A planned batch as it runs: its Dagster run, its thread and what it showed so far."""

    plan: planning.Batch
    reconstructable: bool = False  # executed from the job's module, not from this process's defs
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    run_id: str | None = None
    thread: threading.Thread | None = None
    outcome: LabRun | None = None
    skipped: bool = False
    cursor: str | None = None
    announced: bool = False
    seen: list[str] = field(default_factory=list)
    running: set[str] = field(default_factory=set)
    blocked: dict[str, tuple[str, float]] = field(default_factory=dict)  # step -> (pool, said at)
    task: Any = None

    @property
    def keys(self) -> list[Any]:
        return self.plan.keys

    @property
    def partition(self) -> str | None:
        return self.plan.partition

    @property
    def started(self) -> bool:
        return self.thread is not None

    @property
    def finished(self) -> bool:
        return self.skipped or (self.thread is not None and not self.thread.is_alive())

    @property
    def failed(self) -> bool:
        return self.outcome is not None and not self.outcome.success

    @property
    def made(self) -> set[str]:
        done = self.outcome.materialized if self.outcome is not None else []
        return {*self.seen, *done}


def _run_config(
    job: Any, keys: list[Any], seed: int | None, params: dict[str, dict[str, Any]] | None
) -> dict[str, Any]:
    # Dagster's DEBUG event lines would drown the progress bar; failures still print.
    run_config: dict[str, Any] = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    ops: dict[str, Any] = {}
    for op in {job.asset_layer.get(key).assets_def.op for key in keys}:
        fields = getattr(op.config_schema.config_type, "fields", {}) or {}
        values = dict((params or {}).get(op.name, {}))
        if seed is not None and "seed" in fields:
            values.setdefault("seed", seed)
        if values:
            ops[op.name] = {"config": values}
    if ops:
        run_config["ops"] = ops
    return run_config


class _Runner:
    """Executes a batch as a Dagster run on the instance, in a worker thread."""

    def __init__(
        self, definitions: Any, instance: Any, run_config: dict[str, Any], limit: int
    ) -> None:
        self.instance, self.run_config = instance, run_config
        self.job = definitions.resolve_implicit_global_asset_job_def()
        self.limit = limit
        self.first_start: float | None = None
        self.last_end: float | None = None

    @property
    def seconds(self) -> float:
        if self.first_start is None or self.last_end is None:
            return 0.0
        return self.last_end - self.first_start

    def start(self, batch: RunningBatch) -> None:
        def work() -> None:
            started = time.perf_counter()
            self.first_start = self.first_start or started
            try:
                if batch.reconstructable:
                    batch.outcome = self._reconstructed(batch)
                else:
                    batch.outcome = self._in_process(batch)
            except Exception as exc:  # shown to the user, never swallowed
                batch.outcome = LabRun(run_id=batch.run_id, success=False, error=repr(exc))
            finally:
                self.last_end = time.perf_counter()
                if batch.outcome is not None:
                    batch.outcome.seconds = self.last_end - started

        if not batch.reconstructable:
            batch.run_id = str(uuid.uuid4())  # known up front; execute_job makes its own
        batch.thread = threading.Thread(target=work, name=f"dagma-run-{batch.token}", daemon=True)
        batch.thread.start()

    def _tags(self, batch: RunningBatch) -> dict[str, str]:
        from dagma.defs.core.notebook_assets import run_max_runtime

        steps = [self.job.asset_layer.get(k).assets_def for k in batch.keys]
        return {LAUNCH_TAG: batch.token, **reaping.own_processes(), **run_max_runtime(steps)}

    def _in_process(self, batch: RunningBatch) -> LabRun:
        result = self.job.execute_in_process(
            instance=self.instance,
            run_id=batch.run_id,
            asset_selection=batch.keys,
            partition_key=batch.partition,
            run_config=self.run_config,
            raise_on_error=False,
            tags=self._tags(batch),
        )
        return _collect(result)

    def _reconstructed(self, batch: RunningBatch) -> LabRun:
        """The batch as a reconstructable job: in step processes when it fans out, else here."""
        import dagster as dg
        from dagster._core.definitions.reconstruct import (
            ReconstructableJob,
            ReconstructableRepository,
        )

        # Dagster keeps the last job it reconstructed: drop it, the notebooks may have changed.
        ReconstructableJob.get_definition.cache_clear()
        ReconstructableJob.get_repository_definition.cache_clear()
        recon = ReconstructableRepository.for_module(
            step_definitions.__module__, step_definitions.__name__, working_directory=os.getcwd()
        ).get_reconstructable_job(self.job.name)
        executor: dict[str, Any] = {"in_process": {}}
        if batch.plan.fan_out:
            start_method = {"forkserver": {"preload_modules": preload_modules()}}
            executor = {
                "multiprocess": {"max_concurrent": self.limit, "start_method": start_method}
            }
        run_config = {**self.run_config, "execution": {"config": executor}}
        tags = self._tags(batch)
        if batch.partition is not None:
            tags["dagster/partition"] = batch.partition
        result = dg.execute_job(
            recon,
            instance=self.instance,
            run_config=run_config,
            tags=tags,
            asset_selection=batch.keys,
            raise_on_error=False,
        )
        return _collect(result)


def _collect(result: Any) -> LabRun:
    """A finished run's materializations (with their recorded values), checks and failures."""
    run = LabRun(run_id=result.run_id, success=result.success)
    for event in result.get_asset_materialization_events():
        key = event.asset_key.to_user_string()
        run.materialized.append(key)
        metadata = event.materialization.metadata
        link = metadata.get("mlflow_run")
        if link is not None and isinstance(getattr(link, "value", None), str):
            run.links[key] = link.value
        value = metadata.get(VALUE_METADATA)
        if value is not None and isinstance(getattr(value, "value", None), dict):
            run.values[key] = value.value
    for check in result.get_asset_check_evaluations():
        run.checks[check.check_name] = check.passed
    if not result.success:
        failures = [e for e in result.all_events if e.is_step_failure]
        run.error = (
            "; ".join(
                f"{e.step_key}: {_error_text(e.step_failure_data.error)}"
                for e in failures
                if e.step_failure_data and e.step_failure_data.error
            )
            or "the run failed"
        )
    return run


def _error_text(error: Any) -> str:
    """A failure's message, followed by its causes (e.g. what made the last retry fail)."""
    parts = [error.message.strip()]
    while error.cause is not None:
        error = error.cause
        text = error.message.strip()
        if text.split(": ", 1)[-1] not in "\n".join(parts):  # skip a cause already quoted
            parts.append(text)
    return "\n".join(parts)


def _orchestrate(
    runner: _Runner, runs: list[RunningBatch], limit: int, console: Console, settings: Settings
) -> None:
    """Start each batch when it may run and show every run's materializations as they land."""
    with output.progress_display(console) as progress:
        while True:
            for i, batch in enumerate(runs):
                if not batch.started and not batch.skipped:
                    gate = planning.gate(batch.plan, runs[:i], limit)
                    if gate == "wait":
                        continue
                    if gate == "skip":
                        batch.skipped = True
                        continue
                    runner.start(batch)
                    batch.task = progress.add_task("starting", total=len(batch.keys))
                if batch.started:
                    output.follow(runner.instance, batch, progress, settings)
            if all(b.finished for b in runs):
                for batch in runs:
                    if batch.started:
                        output.follow(runner.instance, batch, progress, settings)
                break
            alive = [b.thread for b in runs if b.thread is not None and b.thread.is_alive()]
            if alive:
                alive[0].join(timeout=0.25)
            else:
                time.sleep(0.05)
