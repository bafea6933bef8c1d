"""SIGKILL `dagma run` halfway through a pooled notebook: the next status fails the run and
frees its pool slot, its MLflow run does not stay RUNNING, readers still see the last complete
collection, and a re-run works without help."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import mlflow
import numpy as np
import pytest

from dagma.lib.vectors import EmbeddedStore
from dagma.notebooks.papermill_engine import RUN_ENV, kernels_of
from dagma.settings import PROJECT_ROOT
from tests.notebooks.test_spec import write_nb

pytestmark = pytest.mark.integration

# Starts its MLflow run, says so, waits `pause` seconds, then publishes a new version of "docs".
SLOW = """import os, time
import numpy as np
from dagma import nb
from dagma.lib.vectors import point_id
ctx = nb.context()
with ctx.start_run():
    open(os.environ["SLOW_MARKER"], "w").write("started")
    time.sleep(pause)
    ids = [point_id("docs", str(i)) for i in range(3)]
    vectors = np.eye(3, 4, k=version % 2, dtype="float32")
    published = ctx.vector_store().publish("docs", ids, vectors, [{"n": i} for i in range(3)])
ctx.output({"version": published.version})"""


def dagma(*args: str) -> list[str]:
    return [sys.executable, "-m", "dagma.cli", *args]


def kernel_runs(marker: str) -> set[str]:
    """The run ids of the live kernels started with this test's environment."""
    runs = set()
    for entry in Path("/proc").iterdir():
        try:
            env = dict(
                item.split(b"=", 1)
                for item in (entry / "environ").read_bytes().split(b"\0")
                if b"=" in item
            )
        except OSError:
            continue
        if env.get(b"SLOW_MARKER") == marker.encode() and RUN_ENV.encode() in env:
            runs.add(env[RUN_ENV.encode()].decode())
    return runs


def test_a_killed_run_is_failed_on_the_next_status_and_nothing_half_written_is_seen(
    tmp_path: Path,
):
    folder = tmp_path / "notebooks"
    shutil.copytree(PROJECT_ROOT / "notebooks", folder)
    params = 'asset = {"pool": "dagma_vectors"}\npause: float = 0.0\nversion: int = 1'
    write_nb(folder / "slow.ipynb", params=params, body=SLOW)
    home = tmp_path / "home"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DAGSTER_HOME", "MLFLOW_TRACKING_URI", "QDRANT_URL")
    }
    env.update(
        DAGMA_NOTEBOOKS_DIR=str(folder),
        DAGMA_HOME=str(home),
        SLOW_MARKER=str(tmp_path / "marker"),
    )
    first = subprocess.run(dagma("run", "slow"), env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stdout + first.stderr
    store = EmbeddedStore(home / "qdrant")
    before = store.current_version("docs")
    query = np.array([1.0, 0.0, 0.0, 0.0], dtype="float32")
    hits_before = store.search("docs", query, k=3)

    (tmp_path / "marker").unlink()
    victim = subprocess.Popen(
        dagma("run", "slow", "-p", "slow.pause=300", "-p", "slow.version=2"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while not (tmp_path / "marker").exists():
        assert victim.poll() is None and time.monotonic() < deadline, "the run never started"
        time.sleep(0.2)
    os.kill(victim.pid, signal.SIGKILL)  # the CLI alone, as the OOM killer does
    victim.wait(timeout=30)
    orphans = kernel_runs(env["SLOW_MARKER"])
    assert len(orphans) == 1  # its kernel goes on running the notebook, with no one waiting

    status = subprocess.run(dagma("status", "--json"), env=env, capture_output=True, text=True)
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    [killed] = report["reaped"]
    assert any(killed in problem for problem in report["problems"])
    assert orphans == {killed}
    deadline = time.monotonic() + 10
    while kernels_of(killed) and time.monotonic() < deadline:  # SIGKILLed, then reaped by init
        time.sleep(0.1)
    assert kernels_of(killed) == []  # the dead run's kernel is stopped
    pools = {p["pool"]: p for p in report["pools"]}
    assert pools["dagma_vectors"]["held_by"] == []  # dagma status lists the slots held now
    with dg.DagsterInstance.from_config(str(home / "dagster")) as instance:
        run = instance.get_run_by_id(killed)
        assert run.status == dg.DagsterRunStatus.FAILURE
        assert instance.get_runs_count(dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED])) == 0
        # The dead run's slot in the pool is free again: nothing waits for it.
        assert killed not in instance.event_log_storage.get_concurrency_run_ids()
        assert instance.event_log_storage.get_concurrency_info("dagma_vectors").claimed_slots == []

    client = mlflow.MlflowClient(f"sqlite:///{home / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("dagma")
    runs = client.search_runs([experiment.experiment_id])
    assert {r.info.status for r in runs} == {"FINISHED", "KILLED"}
    assert not [r for r in runs if r.info.status == "RUNNING"]

    store = EmbeddedStore(home / "qdrant")
    assert store.current_version("docs") == before
    assert store.search("docs", query, k=3) == hits_before

    again = subprocess.run(
        dagma("run", "slow", "-p", "slow.version=2"),
        env=env,
        capture_output=True,
        text=True,
        timeout=180,  # a slot the dead run still held would make it wait forever
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert store.current_version("docs").version == before.version + 1


def test_a_dead_runs_tagged_processes_are_stopped_and_no_other():
    from dagma.lab import stop_kernels_of

    def tagged(run_id: str) -> subprocess.Popen[bytes]:
        env = {**os.environ, RUN_ENV: run_id}
        return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], env=env)

    dead, alive = tagged("dead-run"), tagged("dead-run-2")
    try:
        deadline = time.monotonic() + 10
        while not kernels_of("dead-run") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stop_kernels_of("dead-run") == [dead.pid]
        assert dead.wait(timeout=10) == -signal.SIGKILL
        assert alive.poll() is None  # another run's kernel is left alone
    finally:
        for proc in (dead, alive):
            proc.kill()
            proc.wait()
