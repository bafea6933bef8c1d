"""What a `dagma run` shows: progress while its Dagster runs go, then a summary of the result.

The summary reads only what the runs recorded (materializations, their `value` metadata, check
results): no value is loaded back into this process.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from dagma.settings import Settings

if TYPE_CHECKING:
    from dagma.lab.execution import LabRun, RunningBatch

# How often a step that waits for a pool slot says which run holds it.
WAIT_REPORT_SECONDS = 5.0


@contextmanager
def progress_display(console: Console) -> Iterator[Progress]:
    """One bar per Dagster run, kept on screen when it ends."""
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        yield progress


def follow(instance: Any, batch: RunningBatch, progress: Progress, settings: Settings) -> None:
    """New events of the batch's run: the run's link once, ticks, the steps now running."""
    import dagster as dg

    from dagma.lab.execution import LAUNCH_TAG

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
    watched = {
        dg.DagsterEventType.ASSET_MATERIALIZATION,
        dg.DagsterEventType.STEP_START,
        dg.DagsterEventType.STEP_SUCCESS,
        dg.DagsterEventType.STEP_FAILURE,
        dg.DagsterEventType.ENGINE_EVENT,  # among them: a step blocked by its pool's limit
    }
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


def _say_who_blocks(instance: Any, batch: RunningBatch, progress: Progress) -> None:
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
        print_answer(evaluation["sample"], console)
    for name, passed in run.checks.items():
        console.print(
            f"Check {name}: " + ("[green]passed[/green]" if passed else "[red]failed[/red]")
        )
    if run.error:
        console.print(run.error, style="red", markup=False)
    console.print(f"\nDagster UI: {settings.dagster_ui_url}  (run `make dagster`)")
    console.print(f"MLflow UI:  {settings.mlflow_ui}  (run `make mlflow`)")


def print_answer(answer: dict[str, Any], console: Console) -> None:
    """An answer (an ``Answer`` as a dict): each sentence with its source and score, then the
    sources (:func:`dagma.lib.answers.answer_lines`)."""
    from dagma.lib.answers import Answer, answer_lines

    console.print()
    for line in answer_lines(Answer.model_validate(answer)):
        bold = line.startswith(("Q:", "A:", "Sources:"))
        console.print(line, style="bold" if bold else None, markup=False, highlight=False)


def _experiment_id(settings: Settings) -> str | None:
    try:
        from dagma.lib import tracking

        return tracking.setup_experiment(
            settings.tracking_uri, settings.dagma_experiment, settings.artifact_root
        )
    except Exception:
        return None
