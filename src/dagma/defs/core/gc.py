"""The daemon prunes executed notebooks under runs/ every night, as `dagma gc` does."""

import dagster as dg

from dagma.defs.core.sensors import automation_status
from dagma.settings import get_settings


@dg.op(
    description="Deletes executed notebooks no materialization points at, past the newest "
    "DAGMA_KEEP_RUNS of each notebook."
)
def prune_runs(context: dg.OpExecutionContext) -> None:
    from dagma.gc import collect

    settings = get_settings()
    report = collect(settings, context.instance, keep=settings.dagma_keep_runs)
    context.log.info(
        f"Kept {report.kept} executed notebooks, deleted {len(report.deleted)} "
        f"({report.bytes_freed / 1e6:.1f} MB) under {settings.runs_dir}."
    )


@dg.job(description="Prunes $DAGMA_HOME/runs by the retention policy (`dagma gc`).")
def runs_gc() -> None:
    prune_runs()


runs_gc_nightly = dg.ScheduleDefinition(
    name="runs_gc_nightly",
    job=runs_gc,
    cron_schedule="0 3 * * *",
    execution_timezone="UTC",
    description="Prunes executed notebooks at 03:00 UTC, keeping what materializations link.",
    default_status=(
        dg.DefaultScheduleStatus.RUNNING
        if automation_status() == dg.DefaultSensorStatus.RUNNING
        else dg.DefaultScheduleStatus.STOPPED
    ),
)
