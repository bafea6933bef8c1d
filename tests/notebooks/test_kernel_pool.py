"""Spare kernels: started ahead, pre-warmed, one notebook each, nothing left behind."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dagma.lib import processes
from dagma.notebooks import kernel_pool, kernel_warmup
from dagma.notebooks.kernel_pool import KernelPool, PoolError, Ticket
from dagma.notebooks.papermill_engine import Limits
from dagma.notebooks.runner import PapermillEngine, execute
from dagma.notebooks.spec import parse_notebook
from tests.notebooks.test_runner import target
from tests.notebooks.test_spec import write_nb

pytestmark = pytest.mark.integration


def wait_for(predicate, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s")


def spare_pids(folder: Path) -> list[int]:
    return [t.pid for t in (Ticket.read(p) for p in (folder / "spare").glob("*.json")) if t]


def test_no_state_leaks_from_one_notebook_to_the_next_on_spare_kernels(tmp_path: Path):
    """Notebook A changes every kind of kernel state; B, on the next spare kernel, sees none."""
    pool_dir = tmp_path / "kernels"
    messy = write_nb(
        tmp_path / "messy.ipynb",
        params="n: int = 1",
        body=textwrap.dedent(
            """
            import builtins, os, sys, types, json as renamed
            leaked_name = 41 + n
            os.environ["DAGMA_TEST_LEAK"] = "yes"
            builtins.dagma_test_leak = True
            sys.modules["dagma_test_leak"] = types.ModuleType("dagma_test_leak")
            os.chdir("/")
            from dagma import nb
            nb.context().output(os.getpid())
            """
        ),
    )
    clean = write_nb(
        tmp_path / "clean.ipynb",
        params="n: int = 1",
        body=textwrap.dedent(
            """
            import builtins, os, sys
            from dagma import nb
            seen = {
                "leaked_name": "leaked_name" in globals(),
                "renamed": "renamed" in globals(),
                "env": "DAGMA_TEST_LEAK" in os.environ,
                "builtin": hasattr(builtins, "dagma_test_leak"),
                "module": "dagma_test_leak" in sys.modules,
                "cwd": os.getcwd(),
                "history": len(In),
                "warmed": "sklearn" in sys.modules,
                "warm_name": "sklearn" in globals() or "__dagma_warm" in globals(),
                "pid": os.getpid(),
            }
            nb.context().output(seen)
            """
        ),
    )
    # Warm the kernels with a module neither notebook imports, to see it in sys.modules only.
    with KernelPool(pool_dir, size=1, modules=["sklearn"], cwd=tmp_path) as pool:
        wait_for(lambda: spare_pids(pool_dir))
        # Unix sockets: a spare kernel holds no TCP port a service may be about to bind.
        assert {t.connection["transport"] for t in pool.spare()} == {"ipc"}
        engine = PapermillEngine(Limits(run_id="run-1"), pool=pool_dir)
        first = execute(
            parse_notebook(messy),
            runs_dir=tmp_path / "runs",
            target=target(tmp_path),
            engine=engine,
        )
        assert engine.pooled
        first_pid = first.outputs["messy"].load()
        assert not processes.alive(first_pid)  # discarded after its one notebook
        wait_for(lambda: spare_pids(pool_dir))
        engine = PapermillEngine(Limits(run_id="run-2"), pool=pool_dir)
        second = execute(
            parse_notebook(clean),
            runs_dir=tmp_path / "runs2",
            target=target(tmp_path),
            engine=engine,
        )
        assert engine.pooled
        seen = second.outputs["clean"].load()
        assert pool.started >= 2
    assert seen.pop("pid") != first_pid
    cold = execute(parse_notebook(clean), runs_dir=tmp_path / "runs3", target=target(tmp_path))
    expected = cold.outputs["clean"].load()  # what a kernel started for the notebook sees
    expected.pop("pid")
    assert expected["warmed"] is False and seen["warmed"] is True  # in sys.modules only
    assert {**seen, "warmed": False} == expected
    assert expected["cwd"] == str(tmp_path) and expected["history"] >= 3
    assert not list((pool_dir / "spare").glob("*.json")), "close() kills the unclaimed spares"
    assert not list((pool_dir / "claimed").glob("*.json"))
    assert not list(pool_dir.glob("kernel-*")), "no connection file or socket is left"


def test_a_pooled_kernel_gets_the_runs_environment_and_tag(tmp_path: Path):
    pool_dir = tmp_path / "kernels"
    path = write_nb(
        tmp_path / "env.ipynb",
        params="n: int = 1",
        body=(
            "import os\nfrom dagma import nb\n"
            "nb.context().output({k: os.environ.get(k) for k in "
            "('DAGMA_KERNEL_RUN_ID', 'DAGMA_TEST_LATE')})"
        ),
    )
    with KernelPool(pool_dir, size=1, modules=[], cwd=tmp_path):
        wait_for(lambda: spare_pids(pool_dir))
        os.environ["DAGMA_TEST_LATE"] = "set after the kernel started"
        try:
            engine = PapermillEngine(Limits(run_id="run-7"), pool=pool_dir)
            run = execute(
                parse_notebook(path),
                runs_dir=tmp_path / "runs",
                target=target(tmp_path),
                engine=engine,
            )
        finally:
            os.environ.pop("DAGMA_TEST_LATE")
    assert engine.pooled
    assert run.outputs["env"].load() == {
        "DAGMA_KERNEL_RUN_ID": "run-7",
        "DAGMA_TEST_LATE": "set after the kernel started",
    }


def test_a_kernel_started_under_another_home_is_never_handed_out(tmp_path: Path):
    pool_dir = tmp_path / "kernels"
    with KernelPool(pool_dir, size=1, modules=[], cwd=tmp_path):
        wait_for(lambda: spare_pids(pool_dir))
        env = {**os.environ, "DAGMA_HOME": str(tmp_path / "elsewhere")}
        assert kernel_pool.take(pool_dir, cwd=tmp_path, env=env, wait=0.2) is None
        assert spare_pids(pool_dir), "the spare stays for a run of its own lab"


OWNER = """
import sys, time
from pathlib import Path
from dagma.notebooks.kernel_pool import KernelPool
pool = KernelPool(Path(sys.argv[1]), size=2, modules=[], cwd=Path(sys.argv[1]))
pool.open()
print("open", flush=True)
time.sleep(600)
"""

CLAIMANT = """
import os, sys, time
from pathlib import Path
from dagma.notebooks import kernel_pool, kernel_warmup
km = kernel_pool.take(Path(sys.argv[1]), cwd=Path(sys.argv[1]), env=dict(os.environ), run_id="r-9")
print(km._ticket.pid, flush=True)
time.sleep(600)
"""


def test_a_killed_owner_and_a_killed_claimant_leave_no_kernel_running(tmp_path: Path):
    """SIGKILL the process that started the spares, and the one that claimed one: the next
    owner, and the owner's own loop, kill what they held."""
    pool_dir = tmp_path / "kernels"
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(pool_dir)], stdout=subprocess.PIPE)
    try:
        spares = wait_for(lambda: len(spare_pids(pool_dir)) == 2 and spare_pids(pool_dir))
        claimant = subprocess.Popen(
            [sys.executable, "-c", CLAIMANT, str(pool_dir)], stdout=subprocess.PIPE, text=True
        )
        assert claimant.stdout is not None
        claimed = int(claimant.stdout.readline())
        assert claimed in spares
        ticket = Ticket.read(next((pool_dir / "claimed").glob("*.json")))
        assert ticket is not None and ticket.run_id == "r-9"
        assert kernel_pool.kernels_of_run(pool_dir, "r-9") == [claimed]
        claimant.send_signal(signal.SIGKILL)
        claimant.wait()
        wait_for(lambda: not processes.alive(claimed), timeout=30)  # the owner's loop
        spares = wait_for(lambda: len(spare_pids(pool_dir)) == 2 and spare_pids(pool_dir))
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    assert all(processes.alive(pid) for pid in spares), "orphaned until the next owner comes"
    assert sorted(kernel_pool.sweep(pool_dir)) == sorted(spares)
    assert not any(processes.alive(pid) for pid in spares)
    assert not list(pool_dir.rglob("*.json"))


def test_the_pool_starts_no_kernel_without_spare_memory():
    gib = 2**30
    assert kernel_pool.room_for_kernels(2, None) == 2
    assert kernel_pool.room_for_kernels(2, 8 * gib) == 2
    assert kernel_pool.room_for_kernels(2, kernel_pool.RESERVE_MEMORY + gib // 2) == 1
    assert kernel_pool.room_for_kernels(2, kernel_pool.RESERVE_MEMORY) == 0
    assert kernel_pool.available_memory() is not None  # Linux says


def test_a_bad_pool_size_is_refused_with_its_fix():
    assert kernel_pool.pool_size({}) == kernel_pool.DEFAULT_SIZE
    assert kernel_pool.pool_size({"DAGMA_KERNEL_POOL": "0"}) == 0
    for bad in ("two", "-1", "99"):
        with pytest.raises(PoolError, match=r"DAGMA_KERNEL_POOL=.*whole number from 0"):
            kernel_pool.pool_size({"DAGMA_KERNEL_POOL": bad})


def test_the_first_code_cells_imports_are_what_a_spare_kernel_imports(tmp_path: Path):
    notebook = {
        "cells": [
            {"cell_type": "markdown", "source": "import nothing"},
            {
                "cell_type": "code",
                "source": ["import mlflow, numpy as np\n", "from dagma import nb\n", "x = 1\n"],
            },
            {"cell_type": "code", "source": "import pandas"},
        ]
    }
    assert kernel_warmup.first_cell_imports(notebook) == ["mlflow", "numpy", "dagma", "dagma.nb"]
    (tmp_path / "a.ipynb").write_text(json.dumps(notebook))
    (tmp_path / "bad.ipynb").write_text("{not json")
    assert kernel_warmup.imports_of([tmp_path / "a.ipynb", tmp_path / "bad.ipynb"]) == [
        "mlflow",
        "numpy",
        "dagma",
        "dagma.nb",
    ]


def test_a_kernel_whose_owner_died_before_its_ticket_is_found_by_its_environment(tmp_path: Path):
    """The owner can die between starting a kernel and writing its ticket: the kernel's
    environment still names the pool and its dead owner, and the next sweep kills it."""
    from jupyter_client import KernelManager

    pool_dir = tmp_path / "kernels"
    pool_dir.mkdir()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    km = KernelManager(
        kernel_name="python3", connection_file=str(pool_dir / f"kernel-{dead}-x.json")
    )
    env = {**os.environ, kernel_pool.POOL_ENV: dead, kernel_pool.DIR_ENV: str(pool_dir.resolve())}
    km.start_kernel(env=env)
    pid = km.provisioner.pid
    try:
        wait_for(lambda: pid in processes.tagged(kernel_pool.POOL_ENV, dead))
        assert kernel_pool.sweep(pool_dir) == [pid]
        km.provisioner.process.wait(timeout=10)
        assert not list(pool_dir.glob("kernel-*.json"))
    finally:
        if processes.alive(pid):
            km.shutdown_kernel(now=True)


def test_a_kernel_being_claimed_is_not_swept_before_its_claimant_is_named(tmp_path: Path):
    """A claim renames the ticket, then writes the claimant in: a sweep in between must leave
    the kernel to its owner, or it kills a kernel that a run is adopting."""
    pool_dir = tmp_path / "kernels"
    with KernelPool(pool_dir, size=1, modules=[], cwd=tmp_path, poll=0.05):
        [pid] = wait_for(lambda: spare_pids(pool_dir))
        [ticket_path] = (pool_dir / "spare").glob("*.json")
        ticket_path.rename(pool_dir / "claimed" / ticket_path.name)  # claimed, claimant unset
        time.sleep(0.5)  # several turns of the owner's loop, each with a sweep
        assert kernel_pool.sweep(pool_dir) == []
        assert processes.alive(pid)
        wait_for(lambda: len(spare_pids(pool_dir)) == 1)  # the owner replaced it meanwhile
    assert not processes.alive(pid), "closing the pool kills a claim nobody finished"


def test_a_claimed_kernel_whose_claimant_pid_was_reused_is_swept(tmp_path: Path):
    """After a reboot (or a long run) the dead claimant's pid can belong to another process:
    its start time tells them apart, so the kernel is not kept for a claimant that is gone."""
    pool_dir = tmp_path / "kernels"
    stranger = subprocess.Popen(["sleep", "60"])  # the process now holding the claimant's pid
    try:
        with KernelPool(pool_dir, size=1, modules=[], cwd=tmp_path, poll=0.05):
            [pid] = wait_for(lambda: spare_pids(pool_dir))
            [ticket_path] = (pool_dir / "spare").glob("*.json")
            claimed = pool_dir / "claimed" / ticket_path.name
            ticket_path.rename(claimed)
            ticket = Ticket.read(claimed)
            assert ticket is not None
            ticket.claimant = stranger.pid
            ticket.claimant_started = processes.start_time(stranger.pid)
            ticket.write(claimed)
            assert kernel_pool.sweep(pool_dir) == []  # the claimant is alive: kept
            ticket.claimant_started = (ticket.claimant_started or 0) - 100  # its pid, reused
            ticket.write(claimed)
            wait_for(lambda: not processes.alive(pid), timeout=20)
            wait_for(lambda: not claimed.exists(), timeout=5)  # removed just after the kill
        assert stranger.poll() is None, "the process that reused the pid is left alone"
    finally:
        stranger.kill()
        stranger.wait()
