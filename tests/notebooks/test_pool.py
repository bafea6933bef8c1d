"""Two runs that write the same collection are serialised by a Dagster concurrency pool."""

import os
import shutil
import subprocess
import sys
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
    "import time\nfrom dagma import nb\nctx = nb.context()\nstore = ctx.vector_store()\n"
    "with store.held('docs'):\n    time.sleep(pause)\nctx.output({'pid': __import__('os').getpid()})"
)


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
        params='asset = {"pool": "dagma_vectors"}\npause: float = 4.0',
        body=WRITER,
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DAGSTER_HOME", "MLFLOW_TRACKING_URI", "QDRANT_URL")
    }
    env.update(DAGMA_NOTEBOOKS_DIR=str(folder), DAGMA_HOME=str(tmp_path / "home"))
    dagma = [sys.executable, "-m", "dagma.cli", "run", "writer"]
    first = subprocess.run(
        [*dagma, "-p", "writer.pause=0"], env=env, capture_output=True, text=True
    )  # nosec B603
    assert first.returncode == 0, first.stdout + first.stderr  # creates the instance once

    both = [
        subprocess.Popen(
            dagma, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )  # nosec B603
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in both]
    assert [p.returncode for p in both] == [0, 0], outputs
    assert not any("locked by another writer" in out for out in outputs)
    _, (a_start, a_end), (b_start, b_end) = spans(tmp_path / "home")
    assert b_start >= a_end or a_start >= b_end, "the two writers overlapped"
    assert EmbeddedStore(tmp_path / "home" / "qdrant").collections() == []  # held, never published


def test_a_pool_that_is_not_a_name_is_refused(tmp_path: Path):
    from dagma.notebooks.spec import NotebookError, parse_notebook

    path = write_nb(tmp_path / "bad.ipynb", params='asset = {"pool": "two words"}\nn: int = 1')
    with pytest.raises(NotebookError, match=r"asset\['pool'\]` must be a snake_case pool name"):
        parse_notebook(path)
