"""`dagma status`: the lab's state as plain data (assets, MLflow runs, vector collections)."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.table import Table

from dagma import dagster_state
from dagma.lab.definitions import load_definitions
from dagma.lib.run_folder import RunFolder
from dagma.reaping import free_slots_of_finished_runs, held_slots, reap_dead_runs
from dagma.settings import Settings


def status(settings: Settings) -> dict[str, Any]:
    """The lab's state as plain data: assets, MLflow runs and vector collections.

    Like `dagma run`, it first marks runs whose process is gone as failed and frees the pool
    slots that ended runs still held; `problems` says so.
    """
    import dagster as dg

    from dagma.defs.core.notebook_assets import engine_of

    definitions = load_definitions(settings)
    graph = definitions.resolve_asset_graph()
    instance = dg.DagsterInstance.get()
    reaped = reap_dead_runs(instance, settings)
    freed = free_slots_of_finished_runs(instance)
    keys = sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string())
    partitions = dagster_state.latest_partitions(graph, keys)
    stale = dagster_state.staleness(instance, graph, keys, partitions)
    events = dagster_state.last_materializations(instance, keys)
    problems: list[str] = [
        f"Dagster run {r} was marked failed: the process that ran it is gone" for r in reaped
    ]
    problems += [f"Dagster run {r} had ended holding pool slots: they were freed" for r in freed]
    assets = []
    for key in keys:
        event = events[key]
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
                "stale": not stale[key].fresh,
                "executed_notebook": _executed_copy(settings, event, graph.get(key).assets_def),
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
        report["mlflow"]["runs"] = _mlflow_runs(settings)
    except Exception as exc:
        problems.append(f"MLflow: {exc}")
    try:
        report["vectors"]["collections"] = _collections(settings)
    except Exception as exc:
        problems.append(f"Vector store: {exc}")
    return report


def _executed_copy(settings: Settings, event: Any, assets_def: Any) -> str | None:
    """The HTML copy of the notebook that made the last materialization, if one ran it."""
    if event is None or not assets_def.is_executable:
        return None
    for name in (assets_def.op.name, *("__".join(k.path) for k in assets_def.keys)):
        folder = RunFolder.of(settings.runs_dir, event.run_id, name)
        if folder.html.is_file():
            return str(folder.html)
    return None


def print_status(report: dict[str, Any], console: Console) -> None:
    """The report as tables, then its problems and the UIs' links."""
    assets = Table(title="Assets", title_justify="left")
    for col in ("asset", "group", "engine", "last materialized", "run", "stale"):
        assets.add_column(col)
    for row in report["assets"]:
        assets.add_row(
            row["key"],
            row["group"] or "",
            row["engine"] or "",
            row["last_materialized"] or "never",
            (row["run_id"] or "")[:8],
            "yes" if row["stale"] else "no",
        )
    console.print(assets)
    held = [(p, h) for p in report.get("pools", []) for h in p["held_by"]]
    if held:
        pools = Table(title="Pool slots held now", title_justify="left")
        for col in ("pool", "limit", "run", "step"):
            pools.add_column(col)
        for pool, holder in held:
            pools.add_row(pool["pool"], str(pool["limit"]), holder["run_id"][:8], holder["step"])
        console.print(pools)
    runs = Table(title="Latest MLflow runs", title_justify="left")
    for col in ("run", "name", "status", "metrics"):
        runs.add_column(col)
    for row in report["mlflow"]["runs"]:
        metrics = ", ".join(f"{k}={v:.3g}" for k, v in sorted(row["metrics"].items())[:4])
        runs.add_row(row["run_id"][:8], row["name"], row["status"], metrics)
    console.print(runs)
    vectors = Table(
        title=f"Vector store ({report['vectors']['kind']}: {report['vectors']['location']})",
        title_justify="left",
    )
    for col in ("collection", "version", "points", "dim"):
        vectors.add_column(col)
    for row in report["vectors"]["collections"]:
        vectors.add_row(row["collection"], str(row["version"]), str(row["points"]), str(row["dim"]))
    console.print(vectors)
    for problem in report.get("problems", []):
        console.print(f"[yellow]! {problem}[/yellow]")
    console.print(
        f"Dagster UI: {report['links']['dagster']}   MLflow UI: {report['links']['mlflow']}"
    )


def _mlflow_runs(settings: Settings) -> list[dict[str, Any]]:
    """The experiment's ten newest runs."""
    from dagma.lib import tracking

    exp = tracking.setup_experiment(
        settings.tracking_uri, settings.dagma_experiment, settings.artifact_root
    )
    runs = tracking.client(settings.tracking_uri).search_runs(
        [exp], max_results=10, order_by=["attributes.start_time DESC"]
    )
    return [
        {
            "run_id": r.info.run_id,
            "name": r.info.run_name,
            "status": r.info.status,
            "metrics": dict(r.data.metrics),
            "url": tracking.run_url(settings.mlflow_ui, exp, r.info.run_id),
        }
        for r in runs
    ]


def _collections(settings: Settings) -> list[dict[str, Any]]:
    """The published vector collections, with their versions and sizes."""
    with settings.open_vector_store() as store:
        return [
            {"collection": c.collection, "version": c.version, "points": c.points, "dim": c.dim}
            for c in store.collections()
        ]
