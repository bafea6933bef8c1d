"""SIGKILL `dagma run` halfway through a pooled notebook's publish: the next status fails the run,
frees its pool slot, stops every process it started and removes its half-built version; its
MLflow run does not stay RUNNING, readers still see the last complete collection, and a re-run
works without help."""

import fcntl
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

from dagma.lib.processes import tagged
from dagma.lib.vectors import EmbeddedStore
from dagma.notebooks.kernel_pool import Ticket
from dagma.notebooks.papermill_engine import RUN_ENV
from dagma.settings import PROJECT_ROOT
from tests.notebooks.test_spec import write_nb

pytestmark = pytest.mark.integration

# Starts its MLflow run and publishes a new version of "docs"; after the first point is written
# (the writer lock held, the version half-built) it says so and waits `pause` seconds.
SLOW = """import os, time
import numpy as np
from dagma import nb
from dagma.lib.vectors import point_id
def halfway(done):
    if done == 1:
        open(os.environ["SLOW_MARKER"], "w").write("started")
        time.sleep(pause)
ctx = nb.context()
with ctx.start_run():
    ids = [point_id("docs", str(i)) for i in range(3)]
    vectors = np.eye(3, 4, k=version % 2, dtype="float32")
    published = ctx.vector_store().publish(
        "docs", ids, vectors, [{"n": i} for i in range(3)], batch_size=1, progress=halfway
    )
ctx.output({"version": published.version})"""


def dagma(*args: str) -> list[str]:
    return [sys.executable, "-m", "dagma.cli", *args]


def started_by(marker: str) -> dict[int, dict[bytes, bytes]]:
    """The live processes started with this test's environment, and their environments."""
    found = {}
    for pid in tagged("SLOW_MARKER", marker):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        found[pid] = dict(item.split(b"=", 1) for item in environ if b"=" in item)
    return found


def lock_is_free(folder: Path) -> bool:
    with open(folder / ".lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(lock, fcntl.LOCK_UN)
        return True


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
        stdout=(tmp_path / "victim.log").open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while not (tmp_path / "marker").exists():
        assert victim.poll() is None and time.monotonic() < deadline, (
            "the run never started: " + (tmp_path / "victim.log").read_text()[-3000:]
        )
        time.sleep(0.2)
    docs = home / "qdrant" / "docs"
    assert list(docs.glob(".building-*")) and not lock_is_free(docs)  # caught mid-publish
    os.kill(victim.pid, signal.SIGKILL)  # the CLI alone, as the OOM killer does
    victim.wait(timeout=30)
    orphans = started_by(env["SLOW_MARKER"])
    # Its kernel goes on running the notebook, with no one waiting, and still holds the lock.
    kernel_runs = {e[RUN_ENV.encode()].decode() for e in orphans.values() if RUN_ENV.encode() in e}
    # A spare kernel started before its run: the pool's claim names the run instead.
    claims = [Ticket.read(p) for p in (home / "kernels" / "claimed").glob("*.json")]
    kernel_runs |= {t.run_id for t in claims if t is not None and t.pid in orphans and t.run_id}
    assert len(kernel_runs) == 1
    assert not lock_is_free(docs)

    status = subprocess.run(dagma("status", "--json"), env=env, capture_output=True, text=True)
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    [killed] = report["reaped"]
    assert any(killed in problem for problem in report["problems"])
    assert kernel_runs == {killed}
    # Nothing the dead run started is left: its kernel, Dagster's log followers, nothing.
    assert started_by(env["SLOW_MARKER"]) == {}
    assert tagged(RUN_ENV, killed) == []
    assert lock_is_free(docs)
    assert list(docs.glob(".building-*")) == []  # the half-built version is gone
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
    from dagma.reaping import OWNER_ENV, stop_processes_of

    def start(**tags: str) -> subprocess.Popen[bytes]:
        env = {**os.environ, **tags}
        return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], env=env)

    gone = subprocess.Popen(["true"])  # a pid that is certainly dead: the owner that was killed
    gone.wait()
    dead = start(**{RUN_ENV: "dead-run"})
    orphan = start(**{OWNER_ENV: str(gone.pid)})  # e.g. a `tail -F` its dead owner started
    other_run = start(**{RUN_ENV: "dead-run-2"})
    live_owner = start(**{OWNER_ENV: str(os.getpid())})  # this process is alive
    procs = (dead, orphan, other_run, live_owner)
    try:
        deadline = time.monotonic() + 10
        while len(tagged(RUN_ENV, "dead-run")) + len(tagged(OWNER_ENV, str(gone.pid))) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert stop_processes_of("dead-run") == [dead.pid]  # no owner given: the kernels only
        assert orphan.poll() is None
        assert stop_processes_of("dead-run", owner=gone.pid) == [orphan.pid]
        assert stop_processes_of("dead-run", owner=os.getpid()) == []  # a live owner's are kept
        assert dead.wait(timeout=10) == orphan.wait(timeout=10) == -signal.SIGKILL
        assert other_run.poll() is None and live_owner.poll() is None  # others left alone
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
