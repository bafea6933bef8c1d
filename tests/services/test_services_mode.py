"""Services mode for real: Postgres, the MLflow server and Dagster's webserver, daemon and
gRPC code server as local processes in a temporary DAGMA_HOME, driven through GraphQL.

The topology starts once per module (about a minute on two loaded cores); the finalizer
stops it and fails if any process of ours is left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from dagma.services.config import ServicesConfig
from dagma.services.procs import free_port, marked_pids, pid_alive
from dagma.services.supervisor import Topology

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
LOCATION, REPOSITORY, JOB = "dagma", "__repository__", "__ASSET_JOB"
FINISHED = {"SUCCESS", "FAILURE", "CANCELED"}


@dataclass
class Lab:
    home: Path
    env: dict[str, str]
    config: ServicesConfig
    runs: dict[str, str] = field(default_factory=dict)

    def cli(self, *args: str, timeout: float = 400) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dagma.services.cli", *args],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def status(self) -> dict[str, Any]:
        return json.loads(self.cli("status", "--json", timeout=120).stdout)

    def graphql(self) -> Any:
        from dagster_graphql import DagsterGraphQLClient

        return DagsterGraphQLClient(
            "127.0.0.1", port_number=self.config.dagma_dagster_port, timeout=60
        )

    def dagster_db(self) -> Any:
        import psycopg

        password = json.loads(self.config.secrets_file.read_text())["dagster"]
        return psycopg.connect(
            host="127.0.0.1",
            port=self.config.dagma_pg_port,
            user="dagster",
            password=password,
            dbname="dagster",
            connect_timeout=10,
        )


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    if not any(Path("/usr/lib/postgresql").glob("*/bin/initdb")):
        pytest.skip("install postgresql: services mode needs the Postgres server binaries")
    home = Path(tempfile.mkdtemp(prefix="dagma-services-"))
    home.chmod(0o755)  # Postgres runs unprivileged when the tests run as root
    ports = {
        "DAGMA_PG_PORT": free_port(),
        "DAGMA_MLFLOW_PORT": free_port(),
        "DAGMA_DAGSTER_PORT": free_port(),
        "DAGMA_GRPC_PORT": free_port(),
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_", "MLFLOW_"))}
    for name in ("QDRANT_URL", "QDRANT_API_KEY", "DAGMA_QDRANT_PATH"):
        env.pop(name, None)
    env.update({k: str(v) for k, v in ports.items()})
    env.update({"DAGMA_HOME": str(home), "DAGSTER_MAX_CONCURRENT_RUNS": "1"})
    config = ServicesConfig(
        dagma_home=home,
        dagma_pg_port=ports["DAGMA_PG_PORT"],
        dagma_mlflow_port=ports["DAGMA_MLFLOW_PORT"],
        dagma_dagster_port=ports["DAGMA_DAGSTER_PORT"],
        dagma_grpc_port=ports["DAGMA_GRPC_PORT"],
        dagster_max_concurrent_runs=1,
    )
    lab = Lab(home=home, env=env, config=config)
    try:
        started = time.monotonic()
        up = lab.cli("up")
        assert up.returncode == 0, up.stdout + up.stderr + lab.cli("logs", "-n", "30").stdout
        print(f"services up in {time.monotonic() - started:.0f}s")
        yield lab
    finally:
        pids = {r.pid for r in Topology(config).records().values()}
        lab.cli("down", timeout=120)
        Topology(config).down(progress=lambda _: None)  # in case the CLI itself failed
        leftovers = marked_pids(str(home)) + [p for p in pids if pid_alive(p)]
        if not os.environ.get("DAGMA_KEEP_TEST_HOME"):
            shutil.rmtree(home, ignore_errors=True)
        assert not leftovers, f"processes left behind: {leftovers}"


def wait_for(lab: Lab, run_ids: list[str], timeout: float = 600) -> list[tuple[str, ...]]:
    """Poll the webserver until every run finishes; returns the statuses seen at each poll."""
    client = lab.graphql()
    seen: list[tuple[str, ...]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        statuses = tuple(client.get_run_status(r).value for r in run_ids)
        seen.append(statuses)
        if all(s in FINISHED for s in statuses):
            return seen
        time.sleep(2)
    raise AssertionError(f"runs not finished after {timeout}s: {seen[-1]}")


def failures(lab: Lab) -> list[str]:
    """The error messages of failed steps and runs, for assertion messages."""
    with lab.dagster_db() as conn:
        rows = conn.execute(
            "SELECT step_key, event FROM event_logs "
            "WHERE dagster_event_type IN ('STEP_FAILURE', 'RUN_FAILURE') ORDER BY id"
        ).fetchall()
    found = []
    for step, event in rows:
        data = json.loads(event)["dagster_event"].get("event_specific_data") or {}
        error = data.get("error") or {}
        found.append(f"{step}: {error.get('message', '')[:800]}")
    return found


def test_up_reports_every_service_healthy_and_the_embedded_vector_store(lab):
    status = lab.status()
    assert status["healthy"], status
    assert {s["name"] for s in status["services"]} == {
        "postgres",
        "mlflow",
        "code-server",
        "webserver",
        "daemon",
    }
    assert status["vector_store"]["kind"] == "embedded"
    assert status["vector_store"]["location"] == str(lab.home / "qdrant")
    secrets = lab.config.secrets_file
    assert secrets.stat().st_mode & 0o777 == 0o600


def test_demo_job_runs_through_the_queue_and_the_daemon(lab):
    client = lab.graphql()
    # In-process execution (what `dagma demo` does) keeps the run worker to one process:
    # on two loaded cores a subprocess per step would double the test's time. The launch
    # path under test (GraphQL, queue, daemon, code server, run worker) is the same.
    demo = client.submit_job_execution(
        JOB,
        repository_location_name=LOCATION,
        repository_name=REPOSITORY,
        run_config={"execution": {"config": {"in_process": {}}}},
    )
    # With one concurrent run allowed, a second submission must wait in the queue.
    small = client.submit_job_execution(
        JOB,
        repository_location_name=LOCATION,
        repository_name=REPOSITORY,
        asset_selection=["wine_table"],
    )
    lab.runs.update(demo=demo, small=small)
    seen = wait_for(lab, [demo, small])
    assert seen[-1] == ("SUCCESS", "SUCCESS"), (seen[-1], failures(lab))
    assert any(d in ("STARTING", "STARTED") and s == "QUEUED" for d, s in seen), seen
    assert not any(d == s == "STARTED" for d, s in seen), "the limit of one run was exceeded"


def test_runs_are_stored_in_postgres(lab):
    assert lab.runs, "the demo run did not start"
    with lab.dagster_db() as conn:
        rows = dict(conn.execute("SELECT run_id, status FROM runs").fetchall())
    assert rows[lab.runs["demo"]] == "SUCCESS"
    assert rows[lab.runs["small"]] == "SUCCESS"


def test_mlflow_run_is_on_the_server_with_artifacts_over_http(lab):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=lab.config.mlflow_url)
    experiment = client.get_experiment_by_name("dagma")
    assert experiment is not None
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`dagma.dagster_run_id` = '{lab.runs['demo']}'",
    )
    run = next(r for r in runs if r.data.tags.get("dagma.notebook") == "wine_model")
    assert 0.8 <= run.data.metrics["accuracy"] <= 1.0
    listed = {a.path for a in client.list_artifacts(run.info.run_id, "notebook")}
    assert "notebook/wine_model.ipynb" in listed
    # The server serves artifacts itself (--serve-artifacts): a plain HTTP GET.
    url = (
        f"{lab.config.mlflow_url}/get-artifact?path=notebook/wine_model.ipynb"
        f"&run_uuid={run.info.run_id}"
    )
    with urllib.request.urlopen(url, timeout=30) as response:
        notebook = json.loads(response.read())
    assert notebook["nbformat"] == 4
    assert any(lab.config.artifacts_dir.rglob("wine_model.ipynb"))


def test_vectors_are_written_to_the_embedded_store_under_the_home(lab):
    collection = lab.home / "qdrant" / "dagma_docs"
    assert (collection / "CURRENT").is_file()
    version = collection / (collection / "CURRENT").read_text().strip()
    assert version.is_dir() and any(version.iterdir())


def test_killed_postgres_is_reported_and_up_restores_it_with_its_data(lab):
    postgres = Topology(lab.config).records()["postgres"]
    os.kill(postgres.pid, signal.SIGKILL)
    status = lab.status()
    pg = next(s for s in status["services"] if s["name"] == "postgres")
    assert not status["healthy"]
    assert not pg["alive"] and not pg["healthy"]

    up = lab.cli("up")
    assert up.returncode == 0, up.stdout + up.stderr
    assert "mlflow: already running" in up.stdout
    assert "daemon: already running" in up.stdout
    assert lab.status()["healthy"]
    with lab.dagster_db() as conn:
        ids = {r[0] for r in conn.execute("SELECT run_id FROM runs").fetchall()}
    assert set(lab.runs.values()) <= ids
    # The webserver reconnects on its own: the runs are still visible through GraphQL.
    assert lab.graphql().get_run_status(lab.runs["demo"]).value == "SUCCESS"
