"""What the daemon does on its own: clean up after failed runs, and keep notebooks fresh."""

import dagster as dg

from dagma import reaping
from dagma.defs.core.resources import MLflowResource
from dagma.lib import tracking
from dagma.settings import get_settings


@dg.run_failure_sensor(
    name="mlflow_runs_of_failed_runs",
    description="Releases what a failed or killed Dagster run left behind: marks KILLED the "
    "MLflow runs it left RUNNING, stops its kernels and removes its half-built vector versions.",
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=5,
)
def mlflow_runs_of_failed_runs(context: dg.RunFailureSensorContext, mlflow: MLflowResource) -> None:
    run_id = context.dagster_run.run_id
    killed = tracking.kill_runs_of(mlflow.tracking_uri, mlflow.experiment, run_id)
    if killed:
        context.log.info(f"Run {run_id}: MLflow runs {', '.join(killed)} marked KILLED.")
    stopped = reaping.stop_processes_of(run_id)  # its kernels on this host, if any
    if stopped:
        context.log.info(f"Run {run_id}: stopped its kernels (pids {stopped}).")
    for build in reaping.discard_dead_builds(get_settings()):
        context.log.info(f"Run {run_id}: removed the half-built vector version {build}.")


def automation_status() -> dg.DefaultSensorStatus:
    """Running unless DAGMA_AUTOMATION=false; the UI can still switch each one."""
    on = get_settings().dagma_automation
    return dg.DefaultSensorStatus.RUNNING if on else dg.DefaultSensorStatus.STOPPED


notebook_automation = dg.AutomationConditionSensorDefinition(
    "notebook_automation",
    target=dg.AssetSelection.all(),
    description="Materializes notebooks whose upstream updated or whose code changed "
    "(their `stale_notebook` condition), with no click.",
    default_status=automation_status(),
    minimum_interval_seconds=30,
)
