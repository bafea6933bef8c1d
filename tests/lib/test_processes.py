"""A process is known by its pid and its start time: a pid reused by another process (after a
reboot, or once the pid space wraps) is neither judged alive nor signalled."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from dagma.lib import processes


@pytest.fixture
def other() -> Iterator[subprocess.Popen]:
    """A live process that is not ours: what a recorded pid may belong to after a reboot."""
    proc = subprocess.Popen(["sleep", "120"], start_new_session=True)
    yield proc
    proc.kill()
    proc.wait()


def test_a_process_is_the_same_only_with_its_own_start_time(other: subprocess.Popen) -> None:
    started, mine = processes.start_time(other.pid), processes.start_time(os.getpid())
    assert started is not None and mine is not None and started >= mine
    assert processes.same_process(other.pid, started)
    assert not processes.same_process(other.pid, started - 1)  # a reused pid
    assert processes.same_process(other.pid, None)  # start time unknown: liveness alone


def test_a_gone_process_has_no_start_time() -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert processes.start_time(gone.pid) is None
    assert not processes.same_process(gone.pid, None)


def test_a_name_with_a_parenthesis_does_not_shift_the_fields(tmp_path: Path) -> None:
    stat = "4242 (evil) 1 2 3) S 1 4242 4242 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 98765 0 0"
    (tmp_path / "4242").mkdir()
    (tmp_path / "4242" / "stat").write_text(stat)
    assert processes.start_time(4242, proc=tmp_path) == 98765
    assert processes.same_process(4242, 98765, proc=tmp_path)


@pytest.mark.integration
def test_a_run_whose_pid_now_belongs_to_another_process_is_reaped_and_that_process_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, other: subprocess.Popen
) -> None:
    """A run left STARTED by a crash, its pid taken by another process: the run is failed, and
    the process that now has the pid is not stopped; a run whose process lives stays."""
    import dagster as dg
    from dagster._core.storage.dagster_run import DagsterRun

    from dagma.reaping import HOST_TAG, PID_TAG, START_TAG, own_processes, reap_dead_runs
    from dagma.settings import Settings

    monkeypatch.setenv("DAGMA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    settings = Settings()
    settings.ensure_dirs()
    started = processes.start_time(other.pid)
    assert started is not None
    recycled = {PID_TAG: str(other.pid), HOST_TAG: socket.gethostname()}
    recycled[START_TAG] = str(started - 1)
    with dg.DagsterInstance.from_config(str(settings.dagster_dir)) as instance:
        runs = [
            instance.add_run(DagsterRun(job_name="j", status=dg.DagsterRunStatus.STARTED, tags=t))
            for t in (recycled, own_processes())
        ]
        assert reap_dead_runs(instance, settings) == [runs[0].run_id]
        statuses = [instance.get_run_by_id(r.run_id).status for r in runs]  # type: ignore[union-attr]
    assert statuses == [dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.STARTED]
    assert other.poll() is None
