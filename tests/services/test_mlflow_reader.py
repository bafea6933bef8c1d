"""The app's MLflow login reads and cannot write: a real basic-auth server, started the way the
MLflow image starts it (docker/mlflow/basic_auth.ini, `python -m dagma.services.mlflow_users
-- mlflow server ...`)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import requests
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from dagma.services.mlflow_users import MlflowUsersError, ensure_reader
from dagma.services.procs import free_port

ROOT = Path(__file__).resolve().parents[2]
ADMIN_PASSWORD = "admin-password-for-the-test"  # pragma: allowlist secret
READER_PASSWORD = "reader-password-for-the-test"  # pragma: allowlist secret
MODEL = "dagma-wine"


def auth_ini(folder: Path) -> Path:
    """docker/mlflow/basic_auth.ini with its user store moved into `folder`."""
    text = (ROOT / "docker" / "mlflow" / "basic_auth.ini").read_text()
    ini = folder / "basic_auth.ini"
    ini.write_text(text.replace("sqlite:////mlauth/basic_auth.db", f"sqlite:///{folder}/auth.db"))
    assert ini.read_text() != text
    return ini


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_AUTH_CONFIG_PATH": str(auth_ini(folder)),
        "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "flask-secret-for-the-test",  # pragma: allowlist secret
        "MLFLOW_READER_PASSWORD": READER_PASSWORD,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    argv = [
        sys.executable, "-m", "dagma.services.mlflow_users", "--",
        "mlflow", "server", "--host=127.0.0.1", f"--port={port}", "--app-name=basic-auth",
        "--workers=1", f"--backend-store-uri=sqlite:///{folder}/mlflow.db", "--serve-artifacts",
        f"--artifacts-destination={folder}/artifacts",
    ]  # fmt: skip
    log = (folder / "server.log").open("w")
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=folder)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):  # nosec B310
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"MLflow did not start:\n{(folder / 'server.log').read_text()}")
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def as_user(monkeypatch: pytest.MonkeyPatch, url: str, user: str, password: str) -> MlflowClient:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    return MlflowClient(tracking_uri=url)


def denied(call) -> bool:
    """Whether MLflow answers 403 (artifact uploads raise requests' error, not MLflow's)."""
    try:
        call()
    except MlflowException as exc:
        return exc.get_http_status_code() == 403
    except requests.HTTPError as exc:
        return exc.response is not None and exc.response.status_code == 403
    return False


@pytest.mark.integration
@pytest.mark.slow
def test_the_reader_reads_the_champion_and_the_runs_but_cannot_write_them(server, monkeypatch):
    admin = as_user(monkeypatch, server, "admin", ADMIN_PASSWORD)
    experiment = admin.create_experiment("dagma")
    run = admin.create_run(experiment)
    admin.log_metric(run.info.run_id, "accuracy", 0.9)
    admin.log_text(run.info.run_id, "flavors: {}", "model/MLmodel")
    admin.create_registered_model(MODEL)
    version = admin.create_model_version(MODEL, f"runs:/{run.info.run_id}/model", run.info.run_id)
    admin.set_registered_model_alias(MODEL, "champion", version.version)

    reader = as_user(monkeypatch, server, "reader", READER_PASSWORD)
    assert reader.get_model_version_by_alias(MODEL, "champion").version == version.version
    [found] = reader.search_runs([experiment])
    assert found.data.metrics == {"accuracy": 0.9}
    local = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="model/MLmodel", tracking_uri=server
    )
    assert Path(local).read_text() == "flavors: {}"  # the app's model page downloads the model

    run_id = run.info.run_id
    source = f"runs:/{run_id}/model"
    assert denied(lambda: reader.create_run(experiment))
    assert denied(lambda: reader.log_metric(run_id, "accuracy", 0.1))
    assert denied(lambda: reader.create_model_version(MODEL, source, run_id))
    assert denied(lambda: reader.set_registered_model_alias(MODEL, "champion", "1"))
    assert denied(lambda: reader.delete_registered_model(MODEL))
    assert denied(lambda: reader.log_text(run_id, "pwned", "model/MLmodel"))
    assert reader.get_model_version_by_alias(MODEL, "champion").version == version.version
    wrong = as_user(monkeypatch, server, "reader", "not-the-password")
    with pytest.raises(MlflowException):
        wrong.search_runs([experiment])


def test_the_reader_is_refused_when_the_default_permission_would_let_it_write(tmp_path):
    with pytest.raises(MlflowUsersError, match="default_permission = EDIT"):
        ensure_reader(f"sqlite:///{tmp_path}/auth.db", READER_PASSWORD, "EDIT")
    with pytest.raises(MlflowUsersError, match="MLFLOW_READER_PASSWORD"):
        ensure_reader(f"sqlite:///{tmp_path}/auth.db", "", "READ")
    assert ensure_reader(f"sqlite:///{tmp_path}/auth.db", READER_PASSWORD, "READ") is True
    assert ensure_reader(f"sqlite:///{tmp_path}/auth.db", READER_PASSWORD + "2", "READ") is False
