"""Run the graph and read the lab's state, for the CLI (and later the app)."""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from dagma.settings import Settings


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


def materialize(
    settings: Settings,
    *,
    selection: list[str] | None = None,
    stale_only: bool = False,
    seed: int | None = None,
    params: dict[str, dict[str, Any]] | None = None,
    console: Console | None = None,
) -> LabRun:
    """Materialize `selection` (default: everything) in-process, with a progress bar.

    `params` maps a notebook to typed parameter values, passed as its run config.

    Unpartitioned assets run first; partitioned ones then run for their latest partition.
    """
    import dagster as dg

    console = console or Console()
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
    partitions = _latest_partitions(graph, keys)
    if stale_only:
        keys = _stale_keys(instance, definitions, keys, partitions)
        if not keys:
            return LabRun(run_id=None)

    job = definitions.resolve_implicit_global_asset_job_def()
    batches: list[tuple[list[Any], str | None]] = []
    plain = [k for k in keys if graph.get(k).partitions_def is None]
    if plain:
        batches.append((plain, None))
    for partition in sorted(set(partitions.values())):
        batches.append(([k for k in keys if partitions.get(k) == partition], partition))

    total = LabRun(run_id=None)
    for batch, batch_partition in batches:
        run = _execute(job, instance, batch, batch_partition, seed, params, console, settings)
        total.run_id = total.run_id or run.run_id
        total.run_ids.append(run.run_id or "")
        total.seconds += run.seconds
        total.materialized += run.materialized
        total.values.update(run.values)
        total.checks.update(run.checks)
        if not run.success:
            total.success, total.error = False, run.error
            break
    return total


def _execute(
    job: Any,
    instance: Any,
    keys: list[Any],
    partition: str | None,
    seed: int | None,
    params: dict[str, dict[str, Any]] | None,
    console: Console,
    settings: Settings,
) -> LabRun:
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
    run_id = str(uuid.uuid4())
    outcome: dict[str, Any] = {}

    def _run() -> None:
        try:
            outcome["result"] = job.execute_in_process(
                instance=instance,
                run_id=run_id,
                asset_selection=keys,
                partition_key=partition,
                run_config=run_config,
                raise_on_error=False,
            )
        except Exception as exc:  # shown to the user below, never swallowed
            outcome["error"] = exc

    started = time.perf_counter()
    worker = threading.Thread(target=_run, daemon=True)
    worker.start()
    _follow(instance, run_id, len(keys), worker, console, settings, partition)
    result = outcome.get("result")
    run = LabRun(run_id=run_id, seconds=time.perf_counter() - started)
    if result is None:
        run.success, run.error = False, repr(outcome.get("error"))
        return run
    run.success = result.success
    for event in result.get_asset_materialization_events():
        key = event.asset_key.to_user_string()
        run.materialized.append(key)
    for check in result.get_asset_check_evaluations():
        run.checks[check.check_name] = check.passed
    for key in run.materialized:
        try:
            run.values[key] = result.asset_value(key)
        except Exception:  # nosec B112: a value not kept in memory is optional here
            continue
    if not result.success:
        failures = [e for e in result.all_events if e.is_step_failure]
        run.error = (
            "; ".join(
                f"{e.step_key}: {e.step_failure_data.error.message.strip()}"
                for e in failures
                if e.step_failure_data and e.step_failure_data.error
            )
            or "the run failed"
        )
    return run


def _follow(
    instance: Any,
    run_id: str,
    total: int,
    worker: threading.Thread,
    console: Console,
    settings: Settings,
    partition: str | None = None,
) -> None:
    """A progress bar fed by the run's materialization events."""
    import dagster as dg

    label = f" (partition {partition})" if partition else ""
    console.print(f"Run [bold]{run_id[:8]}[/bold]{label}: {settings.dagster_ui_url}/runs/{run_id}")
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task("materializing", total=total)
        seen: set[str] = set()
        while True:
            alive = worker.is_alive()
            records = instance.get_records_for_run(
                run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION
            ).records
            for record in records:
                key = record.event_log_entry.dagster_event.asset_key.to_user_string()
                if key not in seen:
                    seen.add(key)
                    progress.console.print(f"  [green]✓[/green] {key}")
            progress.update(task, completed=len(seen), description=f"materializing ({len(seen)})")
            if not alive:
                break
            worker.join(timeout=0.25)


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
    model = run.values.get("wine_model")
    if isinstance(model, dict):
        from dagma.lib import tracking

        metrics = model.get("metrics", {})
        console.print(
            f"MLflow run {model.get('mlflow_run_id')}: accuracy {metrics.get('accuracy', 0):.4f}, "
            f"model {model.get('registered_model')} v{model.get('model_version')}"
        )
        exp = _experiment_id(settings)
        if exp and model.get("mlflow_run_id"):
            console.print(f"  {tracking.run_url(settings.mlflow_ui, exp, model['mlflow_run_id'])}")
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

    definitions = load_definitions(settings)
    graph = definitions.resolve_asset_graph()
    instance = dg.DagsterInstance.get()
    keys = sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string())
    stale = set(_stale_keys(instance, definitions, keys, _latest_partitions(graph, keys)))
    problems: list[str] = []
    assets = []
    for key in keys:
        event = instance.get_latest_materialization_event(key)
        assets.append(
            {
                "key": key.to_user_string(),
                "group": graph.get(key).group_name,
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
