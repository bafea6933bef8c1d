"""A notebook asset whose MLflow server is down retries (Dagster RetryPolicy), then fails clearly;
once a real server is back it succeeds. The notebook's own errors are never retried."""

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import mlflow
import pytest

from dagma.lab import materialize
from dagma.services.procs import free_port
from dagma.settings import PROJECT_ROOT, get_settings
from tests.conftest import QUIET
from tests.notebooks.test_spec import write_nb

pytestmark = pytest.mark.integration

LOGS = (
    "from dagma import nb\nctx = nb.context()\nwith ctx.start_run():\n"
    "    import mlflow\n    mlflow.log_metric('answer', 42.0)\nctx.output({'answer': 42})"
)


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "notebooks"
    shutil.copytree(PROJECT_ROOT / "notebooks", folder)
    write_nb(folder / "logs.ipynb", params="seed: int = 1", body=LOGS)
    monkeypatch.setenv("DAGMA_NOTEBOOKS_DIR", str(folder))
    monkeypatch.setenv("DAGMA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DAGMA_RETRIES", "2")
    monkeypatch.setenv("DAGMA_RETRY_DELAY", "0.2")
    return folder


def retries_of(run_id: str) -> int:
    kind = dg.DagsterEventType.STEP_UP_FOR_RETRY
    return len(
        dg.DagsterInstance.get().get_records_for_run(run_id, of_type=kind, limit=100).records
    )


@contextmanager
def mlflow_server(port: int, root: Path) -> Iterator[str]:
    """A real `mlflow server` on loopback, as services mode starts it."""
    url = f"http://127.0.0.1:{port}"
    argv = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--serve-artifacts",
        "--artifacts-destination",
        str(root / "artifacts"),
    ]
    proc = subprocess.Popen(  # nosec B603
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):  # nosec B310
                    break
            except OSError:
                assert proc.poll() is None, "mlflow server exited while starting"
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not answer /health within 120 s")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_a_down_server_is_retried_then_named_and_a_server_back_up_is_used(
    lab: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    port = free_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    down = materialize(get_settings(), selection=["logs"], console=QUIET)
    assert not down.success
    assert f"MLFLOW_TRACKING_URI=http://127.0.0.1:{port} does not answer" in down.error
    assert retries_of(down.run_id) == 2  # DAGMA_RETRIES, then it gives up
    assert down.materialized == []

    with mlflow_server(port, tmp_path / "server") as url:
        back = materialize(get_settings(), selection=["logs"], console=QUIET)
        assert back.success, back.error
        assert retries_of(back.run_id) == 0
        client = mlflow.MlflowClient(url)
        [run] = client.search_runs(
            [client.get_experiment_by_name(get_settings().dagma_experiment).experiment_id]
        )
        assert run.data.metrics["answer"] == 42.0 and run.info.status == "FINISHED"
        assert back.values["logs"] == {"answer": 42}


def test_a_notebook_that_raises_is_not_retried(lab: Path):
    write_nb(lab / "logs.ipynb", params="seed: int = 1", body="raise ValueError('my bug')")
    run = materialize(get_settings(), selection=["logs"], console=QUIET)
    assert not run.success and "ValueError: my bug" in run.error
    assert retries_of(run.run_id) == 0
