"""New sqlite MLflow stores start from a cached, migrated template instead of migrating."""

import os
from functools import partial
from pathlib import Path

import pytest
from mlflow import MlflowClient

from dagma.lib import tracking


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_new_stores_are_copies_of_one_template(tmp_path: Path, cache: Path):
    first = tmp_path / "a" / "mlflow.db"
    tracking.setup_experiment(f"sqlite:///{first}", "lab", tmp_path / "a" / "artifacts")
    [template] = (cache / "dagma").glob("mlflow-*.db")
    built = template.stat().st_mtime_ns

    second = tmp_path / "b" / "mlflow.db"
    exp = tracking.setup_experiment(f"sqlite:///{second}", "lab", tmp_path / "b" / "artifacts")
    assert template.stat().st_mtime_ns == built
    client = MlflowClient(f"sqlite:///{second}")
    assert client.get_experiment(exp).name == "lab"
    default = client.get_experiment("0").artifact_location
    assert default == (tmp_path / "b" / "artifacts" / "0").as_uri()
    run = client.create_run(exp)
    client.log_metric(run.info.run_id, "accuracy", 0.9)
    assert client.get_run(run.info.run_id).data.metrics == {"accuracy": 0.9}
    assert not list((tmp_path / "b").glob(".mlflow-*"))


def test_an_existing_store_is_never_replaced(tmp_path: Path, cache: Path):
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    exp = tracking.setup_experiment(uri, "lab", tmp_path / "artifacts")
    run = MlflowClient(uri).create_run(exp)
    tracking.seed_sqlite_store(db, tmp_path / "artifacts")
    assert MlflowClient(uri).get_run(run.info.run_id).info.run_id == run.info.run_id


def test_an_unusable_cache_falls_back_to_mlflow_creating_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    db = tmp_path / "home" / "mlflow.db"
    exp = tracking.setup_experiment(f"sqlite:///{db}", "lab", tmp_path / "artifacts")
    assert MlflowClient(f"sqlite:///{db}").get_experiment(exp).name == "lab"
    assert os.path.getsize(db) > 0


def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_mlflow_server_that_does_not_answer_fails_at_once_naming_the_fix(tmp_path: Path):
    uri = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(tracking.TrackingError, match=r"MLFLOW_TRACKING_URI=http://127\.0\.0\.1:"):
        tracking.setup_experiment(uri, "lab", None)
    with pytest.raises(tracking.TrackingError, match="unset MLFLOW_TRACKING_URI"):
        tracking.check_server(uri)


def test_a_url_that_is_not_an_mlflow_server_is_named(tmp_path: Path):
    import http.server
    import threading

    (tmp_path / "index.html").write_text("not mlflow")
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        with pytest.raises(tracking.TrackingError, match=r"/health: HTTP 404\)"):
            tracking.check_server(uri)
        server.shutdown()
