"""Run the graph and read the lab's state, for the CLI (and later the app)."""

from __future__ import annotations

import contextlib
import io
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from dagma import reaping
from dagma.dagster_fixes import remove_dagstermill_scratch
from dagma.reaping import free_slots_of_finished_runs, held_slots, reap_dead_runs
from dagma.settings import Settings, get_settings

# Steps at once by default; `dagma run --processes N` or DAGMA_PROCESSES change it.
DEFAULT_PROCESSES = 1
PROCESSES_ENV = "DAGMA_PROCESSES"
# Tag of each run started here, so a run made by execute_job can be found by its launcher.
LAUNCH_TAG = "dagma/launch"
# Imported once by the fork server before the code location, so step processes skip them.
PRELOAD: tuple[str, ...] = (
    "dagster._utils.test",
    "papermill",
    "nbconvert",
    "mlflow",
    "dagma.lib.tracking",
    "dagma.notebooks.runner",
)
# Set while the fork server starts: importing this module there loads the code location once.
_WARM_ENV = "DAGMA_FORK_SERVER_WARM"
# Environment variables the loaded code location may depend on.
_ENV_PREFIXES = ("DAGMA_", "DAGSTER_", "MLFLOW_", "QDRANT_", "OPENAI_", "OLLAMA_")


@dataclass
class LabRun:
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


def load_definitions(settings: Settings) -> Any:
    """The project's Definitions, loaded after the environment points at `settings`."""
    settings.ensure_dirs()
    settings.export_env()
    from dagma.definitions import defs
    from dagma.notebooks.spec import NotebookError

    try:
        return defs()
    except Exception as exc:
        # Dagster wraps errors raised while loading defs/; surface ours, which name the file.
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, NotebookError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise cause from None
        raise


def _stale_keys(
    instance: Any, definitions: Any, keys: list[Any], partitions: dict[Any, str]
) -> list[Any]:
    """Keys Dagster reports as stale or missing (code version, upstream data or never run).

    A partitioned key is judged by the partition in `partitions` (its latest).
    """
    from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView, TemporalContext
    from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
    from dagster._time import get_current_datetime

    graph = definitions.resolve_asset_graph()
    view = AssetGraphView(
        temporal_context=TemporalContext(effective_dt=get_current_datetime(), last_event_id=None),
        instance=instance,
        asset_graph=graph,
    )
    resolver = CachingStaleStatusResolver(instance, graph, loading_context=view)
    return [k for k in keys if resolver.get_status(k, partitions.get(k)) != StaleStatus.FRESH]


def _latest_partitions(graph: Any, keys: list[Any]) -> dict[Any, str]:
    latest = {}
    for key in keys:
        partitions_def = graph.get(key).partitions_def
        if partitions_def is not None:
            last = partitions_def.get_last_partition_key()
            if last is not None:
                latest[key] = last
    return latest


def _and_downstream(graph: Any, candidates: list[Any], stale: list[Any]) -> list[Any]:
    """`stale` plus the candidates downstream of it, whose inputs the run is about to change."""
    chosen = set(stale)
    grew = True
    while grew:
        grew = False
        for key in candidates:
            if key not in chosen and chosen & set(graph.get(key).parent_keys):
                chosen.add(key)
                grew = True
    return [k for k in candidates if k in chosen]


def _groups(
    graph: Any, keys: list[Any], partitions: dict[Any, str]
) -> list[tuple[list[Any], str | None]]:
    """One run's keys per partition (unpartitioned first), upstream batches first."""
    groups: list[tuple[list[Any], str | None]] = []
    plain = [k for k in keys if graph.get(k).partitions_def is None]
    if plain:
        groups.append((plain, None))
    # Only the partitions of `keys`: `--stale` may leave a partitioned asset out.
    for last in sorted({partitions[k] for k in keys if k in partitions}):
        groups.append(([k for k in keys if partitions.get(k) == last], last))
    return _upstream_first(graph, groups)


def _upstream_first(graph: Any, groups: list[Any]) -> list[Any]:
    """Order batches so that one whose assets read another's comes after it.

    Partition keys do not sort by dependency: an hourly upstream ("2026-11-30-01:00") sorts
    after its daily downstream ("2026-11-30").
    """
    from graphlib import CycleError, TopologicalSorter

    where = {key: i for i, (keys, _) in enumerate(groups) for key in keys}
    order: TopologicalSorter[int] = TopologicalSorter()
    for i, (keys, _) in enumerate(groups):
        order.add(
            i, *{where[p] for k in keys for p in graph.get(k).parent_keys if p in where} - {i}
        )
    try:
        return [groups[i] for i in order.static_order()]
    except CycleError:
        return groups


def resolve_processes(processes: int | None = None) -> int:
    """Steps that may run at once: `processes`, else $DAGMA_PROCESSES, else DEFAULT_PROCESSES."""
    if processes is None:
        raw = os.environ.get(PROCESSES_ENV, "").strip()
        if not raw:
            return DEFAULT_PROCESSES
        try:
            processes = int(raw)
        except ValueError:
            raise SystemExit(f"{PROCESSES_ENV}={raw!r}: write a whole number, e.g. 2.") from None
    if processes < 1:
        raise SystemExit(f"processes = {processes}: at least 1 is needed.")
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

    limit = resolve_processes(processes)
    console = console or Console()
    log = settings.dagster_dir / "step-processes.log"
    reaping.own_processes()  # before any process starts, so that each one is marked
    if limit > 1 and not stale_only and (not selection or len(selection) > 1):
        # Likely to fan out: the server imports and loads while this process does the same.
        settings.ensure_dirs()
        settings.export_env()
        _start_forkserver(_preload_modules(), log)
    definitions = load_definitions(settings)
    graph = definitions.resolve_asset_graph()
    all_keys = sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string())
    keys = all_keys
    if selection:
        known = {k.to_user_string(): k for k in all_keys}
        unknown = [s for s in selection if s not in known]
        if unknown:
            raise SystemExit(
                f"Unknown asset(s): {', '.join(unknown)}. Known: {', '.join(sorted(known))}."
            )
        keys = [known[s] for s in selection]
    instance = dg.DagsterInstance.get()
    for run_id in reap_dead_runs(instance, settings):
        console.print(f"[yellow]Run {run_id[:8]} was marked failed: its process is gone.[/yellow]")
    for run_id in free_slots_of_finished_runs(instance):
        console.print(f"[yellow]Freed the pool slots run {run_id[:8]} held when it ended.[/yellow]")
    partitions = _latest_partitions(graph, keys)
    if stale_only:
        keys = _and_downstream(graph, keys, _stale_keys(instance, definitions, keys, partitions))
        if not keys:
            return LabRun(run_id=None)

    job = definitions.resolve_implicit_global_asset_job_def()
    batches: list[_Batch] = []
    for batch_keys, batch_partition in _groups(graph, keys, partitions):
        earlier = {k for b in batches for k in b.keys}
        needs = {p for k in batch_keys for p in graph.get(k).parent_keys if p in earlier}
        batches.append(_Batch(batch_keys, batch_partition, needs, fan_out=False))
    from dagma.notebooks.assets import needs_reconstructable_job

    for batch in batches:
        # Steps run in this process only when nothing else can run beside them: a notebook
        # step changes the working directory, which step processes started meanwhile inherit.
        batch.fan_out = limit > 1 and (len(batches) > 1 or _can_overlap(graph, batch.keys))
        # dagstermill's kernel rebuilds its step from a reconstructable job, never in-process.
        batch.reconstructable = batch.fan_out or any(
            needs_reconstructable_job(job.asset_layer.get(k).assets_def) for k in batch.keys
        )
    if any(b.reconstructable for b in batches):
        shared_definitions(settings, loaded=definitions)
    if any(b.fan_out for b in batches):
        _start_forkserver(_preload_modules(), log)
    config = _run_config(job, keys, seed, params)
    _no_logging_reconfiguration()
    _quiet_notebook_engines()
    runner = _Runner(definitions, instance, config, limit)
    _orchestrate(runner, batches, limit, console, settings)
    for batch in batches:
        runner.load_values(batch)

    from dagma.notebooks.assets import engine_of

    total = LabRun(run_id=None, seconds=runner.seconds)
    for batch in batches:
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
class _Batch:
    """One Dagster run of `keys` (for `partition`), started once `needs` are materialized."""

    keys: list[Any]
    partition: str | None
    needs: set[Any]
    fan_out: bool  # multiprocess executor; else in this process
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
    def started(self) -> bool:
        return self.thread is not None

    @property
    def finished(self) -> bool:
        return self.skipped or (self.thread is not None and not self.thread.is_alive())


def _no_logging_reconfiguration() -> None:
    """Stop Dagster from calling `logging.config.dictConfig` at each run's start when the
    instance configures no Python log handlers.

    dictConfig holds logging's module lock while it closes every handler, and a run going on in
    another thread holds a handler's lock while it logs, so two runs of one process deadlock
    (CPython #96727; seen here as a hung `dagma run -j 2`). It would also close the other
    run's handlers. A `python_logs: dagster_handler_config:` in dagster.yaml still applies.
    """
    from dagster._core.instance.methods.event_methods import EventMethods

    original = EventMethods.get_yaml_python_handlers
    if getattr(original, "_dagma_guard", False):
        return

    def get_yaml_python_handlers(self: Any) -> Any:
        if not self._instance.get_python_log_dagster_handler_config():
            return []
        return original(self)

    get_yaml_python_handlers._dagma_guard = True  # type: ignore[attr-defined]
    EventMethods.get_yaml_python_handlers = get_yaml_python_handlers  # type: ignore[method-assign]


def _quiet_notebook_engines() -> None:
    """Keep dagstermill's papermill bar and its kernel's stderr off the lab's progress display.

    dagstermill calls papermill with its default tqdm bar and logs the kernel's output as
    papermill warnings; the executed notebook keeps all of it, and failures still reach the
    summary. Only calls for dagstermill's engine change.
    """
    import functools
    import logging
    import warnings

    import dagster as dg
    import papermill

    logging.getLogger("papermill").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=dg.BetaWarning)  # dagstermill's, at each step
    execute = papermill.execute_notebook
    if getattr(execute, "_dagma_quiet", False):
        return

    @functools.wraps(execute)
    def quiet(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("engine_name") == "dagstermill":
            kwargs.setdefault("progress_bar", False)
        return execute(*args, **kwargs)

    quiet._dagma_quiet = True  # type: ignore[attr-defined]
    papermill.execute_notebook = quiet


def _launch_tags(token: str) -> dict[str, str]:
    return {LAUNCH_TAG: token, **reaping.own_processes()}


def _can_overlap(graph: Any, keys: list[Any]) -> bool:
    """Whether two of `keys` are independent, so that their steps could run at once."""
    chosen = set(keys)
    ancestors: dict[Any, set[Any]] = {}

    def up(key: Any) -> set[Any]:
        if key not in ancestors:
            ancestors[key] = set()
            for parent in graph.get(key).parent_keys:
                if parent in chosen:
                    ancestors[key] |= {parent} | up(parent)
        return ancestors[key]

    return any(a not in up(b) and b not in up(a) for i, a in enumerate(keys) for b in keys[i + 1 :])


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
        self.definitions, self.instance, self.run_config = definitions, instance, run_config
        self.job = definitions.resolve_implicit_global_asset_job_def()
        self.limit = limit
        self.first_start: float | None = None
        self.last_end: float | None = None

    @property
    def seconds(self) -> float:
        if self.first_start is None or self.last_end is None:
            return 0.0
        return self.last_end - self.first_start

    def start(self, batch: _Batch) -> None:
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

    def _tags(self, batch: _Batch) -> dict[str, str]:
        from dagma.notebooks.assets import run_max_runtime

        steps = [self.job.asset_layer.get(k).assets_def for k in batch.keys]
        return {**_launch_tags(batch.token), **run_max_runtime(steps)}

    def _in_process(self, batch: _Batch) -> LabRun:
        result = self.job.execute_in_process(
            instance=self.instance,
            run_id=batch.run_id,
            asset_selection=batch.keys,
            partition_key=batch.partition,
            run_config=self.run_config,
            raise_on_error=False,
            tags=self._tags(batch),
        )
        return _collect(result, result.asset_value)

    def _reconstructed(self, batch: _Batch) -> LabRun:
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
            __name__, step_definitions.__name__, working_directory=os.getcwd()
        ).get_reconstructable_job(self.job.name)
        executor: dict[str, Any] = {"in_process": {}}
        if batch.fan_out:
            start_method = {"forkserver": {"preload_modules": _preload_modules()}}
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
        return _collect(result, None)  # the values stayed in the step processes: see load_values

    def load_values(self, batch: _Batch) -> None:
        """Read back, through the IO manager, what a reconstructed run's steps returned."""
        run = batch.outcome
        if not batch.reconstructable or run is None or not run.materialized:
            return
        # Dagster's loader logs each load at DEBUG on stderr, whatever the run config says.
        with (
            contextlib.redirect_stderr(io.StringIO()),
            self.definitions.get_asset_value_loader(instance=self.instance) as loader,
        ):
            for key in run.materialized:
                try:
                    run.values[key] = loader.load_asset_value(key, partition_key=batch.partition)
                except Exception:  # nosec B112: a value that cannot be loaded is optional here
                    continue


def _collect(result: Any, value: Any | None) -> LabRun:
    """A finished run's materializations, checks, in-memory values and failures."""
    run = LabRun(run_id=result.run_id, success=result.success)
    for event in result.get_asset_materialization_events():
        key = event.asset_key.to_user_string()
        run.materialized.append(key)
        link = event.materialization.metadata.get("mlflow_run")
        if link is not None and isinstance(getattr(link, "value", None), str):
            run.links[key] = link.value
    for check in result.get_asset_check_evaluations():
        run.checks[check.check_name] = check.passed
    if value is not None:
        for key in run.materialized:
            try:
                run.values[key] = value(key)
            except Exception:  # nosec B112: a value not kept in memory is optional here
                continue
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
    runner: _Runner, batches: list[_Batch], limit: int, console: Console, settings: Settings
) -> None:
    """Start each batch when it may run and show every run's materializations as they land."""
    import dagster as dg

    watched = {
        dg.DagsterEventType.ASSET_MATERIALIZATION,
        dg.DagsterEventType.STEP_START,
        dg.DagsterEventType.STEP_SUCCESS,
        dg.DagsterEventType.STEP_FAILURE,
        dg.DagsterEventType.ENGINE_EVENT,  # among them: a step blocked by its pool's limit
    }
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        while True:
            for i, batch in enumerate(batches):
                if not batch.started and not batch.skipped:
                    gate = _gate(batch, batches[:i], limit)
                    if gate == "wait":
                        continue
                    if gate == "skip":
                        batch.skipped = True
                        continue
                    runner.start(batch)
                    batch.task = progress.add_task("starting", total=len(batch.keys))
                if batch.started:
                    _poll(runner.instance, batch, watched, progress, settings)
            if all(b.finished for b in batches):
                for batch in batches:
                    if batch.started:
                        _poll(runner.instance, batch, watched, progress, settings)
                break
            alive = [b.thread for b in batches if b.thread is not None and b.thread.is_alive()]
            if alive:
                alive[0].join(timeout=0.25)
            else:
                time.sleep(0.05)


def _gate(batch: _Batch, earlier: list[_Batch], limit: int) -> str:
    """Whether a batch not started yet may "go", must "wait" or is to "skip".

    With one process a run waits for the one before it and is skipped after a failure. With
    more, it waits until its upstream assets are materialized and fewer than `limit` steps run,
    and is skipped when a finished run did not materialize one of its upstream assets.
    """
    if limit == 1:
        if any(b.skipped or (b.outcome is not None and not b.outcome.success) for b in earlier):
            return "skip"
        return "wait" if earlier and not earlier[-1].finished else "go"
    made = {key for b in earlier for key in b.seen}
    made |= {key for b in earlier if b.outcome is not None for key in b.outcome.materialized}
    missing = {k for k in batch.needs if k.to_user_string() not in made}
    if missing:
        producers = [b for b in earlier if missing & set(b.keys)]
        return "skip" if all(b.finished for b in producers) else "wait"
    in_flight = sum(len(b.running) for b in earlier if b.started and not b.finished)
    return "wait" if in_flight >= limit else "go"


# How often a step that waits for a pool slot says which run holds it.
WAIT_REPORT_SECONDS = 5.0


def _say_who_blocks(instance: Any, batch: _Batch, progress: Progress) -> None:
    """Every few seconds, for each step waiting on its pool: the pool and the runs holding it."""
    now = time.monotonic()
    for step, (pool, said) in list(batch.blocked.items()):
        if now - said < WAIT_REPORT_SECONDS:
            continue
        claimed = instance.event_log_storage.get_concurrency_info(pool).claimed_slots
        holders = [
            f"run {c.run_id[:8]} ({c.step_key})" for c in claimed if c.run_id != batch.run_id
        ]
        who = ", ".join(holders) or "a run that is ending"
        progress.console.print(f"  [yellow]…[/yellow] {step} waits for pool {pool}, held by {who}")
        batch.blocked[step] = (pool, now)


def _poll(
    instance: Any, batch: _Batch, watched: set[Any], progress: Progress, settings: Settings
) -> None:
    """New events of the batch's run: the run's link once, ticks, the steps now running."""
    import dagster as dg

    if batch.run_id is None:
        ids = instance.get_run_ids(dg.RunsFilter(tags={LAUNCH_TAG: batch.token}), limit=1)
        if not ids:
            return
        batch.run_id = ids[0]
    if not batch.announced:
        batch.announced = True
        label = f" (partition {batch.partition})" if batch.partition else ""
        progress.console.print(
            f"Run [bold]{batch.run_id[:8]}[/bold]{label}: "
            f"{settings.dagster_ui_url}/runs/{batch.run_id}"
        )
    while True:
        page = instance.get_records_for_run(batch.run_id, cursor=batch.cursor, of_type=watched)
        for record in page.records:
            entry = record.event_log_entry
            kind = entry.dagster_event.event_type
            if kind == dg.DagsterEventType.STEP_START:
                batch.running.add(entry.step_key)
                batch.blocked.pop(entry.step_key, None)
            elif kind in (dg.DagsterEventType.STEP_SUCCESS, dg.DagsterEventType.STEP_FAILURE):
                batch.running.discard(entry.step_key)
                batch.blocked.pop(entry.step_key, None)
            elif kind == dg.DagsterEventType.ENGINE_EVENT:
                data = entry.dagster_event.engine_event_data
                pool = data.metadata.get("pool") if data is not None else None
                if pool is not None and entry.step_key and entry.step_key not in batch.blocked:
                    batch.blocked[entry.step_key] = (str(pool.value), 0.0)
            else:
                key = entry.dagster_event.asset_key.to_user_string()
                if key not in batch.seen:
                    batch.seen.append(key)
                    progress.console.print(f"  [green]✓[/green] {key}")
        batch.cursor = page.cursor or batch.cursor
        if not page.has_more:
            break
    _say_who_blocks(instance, batch, progress)
    label = f"partition {batch.partition}" if batch.partition else "materializing"
    progress.update(
        batch.task, completed=len(batch.seen), description=f"{label} ({len(batch.seen)})"
    )


_DEFINITIONS: dict[tuple[Any, ...], Any] = {}


def _definitions_key(settings: Settings) -> tuple[Any, ...]:
    """What the loaded code location depends on besides Python code: environment, notebooks."""
    notebooks = []
    for path in sorted(settings.notebooks_dir.rglob("*.ipynb")):
        stat = path.stat()
        notebooks.append((str(path), stat.st_mtime_ns, stat.st_size))
    team = settings.dagma_defs_dir
    # The team's definitions and the notebooks beside them (their code versions).
    team_files = [*team.rglob("*.py"), *team.rglob("*.ipynb")] if team and team.is_dir() else []
    for path in sorted(team_files):
        notebooks.append((str(path), path.stat().st_mtime_ns, path.stat().st_size))
    dotenv = Path(".env")
    env_file = dotenv.stat().st_mtime_ns if dotenv.is_file() else None
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES))
    return (os.getcwd(), env_file, tuple(env), tuple(notebooks))


def shared_definitions(settings: Settings | None = None, loaded: Any = None) -> Any:
    """The project's Definitions, loaded once per process while notebooks and environment stay.

    `loaded` (just loaded by the caller) is kept instead of loading again.
    """
    settings = settings or get_settings()
    settings.ensure_dirs()
    settings.export_env()
    key = _definitions_key(settings)
    if loaded is not None or key not in _DEFINITIONS:
        _DEFINITIONS.clear()
        _DEFINITIONS[key] = loaded if loaded is not None else load_definitions(settings)
    return _DEFINITIONS[key]


def step_definitions() -> Any:
    """What step processes reconstruct their job from: `shared_definitions`, as loading the code
    location every time would cost each step seconds, twice (Dagster reconstructs it twice)."""
    return shared_definitions()


def _preload_modules() -> list[str]:
    """What the fork server imports once, so that each step's process starts with it."""
    import dagma

    root = Path(dagma.__file__).resolve().parent
    defs = []
    for path in sorted((root / "defs").rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        defs.append(".".join(("dagma", *parts)))
    return [
        "dagster._core.executor.multiprocess",
        *PRELOAD,
        "dagma.definitions",
        *defs,
        "dagma.lab",  # last: loads the code location there (see _warm_fork_server)
    ]


_FORKSERVER_ENV: list[str] = []


def _start_forkserver(preload: list[str], log: Path) -> None:
    """Start the fork server now, importing `preload` while this process prepares the run.

    Step processes inherit the server's environment, not ours: a server started under another
    environment (another DAGMA_HOME, say) is stopped and started again. They also inherit its
    stderr, which goes to `log`: each step process would otherwise print a DEBUG line through
    the progress bar. Failures still reach the run's events and the summary.
    """
    import hashlib
    import multiprocessing
    from multiprocessing import forkserver

    env = sorted((k, v) for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST")
    key = hashlib.sha256(repr((env, preload, str(log))).encode()).hexdigest()
    server: Any = getattr(forkserver, "_forkserver", None)
    running = getattr(server, "_forkserver_pid", None) is not None
    if running and key in _FORKSERVER_ENV:
        return
    if running:
        server._stop()
    multiprocessing.get_context("forkserver").set_forkserver_preload(preload)
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    target = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.environ[_WARM_ENV] = "1"
    try:
        os.dup2(target, 2)
        forkserver.ensure_running()
    finally:
        os.environ.pop(_WARM_ENV, None)
        os.dup2(saved, 2)
        os.close(saved)
        os.close(target)
    _FORKSERVER_ENV[:] = [key]


def summary(run: LabRun, settings: Settings) -> dict[str, Any]:
    """The run as plain data: what was materialized and the demo's headline values."""
    return {
        "run_id": run.run_id,
        "run_ids": run.run_ids,
        "success": run.success,
        "seconds": round(run.seconds, 2),
        "materialized": run.materialized,
        "values": {k: v for k, v in run.values.items() if isinstance(v, dict)},
        "checks": run.checks,
        "engines": run.engines,
        "error": run.error,
        "home": str(settings.home),
        "links": {
            "dagster": f"{settings.dagster_ui_url}/runs/{run.run_id}",
            "mlflow": settings.mlflow_ui,
        },
    }


def print_summary(run: LabRun, settings: Settings, console: Console) -> None:
    """What the run made, with links and one RAG answer."""
    status = "[green]succeeded[/green]" if run.success else "[red]failed[/red]"
    runs = ", ".join(run.run_ids or [str(run.run_id)])
    console.print(f"\nRun {runs} {status} in {run.seconds:.1f} s.")
    console.print(f"Assets materialized ({len(run.materialized)}): {', '.join(run.materialized)}")
    if run.engines:
        engines = ", ".join(f"{name} ({engine})" for name, engine in sorted(run.engines.items()))
        console.print(f"Notebooks and their engines: {engines}")
    model = run.values.get("wine_model")
    if isinstance(model, dict):
        from dagma.lib import tracking

        metrics = model.get("metrics", {})
        console.print(
            f"MLflow run {model.get('mlflow_run_id')}: accuracy {metrics.get('accuracy', 0):.4f}, "
            f"model {model.get('registered_model')} v{model.get('model_version')}"
        )
        url = run.links.get("wine_model")
        if url is None and model.get("mlflow_run_id"):
            # Recorded on the materialization; asking MLflow means importing it, seconds.
            exp = _experiment_id(settings)
            url = tracking.run_url(settings.mlflow_ui, exp, model["mlflow_run_id"]) if exp else None
        if url:
            console.print(f"  {url}")
    clusters = run.values.get("wine_clusters")
    if isinstance(clusters, dict) and "metrics" in clusters:
        m = clusters["metrics"]
        console.print(
            f"KMeans ({run.engines.get('wine_clusters', 'notebook')}): "
            f"{clusters['params']['n_clusters']} clusters of sizes {clusters['sizes']}, "
            f"silhouette {m['silhouette']:.3f}, adjusted Rand {m.get('adjusted_rand', 0):.3f}"
        )
        if run.links.get("wine_clusters"):
            console.print(f"  {run.links['wine_clusters']}")
    vectors = run.values.get("doc_vectors")
    if isinstance(vectors, dict):
        console.print(
            f"Collection {vectors['collection']} v{vectors['version']}: {vectors['points']} points "
            f"({vectors['embedder']}, dim {vectors['dim']})"
        )
    evaluation = run.values.get("rag_eval")
    if isinstance(evaluation, dict):
        m = evaluation["metrics"]
        console.print(
            f"RAG retrieval: hit@1 {m['hit_at_1']:.2f}, hit@5 {m['hit_at_5']:.2f}, MRR {m['mrr']:.2f}"
        )
        sample = evaluation["sample"]
        console.print(f"\n[bold]Q:[/bold] {sample['question']}\n[bold]A:[/bold] {sample['text']}")
        for i, src in enumerate(sample["sources"], 1):
            console.print(f"  [{i}] {src['source']} (score {src['score']:.3f})")
    for name, passed in run.checks.items():
        console.print(
            f"Check {name}: " + ("[green]passed[/green]" if passed else "[red]failed[/red]")
        )
    if run.error:
        console.print(run.error, style="red", markup=False)
    console.print(f"\nDagster UI: {settings.dagster_ui_url}  (run `make dagster`)")
    console.print(f"MLflow UI:  {settings.mlflow_ui}  (run `make mlflow`)")


def _experiment_id(settings: Settings) -> str | None:
    try:
        from dagma.lib import tracking

        return tracking.setup_experiment(
            settings.tracking_uri, settings.dagma_experiment, settings.artifact_root
        )
    except Exception:
        return None


def status(settings: Settings) -> dict[str, Any]:
    """The lab's state as plain data: assets, MLflow runs and vector collections."""
    import dagster as dg

    from dagma.notebooks.assets import engine_of

    definitions = load_definitions(settings)
    graph = definitions.resolve_asset_graph()
    instance = dg.DagsterInstance.get()
    reaped = reap_dead_runs(instance, settings)
    freed = free_slots_of_finished_runs(instance)
    keys = sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string())
    stale = set(_stale_keys(instance, definitions, keys, _latest_partitions(graph, keys)))
    problems: list[str] = [
        f"Dagster run {r} was marked failed: the process that ran it is gone" for r in reaped
    ]
    problems += [f"Dagster run {r} had ended holding pool slots: they were freed" for r in freed]
    assets = []
    for key in keys:
        event = instance.get_latest_materialization_event(key)
        assets.append(
            {
                "key": key.to_user_string(),
                "group": graph.get(key).group_name,
                "engine": engine_of(graph.get(key).assets_def),
                "last_materialized": (
                    time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event.timestamp))
                    if event
                    else None
                ),
                "run_id": event.run_id if event else None,
                "stale": key in stale,
            }
        )
    report: dict[str, Any] = {
        "home": str(settings.home),
        "assets": assets,
        "mlflow": {"tracking_uri": settings.tracking_uri, "runs": []},
        "vectors": {
            "kind": "server" if settings.qdrant_url else "embedded",
            "location": settings.vector_location,
            "collections": [],
        },
        "links": {"dagster": settings.dagster_ui_url, "mlflow": settings.mlflow_ui},
        "problems": problems,
        "reaped": reaped,
        "pools": held_slots(instance),
    }
    try:
        from dagma.lib import tracking

        exp = tracking.setup_experiment(
            settings.tracking_uri, settings.dagma_experiment, settings.artifact_root
        )
        runs = tracking.client(settings.tracking_uri).search_runs(
            [exp], max_results=10, order_by=["attributes.start_time DESC"]
        )
        report["mlflow"]["runs"] = [
            {
                "run_id": r.info.run_id,
                "name": r.info.run_name,
                "status": r.info.status,
                "metrics": dict(r.data.metrics),
                "url": tracking.run_url(settings.mlflow_ui, exp, r.info.run_id),
            }
            for r in runs
        ]
    except Exception as exc:
        problems.append(f"MLflow: {exc}")
    try:
        from dagma.lib.vectors import open_store

        with open_store(
            url=settings.qdrant_url,
            api_key=settings.qdrant_api_key.get_secret_value() if settings.qdrant_api_key else None,
            root=settings.qdrant_path,
        ) as store:
            report["vectors"]["collections"] = [
                {"collection": c.collection, "version": c.version, "points": c.points, "dim": c.dim}
                for c in store.collections()
            ]
    except Exception as exc:
        problems.append(f"Vector store: {exc}")
    return report


def _warm_fork_server() -> None:
    """In the fork server: what every step process would otherwise build for itself."""
    try:
        step_definitions()
        from dagma.notebooks.runner import warm_html_exporter

        warm_html_exporter()
    except Exception:  # nosec B110: each step process then loads what it needs itself
        pass


if os.environ.pop(_WARM_ENV, None) == "1":
    _warm_fork_server()
