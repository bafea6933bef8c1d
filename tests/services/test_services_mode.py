"""Services mode for real: Postgres, the MLflow server and Dagster's webserver, daemon and
gRPC code server as local processes in a temporary DAGMA_HOME, driven through GraphQL.

The topology starts once per module (about a minute on two loaded cores), with Prometheus
(`--with observability`) when Debian's is installed; the finalizer stops it and fails if any
process of ours is left behind.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from dagma.notebooks.kernel_pool import Ticket
from dagma.services.config import ServicesConfig
from dagma.services.procs import MARKER, free_port, marked_pids, pid_alive, port_in_use
from dagma.services.supervisor import Topology
from tests.conftest import require
from tests.notebooks.test_spec import write_nb

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
LOCATION, REPOSITORY, JOB = "dagma", "__repository__", "__ASSET_JOB"
FINISHED = {"SUCCESS", "FAILURE", "CANCELED"}
# The demo graph less its partitioned assets, which a run materializes one partition at a time
# (the UI asks for one; the inbox sensor and automation pick theirs), and less the RAG
# evaluation and its scorecard: the embedded demo covers them, and here the local LLM would
# only add a minute to the run that every later test waits for.
UNPARTITIONED = ["wine_table", "wine_model", "doc_corpus", "doc_vectors", "slow"]
# Publishes a version of "docs". With `pause`, the first attempt writes its kernel's pid and
# the kernel's parent's to SLOW_MARKER and waits there to be killed; a re-execution finds the
# marker and goes straight on.
SLOW = """import os, time
import numpy as np
from dagma import nb
from dagma.lib.vectors import point_id
ctx = nb.context()
marker = os.environ["SLOW_MARKER"]
with ctx.start_run():
    if pause and not os.path.exists(marker):
        open(marker, "w").write(f"{os.getpid()} {os.getppid()}")
        time.sleep(pause)
    ids = [point_id("docs", str(i)) for i in range(3)]
    vectors = np.eye(3, 4, k=version % 2, dtype="float32")
    published = ctx.vector_store().publish("docs", ids, vectors, [{"n": i} for i in range(3)])
ctx.output({"version": published.version})"""


# Writes its kernel's pid to NAP_MARKER, then sleeps: a run to cancel or to crash under.
NAP = """import os, time
open(os.environ["NAP_MARKER"], "w").write(str(os.getpid()))
time.sleep(pause)"""


@dataclass
class Lab:
    home: Path
    env: dict[str, str]
    config: ServicesConfig
    runs: dict[str, str] = field(default_factory=dict)
    observability: bool = False

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

    def mlflow_password(self) -> str:
        return json.loads(self.config.secrets_file.read_text())["mlflow_admin"]

    def mlflow_get(self, path: str, auth: tuple[str, str] | None = None) -> int:
        """The HTTP status of a GET on the MLflow server, with basic auth or without."""
        import base64
        import urllib.error

        request = urllib.request.Request(f"{self.config.mlflow_url}{path}")
        if auth is not None:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return exc.code

    def reexecute_from_failure(self, run_id: str) -> str:
        query = """mutation($p: ReexecutionParams!) {
          launchRunReexecution(reexecutionParams: $p) {
            __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message }
          }
        }"""
        params = {"parentRunId": run_id, "strategy": "FROM_FAILURE"}
        result = self.graphql()._execute(query, {"p": params})["launchRunReexecution"]
        assert result["__typename"] == "LaunchRunSuccess", result
        return str(result["run"]["runId"])

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
    require(
        any(Path("/usr/lib/postgresql").glob("*/bin/initdb")),
        "no PostgreSQL server binaries (Debian's postgresql) for services mode",
    )
    home = Path(tempfile.mkdtemp(prefix="dagma-services-"))
    home.chmod(0o755)  # Postgres runs unprivileged when the tests run as root
    ports = {
        "DAGMA_PG_PORT": free_port(),
        "DAGMA_MLFLOW_PORT": free_port(),
        "DAGMA_DAGSTER_PORT": free_port(),
        "DAGMA_GRPC_PORT": free_port(),
        "DAGMA_API_PORT": free_port(),
        "DAGMA_METRICS_PORT": free_port(),
        "DAGMA_PROMETHEUS_PORT": free_port(),
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_", "MLFLOW_"))}
    for name in ("QDRANT_URL", "QDRANT_API_KEY", "DAGMA_QDRANT_PATH", "DAGMA_API_SECRET"):
        env.pop(name, None)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.update({k: str(v) for k, v in ports.items()})
    notebooks = home / "notebooks"
    shutil.copytree(ROOT / "notebooks", notebooks)
    write_nb(notebooks / "slow.ipynb", params="pause: float = 0.0\nversion: int = 1", body=SLOW)
    write_nb(notebooks / "nap.ipynb", params="pause: float = 0.0", body=NAP)
    env.update(
        {
            "DAGMA_HOME": str(home),
            "DAGSTER_MAX_CONCURRENT_RUNS": "1",
            # Sensors and schedules start stopped: every run here is one a test launched.
            "DAGMA_AUTOMATION": "false",
            "DAGMA_NOTEBOOKS_DIR": str(notebooks),
            "SLOW_MARKER": str(home / "slow-marker"),
            "NAP_MARKER": str(home / "nap-marker"),
            "DAGMA_PROMETHEUS_SCRAPE_INTERVAL": "1s",
        }
    )
    config = ServicesConfig(
        dagma_home=home,
        dagma_pg_port=ports["DAGMA_PG_PORT"],
        dagma_mlflow_port=ports["DAGMA_MLFLOW_PORT"],
        dagma_dagster_port=ports["DAGMA_DAGSTER_PORT"],
        dagma_grpc_port=ports["DAGMA_GRPC_PORT"],
        dagma_api_port=ports["DAGMA_API_PORT"],
        dagma_metrics_port=ports["DAGMA_METRICS_PORT"],
        dagma_prometheus_port=ports["DAGMA_PROMETHEUS_PORT"],
        dagma_prometheus_scrape_interval="1s",
        dagster_max_concurrent_runs=1,
    )
    observability = config.dagma_prometheus_bin.is_file()
    lab = Lab(home=home, env=env, config=config, observability=observability)
    try:
        started = time.monotonic()
        up = lab.cli("up", *(["--with", "observability"] if observability else []))
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


def run_worker(lab: Lab, marker: Path) -> int:
    """The run worker of the notebook that wrote `marker`: the claimant of its spare kernel,
    or the kernel's parent when the worker started the kernel itself."""
    kernel, parent = (int(pid) for pid in marker.read_text().split())
    for path in (lab.home / "kernels" / "claimed").glob("*.json"):
        ticket = Ticket.read(path)
        if ticket is not None and ticket.pid == kernel and ticket.claimant:
            return ticket.claimant
    return parent


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
        "metrics",
        "mlflow",
        "code-server",
        "webserver",
        "daemon",
        "api",
        *(["prometheus"] if lab.observability else []),
    }
    exporter = next(s for s in status["services"] if s["name"] == "metrics")
    assert exporter["url"] == f"{lab.config.metrics_url}/metrics", exporter
    assert status["vector_store"]["kind"] == "embedded"
    assert status["vector_store"]["location"] == str(lab.home / "qdrant")
    secrets = lab.config.secrets_file
    assert secrets.stat().st_mode & 0o777 == 0o600


def api_get(lab: Lab, path: str, token: str | None = None) -> tuple[int, Any]:
    """Status and headers (case-insensitive) of a GET on the services' API, with a bearer token
    or without."""
    import urllib.error

    request = urllib.request.Request(f"{lab.config.api_url}{path}")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status), response.headers
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers


def test_the_api_serves_on_its_port_and_checks_tokens_signed_with_the_generated_secret(lab):
    api = next(s for s in lab.status()["services"] if s["name"] == "api")
    assert api["healthy"] and api["url"] == lab.config.api_url, api
    assert api_get(lab, "/healthz")[0] == 200
    assert api_get(lab, "/v1/search?q=wine")[0] == 401
    # No DAGMA_API_SECRET anywhere: `up` generated one, and `dagma token issue` finds it.
    secret = json.loads(lab.config.secrets_file.read_text())["api_secret"]
    assert len(secret) >= 32 and lab.config.secrets_file.stat().st_mode & 0o777 == 0o600
    issued = dagma(lab, "token", "issue", "--scope", "search", "--ttl", "5m")
    assert issued.returncode == 0, issued.stderr
    status, headers = api_get(lab, "/v1/auth/check?scope=search", issued.stdout.strip())
    assert status == 200 and headers.get("X-Dagma-Subject") == "dagma-cli", headers
    forged = dagma(
        lab, "token", "issue", "--scope", "search",
        env={**lab.env, "DAGMA_API_SECRET": "another-secret-of-at-least-32-bytes!"},
    )  # fmt: skip
    assert forged.returncode == 0, forged.stderr
    assert api_get(lab, "/v1/auth/check?scope=search", forged.stdout.strip())[0] == 401


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
        asset_selection=UNPARTITIONED,
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


def prometheus_query(lab: Lab, expr: str) -> list[dict[str, Any]]:
    """The instant vector Prometheus' own HTTP API answers for `expr`."""
    from urllib.parse import quote

    url = f"{lab.config.prometheus_url}/api/v1/query?query={quote(expr)}"
    with urllib.request.urlopen(url, timeout=30) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def scraped(lab: Lab, expr: str, timeout: float = 60) -> list[dict[str, Any]]:
    """`expr`'s series once Prometheus has scraped at least one (every second here)."""
    deadline = time.monotonic() + timeout
    while not (found := prometheus_query(lab, expr)):
        assert time.monotonic() < deadline, f"no series for {expr} after {timeout:.0f}s"
        time.sleep(1)
    return found


def test_prometheus_scrapes_the_figures_of_every_service_and_run_worker(lab):
    """The demo run's run worker, the API and the exporter write into one shared folder; the
    exporter serves it all as job `dagma`, and Prometheus (on the config `up` generated)
    scrapes it, with the API's own endpoint kept only for its `up`."""
    require(lab.observability, "no Prometheus (Debian's prometheus) for --with observability")
    assert lab.runs, "the demo run did not start"
    assert (lab.home / "services" / "prometheus" / "prometheus.yml").is_file()
    assert (lab.home / "services" / "prometheus" / "data" / "wal").is_dir()
    assert (lab.home / "logs" / "prometheus.log").is_file()
    for job in ("dagma", "dagma-api", "prometheus"):
        assert [r["value"][1] for r in scraped(lab, f'up{{job="{job}"}}')] == ["1"], job

    for asset in ("wine_table", "wine_model"):
        steps = scraped(lab, f'dagma_asset_steps_total{{asset="{asset}",outcome="success"}}')
        assert [r["metric"]["job"] for r in steps] == ["dagma"], steps
        assert float(steps[0]["value"][1]) >= 1
    phases = scraped(lab, 'dagma_notebook_phase_duration_seconds_count{notebook="wine_model"}')
    assert {r["metric"]["phase"] for r in phases} >= {"execute"}, phases
    assert scraped(lab, 'dagma_runs_total{outcome="success"}')
    # The API's figures reach the exporter through the folder: its health checks, by route.
    api = scraped(lab, 'dagma_api_requests_total{route="/healthz",status="200"}')
    assert [r["metric"]["job"] for r in api] == ["dagma"], api
    # Its own /metrics repeats them: scraped for `up` only, nothing counts twice.
    assert prometheus_query(lab, 'count({job="dagma-api",__name__=~"dagma_.*"})') == []


def test_a_killed_prometheus_starts_again_on_its_data(lab):
    """SIGKILL leaves Prometheus' data folder (and its lock file) as it was; `up` starts it
    again on the same data, and nothing else is restarted."""
    require(lab.observability, "no Prometheus (Debian's prometheus) for --with observability")
    before = scraped(lab, 'count_over_time(up{job="dagma"}[1h])')
    killed = Topology(lab.config).records()["prometheus"]
    os.kill(killed.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while port_in_use(lab.config.dagma_prometheus_port):
        assert time.monotonic() < deadline, "the killed Prometheus' port stays taken"
        time.sleep(0.2)

    up = lab.cli("up")  # no --with: the recorded Prometheus is part of the topology now
    assert up.returncode == 0, up.stdout + up.stderr + lab.cli("logs", "prometheus").stdout
    assert "metrics: already running" in up.stdout and "api: already running" in up.stdout
    assert "prometheus: started" in up.stdout, up.stdout
    after = scraped(lab, 'count_over_time(up{job="dagma"}[1h])')
    assert float(after[0]["value"][1]) >= float(before[0]["value"][1])  # the samples survived


def test_mlflow_requires_basic_auth_and_the_admin_password_is_not_the_default(lab):
    path = "/api/2.0/mlflow/experiments/get-by-name?experiment_name=dagma"
    assert lab.mlflow_get(path) == 401
    assert lab.mlflow_get(path, ("admin", "password1234")) == 401  # pragma: allowlist secret
    assert lab.mlflow_get(path, ("admin", lab.mlflow_password())) == 200
    assert lab.mlflow_get("/health") == 200  # health checks need no credentials
    assert lab.config.mlflow_auth_file.stat().st_mode & 0o777 == 0o600
    import psycopg

    # MLflow's users sit in their own database, which the dagster role cannot open.
    with pytest.raises(psycopg.OperationalError, match=r"permission denied"):
        psycopg.connect(
            host="127.0.0.1",
            port=lab.config.dagma_pg_port,
            user="dagster",
            password=json.loads(lab.config.secrets_file.read_text())["dagster"],
            dbname="mlflow_auth",
            connect_timeout=10,
        )


def test_mlflow_run_is_on_the_server_with_artifacts_over_http(lab, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", lab.mlflow_password())

    client = MlflowClient(tracking_uri=lab.config.mlflow_url)
    experiment = client.get_experiment_by_name("dagma")
    assert experiment is not None
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`dagma.dagster_run_id` = '{lab.runs['demo']}'",
    )
    run = next(r for r in runs if r.data.tags.get("dagma.notebook") == "wine_model")
    assert run.data.metrics["accuracy"] >= 0.8
    listed = {a.path for a in client.list_artifacts(run.info.run_id, "notebook")}
    assert "notebook/wine_model.ipynb" in listed
    # The server serves artifacts itself (--serve-artifacts): a plain HTTP GET.
    url = (
        f"{lab.config.mlflow_url}/get-artifact?path=notebook/wine_model.ipynb"
        f"&run_uuid={run.info.run_id}"
    )
    request = urllib.request.Request(url)
    token = base64.b64encode(f"admin:{lab.mlflow_password()}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=30) as response:
        notebook = json.loads(response.read())
    assert notebook["nbformat"] == 4
    assert any(lab.config.artifacts_dir.rglob("wine_model.ipynb"))


def test_vectors_are_written_to_the_embedded_store_under_the_home(lab):
    collection = lab.home / "qdrant" / "dagma_docs"
    assert (collection / "CURRENT").is_file()
    version = collection / (collection / "CURRENT").read_text().strip()
    assert version.is_dir() and any(version.iterdir())


def test_a_killed_run_worker_fails_its_run_and_reexecution_from_the_failure_succeeds(
    lab, monkeypatch
):
    import numpy as np
    from mlflow import MlflowClient

    from dagma.lib.vectors import EmbeddedStore

    store = EmbeddedStore(lab.home / "qdrant")
    before = store.current_version("docs")  # the demo run published version 1
    query = np.array([1.0, 0.0, 0.0, 0.0], dtype="float32")
    hits_before = store.search("docs", query, k=3)
    marker = Path(lab.env["SLOW_MARKER"])
    run_config = {
        "ops": {"slow": {"config": {"pause": 600.0, "version": 2}}},
        "execution": {"config": {"in_process": {}}},
    }
    victim = lab.graphql().submit_job_execution(
        JOB,
        repository_location_name=LOCATION,
        repository_name=REPOSITORY,
        asset_selection=["slow"],
        run_config=run_config,
    )
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert time.monotonic() < deadline, ("the notebook never started", failures(lab))
        time.sleep(0.5)
    worker = run_worker(lab, marker)
    os.kill(worker, signal.SIGKILL)  # the run worker, halfway through the notebook

    # The code server sees its run worker die and fails the run; nothing waits for a timeout.
    seen = wait_for(lab, [victim], timeout=180)
    assert seen[-1] == ("FAILURE",)
    with lab.dagster_db() as conn:
        messages = [
            json.dumps(json.loads(row[0]))
            for row in conn.execute(
                "SELECT event FROM event_logs WHERE run_id = %s ORDER BY id", (victim,)
            )
        ]
    assert any("terminated by signal 9 (SIGKILL)" in m for m in messages), messages[-6:]
    # Readers still see the last complete version: nothing of the killed build.
    assert store.current_version("docs") == before
    assert store.search("docs", query, k=3) == hits_before

    # The daemon's run-failure sensor ends the MLflow run the kill left RUNNING.
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", lab.mlflow_password())
    client = MlflowClient(tracking_uri=lab.config.mlflow_url)
    experiment = client.get_experiment_by_name("dagma")
    assert experiment is not None
    deadline = time.monotonic() + 180
    while True:
        runs = client.search_runs(
            [experiment.experiment_id], filter_string=f"tags.`dagma.dagster_run_id` = '{victim}'"
        )
        statuses = [r.info.status for r in runs]
        if statuses == ["KILLED"]:
            break
        assert time.monotonic() < deadline, f"MLflow runs of the killed run: {statuses}"
        time.sleep(2)

    again = lab.reexecute_from_failure(victim)
    seen = wait_for(lab, [again], timeout=300)
    assert seen[-1] == ("SUCCESS",), failures(lab)
    assert store.current_version("docs").version == before.version + 1
    lab.runs["reexecuted"] = again


def test_backup_then_restore_into_an_empty_home_brings_back_runs_models_and_vectors(
    lab, monkeypatch
):
    import numpy as np
    from mlflow.server import get_app_client

    from dagma.lib.vectors import EmbeddedStore
    from dagma.services.backup import counts

    # A user of the live MLflow, whose password hash must not travel in the archive.
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", lab.mlflow_password())
    alice = ("alice", "alice-password-for-tests-1234")  # pragma: allowlist secret
    get_app_client("basic-auth", tracking_uri=lab.config.mlflow_url).create_user(*alice)
    experiment = "/api/2.0/mlflow/experiments/get-by-name?experiment_name=dagma"
    assert lab.mlflow_get(experiment, alice) == 200
    signed = {"DAGMA_BACKUP_KEY": "backup-key-for-tests-0123456789"}  # pragma: allowlist secret

    scratch = Path(tempfile.mkdtemp(prefix="dagma-restore-"))
    scratch.chmod(0o755)  # the restored cluster's Postgres runs unprivileged
    try:
        archive = scratch / "lab.tar.gz"
        done = subprocess.run(
            [sys.executable, "-m", "dagma.services.cli", "backup", str(archive)],
            env={**lab.env, **signed},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=400,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        with tarfile.open(archive, "r:gz") as tar:
            names = set(tar.getnames())
        assert {"lab/postgres/dagster.dump", "lab/manifest.sig"} <= names
        assert not [n for n in names if "mlflow_auth" in n], "MLflow's users are in the archive"
        live = counts(lab.config, json.loads(lab.config.secrets_file.read_text())["postgres"])
        assert (
            live["dagster.runs"] >= 3
            and live["mlflow.runs"] >= 1
            and live["mlflow.model_versions"] >= 1
        )

        home = scratch / "home"
        env = {**lab.env, **signed, "DAGMA_HOME": str(home), "DAGMA_PG_PORT": str(free_port())}
        restored = subprocess.run(
            [sys.executable, "-m", "dagma.services.cli", "restore", str(archive), "--json"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert restored.returncode == 0, restored.stdout + restored.stderr
        report = json.loads(restored.stdout)
        assert report["counts"] == live  # every run, event, metric and model version
        assert not marked_pids(str(home)), "restore left its Postgres running"

        query = np.array([1.0, 0.0, 0.0, 0.0], dtype="float32")
        original, copy = EmbeddedStore(lab.home / "qdrant"), EmbeddedStore(home / "qdrant")
        assert copy.current_version("docs").version == original.current_version("docs").version
        assert copy.search("docs", query, k=3) == original.search("docs", query, k=3)
        artifacts = {
            p.relative_to(lab.config.artifacts_dir) for p in lab.config.artifacts_dir.rglob("*")
        }
        assert {
            p.relative_to(home / "mlflow" / "artifacts")
            for p in (home / "mlflow" / "artifacts").rglob("*")
        } == artifacts

        again = lab.cli("restore", str(archive))  # the live home is not empty: refused
        assert again.returncode != 0 and "not empty" in again.stdout
        assert not list(scratch.glob(".dagma-restore-*")), "the restore left its temp folder"

        # The cluster was built in a temporary folder and renamed: it starts where it is now,
        # and Dagster's events name the new home's files, as in the embedded restore.
        old_paths = _events_naming(lab.config, str(lab.home))
        assert old_paths > 0, "Dagster stores no path of the home: nothing to move"
        moved = ServicesConfig(
            dagma_home=home,
            dagma_pg_port=int(env["DAGMA_PG_PORT"]),
            dagma_mlflow_port=free_port(),
        )
        topology = Topology(moved)
        try:
            topology.up(progress=lambda _: None, only={"postgres", "mlflow"})
            assert counts(moved, moved.passwords()["postgres"]) == live
            assert _events_naming(moved, str(lab.home)) == 0
            assert _events_naming(moved, str(home)) == old_paths
            # Its MLflow made its admin from the new home's password and knows no one else.
            copy = Lab(home=home, env=env, config=moved)
            assert copy.mlflow_get(experiment, ("admin", moved.passwords()["mlflow_admin"])) == 200
            assert copy.mlflow_get(experiment, alice) == 401
        finally:
            topology.down(progress=lambda _: None)
        assert not marked_pids(str(home))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _events_naming(config: ServicesConfig, path: str) -> int:
    """Dagster events that hold a path under `path` (executed notebooks, stored outputs)."""
    import psycopg

    with psycopg.connect(
        host="127.0.0.1",
        port=config.dagma_pg_port,
        user="postgres",
        password=config.passwords()["postgres"],
        dbname="dagster",
        connect_timeout=10,
    ) as conn:
        row = conn.execute(
            "SELECT count(*) FROM event_logs WHERE strpos(event, %s) > 0", (path + "/",)
        ).fetchone()
    return int(row[0]) if row else 0


def _processes_under(folder: Path) -> list[int]:
    """Live processes started for any home under `folder`, a restore's temporary one included."""
    prefix = f"{MARKER}={folder}/".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(v.startswith(prefix) for v in environ) and pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def _manifest(archive: Path) -> dict[str, Any]:
    with tarfile.open(archive, "r:gz") as tar:
        member = tar.extractfile("lab/manifest.json")
        assert member is not None
        return dict(json.load(member))


def _restore(
    lab: Lab, archive: Path, home: Path, port: int, *args: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dagma.services.cli", "restore", str(archive), *args],
        env={**lab.env, "DAGMA_HOME": str(home), "DAGMA_PG_PORT": str(port)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _said(done: subprocess.CompletedProcess[str]) -> str:
    """The CLI's output with the console's line wrapping undone."""
    return " ".join((done.stdout + done.stderr).split())


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="dagma-restore-"))
    folder.chmod(0o755)  # the restored cluster's Postgres runs unprivileged
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _good_archive(lab: Lab, scratch: Path) -> Path:
    """The backup taken while MLflow wrote (the test before), or a new one."""
    archive = scratch / "lab.tar.gz"
    if not archive.exists():
        done = lab.cli("backup", str(archive))
        assert done.returncode == 0, done.stdout + done.stderr
    return archive


def test_a_backup_taken_while_mlflow_writes_restores_with_the_counts_of_its_snapshot(
    lab, scratch, monkeypatch
):
    from mlflow import MlflowClient

    from dagma.services.backup import counts

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", lab.mlflow_password())
    client = MlflowClient(tracking_uri=lab.config.mlflow_url)
    experiment = client.get_experiment_by_name("dagma")
    assert experiment is not None
    run = client.create_run(experiment.experiment_id, run_name="backup-while-writing")
    stop, written, errors = threading.Event(), [0], []
    secrets = json.loads(lab.config.secrets_file.read_text())

    def write() -> None:
        """Metric rows of that run, one transaction each, as the MLflow server's role: as fast
        as the database takes them, so no gap of a backup goes without a write."""
        import psycopg

        try:
            with psycopg.connect(
                host="127.0.0.1",
                port=lab.config.dagma_pg_port,
                user="mlflow",
                password=secrets["mlflow"],
                dbname="mlflow",
                autocommit=True,
                connect_timeout=10,
            ) as conn:
                while not stop.is_set():
                    conn.execute(
                        "INSERT INTO metrics (key, value, timestamp, run_uuid, step, is_nan) "
                        "VALUES ('written', %s, %s, %s, %s, false)",
                        (written[0], int(time.time() * 1000), run.info.run_id, written[0]),
                    )
                    written[0] += 1
        except Exception as exc:
            errors.append(exc)

    writer = threading.Thread(target=write, daemon=True)
    password = secrets["postgres"]
    archive = scratch / "lab.tar.gz"
    writer.start()
    try:
        deadline = time.monotonic() + 60
        while written[0] < 5 and not errors:
            assert time.monotonic() < deadline, "the writer wrote nothing"
            time.sleep(0.05)
        before = counts(lab.config, password)
        done = lab.cli("backup", str(archive))
        after = counts(lab.config, password)
    finally:
        stop.set()
        writer.join(60)
        client.set_terminated(run.info.run_id)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not errors, errors
    recorded = _manifest(archive)["counts"]
    # The snapshot fell between rows written before and after it: the lab wrote throughout.
    assert before["mlflow.metrics"] < recorded["mlflow.metrics"] < after["mlflow.metrics"]

    home = scratch / "while-writing"
    restored = _restore(lab, archive, home, free_port(), "--json")
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert json.loads(restored.stdout)["counts"] == recorded
    assert not _processes_under(scratch)
    shutil.rmtree(home)


def test_a_failed_or_killed_restore_leaves_nothing_and_the_next_restore_succeeds(lab, scratch):
    from dagma.backup import write_archive

    archive = _good_archive(lab, scratch)
    # A damaged dump whose checksums are right: pg_restore restores dagster, then fails midway
    # through mlflow's data.
    unpacked = scratch / "unpacked"
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(unpacked, filter="data")
    staging = unpacked / "lab"
    manifest = json.loads((staging / "manifest.json").read_text())
    (staging / "manifest.json").unlink()
    dump = staging / "postgres" / "mlflow.dump"
    dump.write_bytes(dump.read_bytes()[: dump.stat().st_size // 2])
    del manifest["files"]
    damaged = scratch / "damaged.tar.gz"
    write_archive(staging, manifest, damaged)
    shutil.rmtree(unpacked)

    home, port = scratch / "home", free_port()

    def nothing_left() -> None:
        assert not home.exists(), sorted(p.name for p in home.iterdir())
        assert not list(scratch.glob(".dagma-restore-*"))
        assert not _processes_under(scratch), "a Postgres of the restore is still running"
        assert not port_in_use(port)

    failed = _restore(lab, damaged, home, port)
    said = _said(failed)
    assert failed.returncode != 0, said
    assert "pg_restore of database 'mlflow'" in said and str(damaged) in said, said
    assert "postgres: restored dagster" in said, said  # it failed midway, not at the start
    assert f"Nothing was restored: {home} is as it was" in said, said
    assert "run the restore again" in said, said
    nothing_left()

    # Killed once its Postgres runs: the folder and the Postgres stay until the next restore.
    killed = subprocess.Popen(
        [sys.executable, "-m", "dagma.services.cli", "restore", str(archive)],
        env={**lab.env, "DAGMA_HOME": str(home), "DAGMA_PG_PORT": str(port)},
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not port_in_use(port):
        assert killed.poll() is None, "the restore ended before its Postgres started"
        assert time.monotonic() < deadline, "the restore's Postgres never started"
        time.sleep(0.2)
    killed.send_signal(signal.SIGKILL)
    killed.wait(30)
    left = list(scratch.glob(".dagma-restore-*"))
    assert len(left) == 1 and _processes_under(scratch), "the kill left nothing to clean up"
    assert not home.exists()

    done = _restore(lab, archive, home, port)
    said = _said(done)
    assert done.returncode == 0, said
    assert f"removed {left[0]}, left by a restore that was killed" in said, said
    assert "Restored" in said and f"into {home}" in said, said
    assert not list(scratch.glob(".dagma-restore-*"))
    assert not _processes_under(scratch) and not port_in_use(port)
    assert (home / "postgres" / "data" / "PG_VERSION").is_file()
    assert (home / "mlflow" / "artifacts").is_dir()


def _sensor(lab: Lab, mutation: str, name: str) -> str:
    query = f"""mutation($s: SensorSelector!) {{
      {mutation}(sensorSelector: $s) {{
        __typename ... on Sensor {{ sensorState {{ status }} }} ... on PythonError {{ message }}
      }}
    }}"""
    selector = {
        "repositoryLocationName": LOCATION,
        "repositoryName": REPOSITORY,
        "sensorName": name,
    }
    result = lab.graphql()._execute(query, {"s": selector})[mutation]
    assert result["__typename"] == "Sensor", result
    return str(result["sensorState"]["status"])


def _runs_tagged(lab: Lab, key: str, value: str) -> list[dict[str, Any]]:
    query = """query($tags: [ExecutionTag!]) {
      runsOrError(filter: {tags: $tags}) {
        ... on Runs { results { runId status tags { key value } } }
      }
    }"""
    data = lab.graphql()._execute(query, {"tags": [{"key": key, "value": value}]})
    return [
        {**r, "tags": {t["key"]: t["value"] for t in r["tags"]}}
        for r in data["runsOrError"]["results"]
    ]


def test_the_daemon_ingests_a_landed_file_and_scores_its_day_with_no_click(lab):
    """With the sensors on (what DAGMA_AUTOMATION=true does at start), a CSV dropped into the
    inbox is ingested by the inbox sensor's run, and the automation sensor then scores the day."""
    import pickle

    from dagma.lib import arrivals

    assert lab.runs, "the demo run did not start"
    sample = arrivals.write_sample(lab.home / "inbox", rows=12, seed=5)
    hour = arrivals.Landed(sample, sample.stat().st_mtime_ns).hour
    day = hour[:10]
    try:
        for name in ("inbox_arrivals", "notebook_automation"):
            assert _sensor(lab, "startSensor", name) == "RUNNING"
        deadline = time.monotonic() + 420
        ingested: list[dict[str, Any]] = []
        scored: list[dict[str, Any]] = []
        while time.monotonic() < deadline and not scored:
            ingested = [
                r
                for r in _runs_tagged(lab, "dagster/partition", hour)
                if r["tags"].get("dagster/sensor_name") == "inbox_arrivals"
            ]
            scored = [
                r
                for r in _runs_tagged(lab, "dagster/partition", day)
                if r["status"] == "SUCCESS" and "dagster/from_automation_condition" in r["tags"]
            ]
            time.sleep(3)
        assert [r["status"] for r in ingested] == ["SUCCESS"], (ingested, failures(lab))
        assert scored, (_runs_tagged(lab, "dagster/partition", day), failures(lab))
    finally:
        for name in ("inbox_arrivals", "notebook_automation"):
            _sensor(lab, "resetSensor", name)  # back to the code's default: stopped
    stored = lab.config.dagster_home / "storage" / "wine_arrival_scores" / day
    with open(stored, "rb") as fh:
        frame = pickle.load(fh)  # nosec B301 # this lab's own IO manager wrote it
    assert len(frame) == 12 and set(frame["source_file"]) == {sample.name}
    assert (frame["predicted"] == frame["target"]).mean() >= 0.8  # labelled samples, scored


def test_killed_postgres_is_reported_and_up_restores_it_with_its_data(lab):
    with lab.dagster_db() as conn:
        events_before = conn.execute("SELECT count(*), max(id) FROM event_logs").fetchone()
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
    with lab.dagster_db() as conn:
        events_after = conn.execute(
            "SELECT count(*) FROM event_logs WHERE id <= %s", (events_before[1],)
        ).fetchone()
    assert events_after[0] == events_before[0]  # every event written before the kill is there

    # The daemon and the queue work again: a new run is dequeued, launched and succeeds.
    after = lab.graphql().submit_job_execution(
        JOB,
        repository_location_name=LOCATION,
        repository_name=REPOSITORY,
        asset_selection=["wine_table"],
        run_config={"execution": {"config": {"in_process": {}}}},
    )
    assert wait_for(lab, [after], timeout=300)[-1] == ("SUCCESS",), failures(lab)


def dagma(lab: Lab, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dagma.cli", *args],
        env=env or lab.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def materializations(lab: Lab, run_id: str) -> dict[str, dict[str, Any]]:
    """Each asset the run materialized -> its metadata, as Dagster stored it."""
    with lab.dagster_db() as conn:
        rows = conn.execute(
            "SELECT event FROM event_logs WHERE run_id = %s "
            "AND dagster_event_type = 'ASSET_MATERIALIZATION' ORDER BY id",
            (run_id,),
        ).fetchall()
    found = {}
    for (event,) in rows:
        data = json.loads(event)["dagster_event"]["event_specific_data"]["materialization"]
        key = "/".join(data["asset_key"]["path"])
        found[key] = {m["label"]: m["entry_data"] for m in data["metadata_entries"]}
    return found


@contextlib.contextmanager
def pushgateway() -> Iterator[tuple[str, list[tuple[str, str, str]]]]:
    """A stand-in Pushgateway on a free port: its URL and each (method, path, body) it got."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    received: list[tuple[str, str, str]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_PUT(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            received.append(("PUT", self.path, body.decode()))
            self.send_response(200)
            self.end_headers()

        do_POST = do_PUT

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()


def test_dagma_run_takes_the_warm_lab_and_matches_a_cold_local_run(lab, tmp_path):
    """With the services up, `dagma run` goes through the webserver to a run worker forked from
    the warm code server, on a spare kernel; a cold run in a fresh embedded home of the same
    selection gives the same assets, metadata and metrics, and pushes its Prometheus figures
    to a Pushgateway when asked (the warm one's are the services' exporter's)."""
    selection = ["wine_table", "wine_model"]
    with pushgateway() as (gateway, pushed):
        warm = dagma(lab, "run", *selection, "--push-metrics", gateway)
    assert warm.returncode == 0, warm.stdout + warm.stderr + "\n".join(failures(lab))
    assert "in the lab's services" in warm.stdout
    assert "Not pushed: the run was in the lab's services" in warm.stdout and not pushed
    run_id = warm.stdout.split("Dagster UI: ")[1].split("/runs/")[1].split()[0]
    warm_meta = materializations(lab, run_id)
    assert sorted(warm_meta) == sorted(selection)
    assert "spare" in json.dumps(warm_meta["wine_model"]["kernel"])  # started ahead of time

    cold_env = {
        k: v
        for k, v in lab.env.items()
        if not k.startswith("DAGMA_") or k in ("DAGMA_NOTEBOOKS_DIR", "DAGMA_AUTOMATION")
    }
    cold_env["DAGMA_HOME"] = str(tmp_path / "cold")
    with pushgateway() as (gateway, pushed):
        cold = dagma(lab, "run", *selection, env={**cold_env, "DAGMA_METRICS_PUSH_URL": gateway})
    assert cold.returncode == 0, cold.stdout + cold.stderr
    assert "in the lab's services" not in cold.stdout
    assert f"Pushed the run's metrics to {gateway}" in cold.stdout, cold.stdout
    # prometheus_client's push: PUT /metrics/job/<job>, the exposition as the body.
    assert [(method, path) for method, path, _ in pushed] == [("PUT", "/metrics/job/dagma_run")]
    body = pushed[0][2]
    for asset in selection:
        assert f'dagma_asset_steps_total{{asset="{asset}",outcome="success"}} 1.0' in body, body
    assert 'dagma_runs_total{outcome="success"} 1.0' in body, body
    assert (
        'dagma_notebook_phase_duration_seconds_count{notebook="wine_model",phase="execute"}' in body
    )
    import dagster as dg

    with dg.DagsterInstance.from_config(str(tmp_path / "cold" / "dagster")) as instance:
        cold_meta = {}
        for key in selection:
            event = instance.get_latest_materialization_event(dg.AssetKey(key))
            assert event is not None and event.asset_materialization is not None
            cold_meta[key] = dict(event.asset_materialization.metadata)
    for key in selection:
        assert set(cold_meta[key]) == set(warm_meta[key]), key
    stored = warm_meta["wine_model"]["value"]["data"]
    warm_value = json.loads(stored) if isinstance(stored, str) else stored
    cold_value = cold_meta["wine_model"]["value"].value
    assert warm_value["metrics"] == cold_value["metrics"]  # reproducible down to the metric
    assert warm_value["params"] == cold_value["params"]


def nap_run(lab: Lab, pause: float) -> tuple[str, int]:
    """Launch the nap notebook and wait until its kernel sleeps; its run id and kernel pid."""
    marker = Path(lab.env["NAP_MARKER"])
    marker.unlink(missing_ok=True)
    run_id = lab.graphql().submit_job_execution(
        JOB,
        repository_location_name=LOCATION,
        repository_name=REPOSITORY,
        asset_selection=["nap"],
        run_config={"ops": {"nap": {"config": {"pause": pause}}}},
    )
    deadline = time.monotonic() + 180
    while not marker.exists() or not marker.read_text():
        assert time.monotonic() < deadline, ("the nap never started", failures(lab))
        time.sleep(0.2)
    return run_id, int(marker.read_text())


def test_cancelling_a_run_on_a_spare_kernel_stops_the_kernel(lab):
    run_id, kernel = nap_run(lab, 600)
    claims = [Ticket.read(p) for p in (lab.home / "kernels" / "claimed").glob("*.json")]
    assert [t.run_id for t in claims if t and t.pid == kernel] == [run_id], "a spare kernel"
    lab.graphql().terminate_run(run_id)
    seen = wait_for(lab, [run_id], timeout=180)
    assert seen[-1] == ("CANCELED",)
    deadline = time.monotonic() + 30
    while pid_alive(kernel):
        assert time.monotonic() < deadline, "the cancelled run's kernel is still running"
        time.sleep(0.2)
    assert not [
        p
        for p in (lab.home / "kernels" / "claimed").glob("*.json")
        if (t := Ticket.read(p)) and t.run_id == run_id
    ]


def test_a_killed_code_server_leaves_no_run_started_and_up_brings_it_back_warm(lab):
    run_id, kernel = nap_run(lab, 600)
    server = Topology(lab.config).records()["code-server"].pid
    os.kill(server, signal.SIGKILL)  # the warm process itself, mid-run
    seen = wait_for(lab, [run_id], timeout=300)
    assert seen[-1] in (("FAILURE",), ("SUCCESS",)), seen[-1]
    assert not pid_alive(kernel)
    up = lab.cli("up")
    assert up.returncode == 0, up.stdout + up.stderr
    again, _ = nap_run(lab, 0.0)
    assert wait_for(lab, [again], timeout=300)[-1] == ("SUCCESS",), failures(lab)


def test_a_run_the_lab_refuses_is_an_error_that_says_why(lab):
    from dagma.services import remote

    url = remote.webserver(lab.config)
    assert url == f"http://127.0.0.1:{lab.config.dagma_dagster_port}"
    assert remote.runnable_here(url, ["nap"])
    assert not remote.runnable_here(url, ["wine_daily_scores"]), "partitioned: planned locally"
    assert not remote.runnable_here(url, ["no_such_asset"])
    with pytest.raises(remote.RemoteRunError, match=r"refused the run \(RunConfigValidation"):
        remote.submit(url, ["nap"], {"ops": {"nap": {"config": {"no_such_parameter": 1}}}}, {})
