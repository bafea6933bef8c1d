"""The run-failure sensor, through Dagster's own test context: a failed Dagster run leaves no
MLflow run RUNNING (services mode; embedded mode reaps on the next status)."""

from pathlib import Path

import dagster as dg
import mlflow

from dagma.defs.core.resources import MLflowResource
from dagma.defs.core.sensors import mlflow_runs_of_failed_runs
from dagma.lib import tracking


@dg.op
def breaks() -> None:
    raise RuntimeError("killed halfway")


@dg.job
def failing() -> None:
    breaks()


def test_a_failed_run_leaves_no_mlflow_run_running(tmp_path: Path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = tracking.setup_experiment(uri, "dagma", tmp_path / "artifacts")
    client = mlflow.MlflowClient(uri)
    with dg.DagsterInstance.ephemeral() as instance:
        result = failing.execute_in_process(instance=instance, raise_on_error=False)
        assert not result.success
        dagster_run = result.dagster_run
        mine = client.create_run(experiment, tags={"dagma.dagster_run_id": dagster_run.run_id})
        other = client.create_run(experiment, tags={"dagma.dagster_run_id": "another-run"})
        context = dg.build_run_status_sensor_context(
            sensor_name=mlflow_runs_of_failed_runs.name,
            dagster_event=result.get_run_failure_event(),
            dagster_instance=instance,
            dagster_run=dagster_run,
            resources={"mlflow": MLflowResource(tracking_uri=uri)},
        ).for_run_failure()
        mlflow_runs_of_failed_runs(context)

    assert client.get_run(mine.info.run_id).info.status == "KILLED"
    assert client.get_run(other.info.run_id).info.status == "RUNNING"  # not its run


def test_the_sensor_is_on_by_default_in_the_code_location():
    from dagma.lab import load_definitions
    from dagma.settings import get_settings

    sensor = load_definitions(get_settings()).get_sensor_def("mlflow_runs_of_failed_runs")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING


def test_no_experiment_means_nothing_to_kill(tmp_path: Path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.setup_experiment(uri, "dagma", tmp_path / "artifacts")
    assert tracking.kill_runs_of(uri, "no-such-experiment", "any-run") == []
