"""`dagma gc`: prune executed notebooks under $DAGMA_HOME/runs by the retention policy."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dagma.dagster_fixes import remove_dagstermill_scratch
from dagma.lib import retention
from dagma.settings import Settings

# Records read per asset to find the latest materialization of each of its partitions.
_MATERIALIZATIONS_READ = 10_000


@dataclass
class GcReport:
    kept: int = 0
    deleted: list[str] = field(default_factory=list)  # "<run id>/<notebook>"
    bytes_freed: int = 0
    dry_run: bool = False


def protected_runs(instance: Any) -> set[str]:
    """Runs a current materialization (of any asset, or any partition) points at, and live runs."""
    import dagster as dg

    protected = set()
    for key in instance.get_asset_keys():
        seen: set[str | None] = set()
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=key), limit=_MATERIALIZATIONS_READ
        ).records
        for record in records:  # newest first: the first of each partition is its current one
            partition = record.partition_key
            if partition not in seen:
                seen.add(partition)
                protected.add(record.run_id)
    live = [
        dg.DagsterRunStatus.QUEUED,
        dg.DagsterRunStatus.NOT_STARTED,
        dg.DagsterRunStatus.STARTING,
        dg.DagsterRunStatus.STARTED,
        dg.DagsterRunStatus.CANCELING,
    ]
    protected |= set(instance.get_run_ids(dg.RunsFilter(statuses=live)))
    return protected


def collect(settings: Settings, instance: Any, keep: int, dry_run: bool = False) -> GcReport:
    """Delete what the retention policy does not keep (or only say what, with `dry_run`)."""
    folders = retention.run_folders(settings.runs_dir)
    doomed = retention.to_delete(folders, protected_runs(instance), keep)
    report = GcReport(kept=len(folders) - len(doomed), dry_run=dry_run)
    report.deleted = [f"{f.run_id}/{f.notebook}" for f in doomed]
    if not dry_run:
        report.bytes_freed = retention.remove(doomed, settings.runs_dir)
        scratch = settings.scratch_dir / "dagstermill"
        ended = [p.name for p in scratch.glob("*") if not _live(instance, p.name)]
        remove_dagstermill_scratch(settings.scratch_dir, ended)
    return report


def _live(instance: Any, run_id: str) -> bool:
    run = instance.get_run_by_id(run_id)
    return run is not None and not run.is_finished
