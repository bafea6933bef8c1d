"""Two runs that write the same collection are serialised by a Dagster concurrency pool; the
one that waits says which run holds the pool, and waits without burning CPU."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from dagma.lib.vectors import EmbeddedStore
from dagma.settings import PROJECT_ROOT
from tests.notebooks.test_spec import write_nb

pytestmark = pytest.mark.integration

# Holds the collection's writer lock for a while, as a long publish does: a second writer
# running at the same time would fail with "locked by another writer".
WRITER = (
    "import os, time\nfrom dagma import nb\nctx = nb.context()\nstore = ctx.vector_store()\n"
    "with store.held('docs'):\n    open(os.environ['POOL_MARKER'], 'a').write('held\\n')\n"
    "    time.sleep(pause)\nctx.output({'pid': os.getpid()})"
)


def cpu_seconds(pid: int) -> float:
    """User and system CPU time a process (not its children) has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def spans(home: Path) -> list[tuple[float, float]]:
    kind = dg.DagsterEventType
    wanted = (kind.STEP_START, kind.STEP_SUCCESS, kind.STEP_FAILURE)
    with dg.DagsterInstance.from_config(str(home / "dagster")) as instance:
        out = []
        for run in instance.get_runs():
            times = {}
            for entry in instance.all_logs(run.run_id):
                event = entry.dagster_event
                if event and entry.step_key == "writer" and event.event_type in wanted:
                    times[event.event_type] = entry.timestamp
            out.append((times[kind.STEP_START], times.get(kind.STEP_SUCCESS, 0.0)))
        return sorted(out)


def test_two_runs_writing_one_collection_wait_for_each_other(tmp_path: Path):
    folder = tmp_path / "notebooks"
    shutil.copytree(PROJECT_ROOT / "notebooks", folder)
    write_nb(
        folder / "writer.ipynb",
        params='asset = {"pool": "dagma_vectors"}\npause: float = 12.0',
        body=WRITER,
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DAGSTER_HOME", "MLFLOW_TRACKING_URI", "QDRANT_URL")
    }
    marker = tmp_path / "held"
    env.update(
        DAGMA_NOTEBOOKS_DIR=str(folder), DAGMA_HOME=str(tmp_path / "home"), POOL_MARKER=str(marker)
    )
    dagma = [sys.executable, "-m", "dagma.cli", "run", "writer"]
    first = subprocess.run(
        [*dagma, "-p", "writer.pause=0"], env=env, capture_output=True, text=True
    )  # nosec B603
    assert first.returncode == 0, first.stdout + first.stderr  # creates the instance once
    marker.unlink()

    both = [
        subprocess.Popen(
            dagma, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )  # nosec B603
        for _ in range(2)
    ]
    deadline = time.monotonic() + 120
    while not marker.exists():  # one of them holds the pool now, for `pause` seconds
        assert time.monotonic() < deadline, "neither run reached the pool"
        time.sleep(0.2)
    time.sleep(1.0)
    before = [cpu_seconds(p.pid) for p in both]
    time.sleep(5.0)
    used = [cpu_seconds(p.pid) - b for p, b in zip(both, before, strict=True)]
    outputs = [p.communicate(timeout=300)[0] for p in both]
    assert [p.returncode for p in both] == [0, 0], outputs
    # Waiting (and holding, while the kernel sleeps) costs the CLI almost no CPU: a polling
    # loop would burn most of the 5 s window; a loaded CI machine adds up to a second of noise.
    assert max(used) < 2.0, used
    waiting = [out for out in outputs if "waits for pool dagma_vectors" in out]
    assert len(waiting) == 1, outputs
    holder = next(out for out in outputs if out is not waiting[0])
    holder_run = holder.split("Run ", 1)[1].split(":", 1)[0].strip()
    assert f"held by run {holder_run[:8]} (writer)" in waiting[0], waiting[0]
    assert not any("locked by another writer" in out for out in outputs)
    _, (a_start, a_end), (b_start, b_end) = spans(tmp_path / "home")
    assert b_start >= a_end or a_start >= b_end, "the two writers overlapped"
    assert EmbeddedStore(tmp_path / "home" / "qdrant").collections() == []  # held, never published


def test_a_pool_that_is_not_a_name_is_refused(tmp_path: Path):
    from dagma.notebooks.spec import NotebookError, parse_notebook

    path = write_nb(tmp_path / "bad.ipynb", params='asset = {"pool": "two words"}\nn: int = 1')
    with pytest.raises(NotebookError, match=r"asset\['pool'\]` must be a snake_case pool name"):
        parse_notebook(path)
