"""What the daemon does when a run fails: its MLflow runs must not stay RUNNING."""

import dagster as dg

from dagma.defs.core.resources import MLflowResource
from dagma.lib import tracking


@dg.run_failure_sensor(
    name="mlflow_runs_of_failed_runs",
    description="Marks KILLED the MLflow runs a failed or killed Dagster run left RUNNING.",
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=5,
)
def mlflow_runs_of_failed_runs(context: dg.RunFailureSensorContext, mlflow: MLflowResource) -> None:
    run_id = context.dagster_run.run_id
    killed = tracking.kill_runs_of(mlflow.tracking_uri, mlflow.experiment, run_id)
    if killed:
        context.log.info(f"Run {run_id}: MLflow runs {', '.join(killed)} marked KILLED.")
