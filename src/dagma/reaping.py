"""Release what a dead run held: its run record, pool slots, processes and half-built files.

Services mode has the daemon's run monitoring to fail a run whose worker died, and its failure
sensor calls `release`; an embedded lab has no daemon, so every `dagma run` and `dagma status`
reaps the runs of this host whose process is gone.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dagma.lib import processes
from dagma.settings import Settings

# Which process runs it, so that a run whose process died can be told from one still going;
# its start time tells it from a later process that got the same pid (after a reboot, say).
PID_TAG, HOST_TAG, START_TAG = "dagma/pid", "dagma/host", "dagma/pid_start"
# Set by the process that runs the lab's steps; every process it starts (kernels, step and fork
# server processes, Dagster's `tail -F` log followers) inherits it, even after it is orphaned.
OWNER_ENV = "DAGMA_OWNER_PID"


def own_processes() -> dict[str, str]:
    """Tags for a run started by this process; marks what it starts as its own."""
    os.environ[OWNER_ENV] = str(os.getpid())
    tags = {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}
    started = processes.start_time(os.getpid())
    return tags if started is None else {**tags, START_TAG: str(started)}


def run_process_gone(tags: Mapping[str, str]) -> bool:
    """The run was started on this host and the process that ran it is gone (or its pid now
    belongs to another process); False when that cannot be known."""
    pid, started = tags.get(PID_TAG, ""), tags.get(START_TAG, "")
    if not pid.isdigit() or tags.get(HOST_TAG) != socket.gethostname():
        return False
    return not processes.same_process(int(pid), int(started) if started.isdigit() else None)


def reap_dead_runs(instance: Any, settings: Settings) -> list[str]:
    """Fail the runs started on this host whose process is gone (killed, crashed, rebooted),
    then release what they held. Their MLflow runs are marked KILLED."""
    import dagster as dg

    active = [dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING]
    reaped = []
    for run in instance.get_runs(dg.RunsFilter(statuses=active)):
        if not run_process_gone(run.tags):
            continue
        pid = run.tags[PID_TAG]
        instance.report_run_failed(
            run,
            f"The process that ran it (pid {pid}) is gone: killed or crashed. Nothing it was "
            "writing became visible. Re-run with `dagma run --stale` or `dagma run ASSET`.",
        )
        started = run.tags.get(START_TAG, "")
        stop_processes_of(
            run.run_id,
            owner=int(pid),
            kernels=settings.kernels_dir,
            owner_start=int(started) if started.isdigit() else None,
        )
        reaped.append(run.run_id)
    if reaped:
        discard_dead_builds(settings)
        if not settings.tracking_uri.startswith(("http://", "https://")):
            from dagma.lib import tracking

            for run_id in reaped:
                tracking.kill_runs_of(settings.tracking_uri, settings.dagma_experiment, run_id)
    return reaped


def stop_processes_of(
    run_id: str,
    owner: int | None = None,
    kernels: Path | None = None,
    owner_start: int | None = None,
) -> list[int]:
    """SIGKILL a dead run's processes, which would go on running (and writing) unwatched.

    They are its kernels, tagged with the run or claimed from the pool in `kernels`, and, when the run's own process is known and
    dead, everything that process started. ipykernel exits with its parent only where orphans
    are reparented to PID 1; under a subreaper (a container's init, systemd) it keeps running.
    """
    from dagma.notebooks.papermill_engine import RUN_ENV

    pids = set(processes.tagged(RUN_ENV, run_id))
    if kernels is not None:  # spare kernels it claimed: started untagged, before the run
        from dagma.notebooks.kernel_pool import kernels_of_run

        pids |= set(kernels_of_run(kernels, run_id))
    if owner is not None and not processes.same_process(owner, owner_start):
        # If another process now has the owner's pid, what it started carries the same tag;
        # the dead owner's processes are the ones that started before it.
        reused = processes.start_time(owner)
        for pid in processes.tagged(OWNER_ENV, str(owner)):
            started = processes.start_time(pid)
            if reused is None or (started is not None and started < reused):
                pids.add(pid)
    pids -= _ancestors()
    return processes.kill(sorted(pids))


def _ancestors() -> set[int]:
    """This process and its parents, which reaping must never stop."""
    found, pid = set(), os.getpid()
    while pid > 1 and pid not in found:
        found.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as handle:
                pid = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return found


def discard_dead_builds(settings: Settings) -> list[str]:
    """Remove the collection versions that dead writers left half-built (embedded store)."""
    from dagma.lib.vectors import EmbeddedStore

    if settings.qdrant_url or not settings.qdrant_path.is_dir():
        return []
    return [str(p) for p in EmbeddedStore(settings.qdrant_path).discard_dead_builds()]


def free_slots_of_finished_runs(instance: Any) -> list[str]:
    """Free the pool slots still claimed by runs that ended (killed, crashed, failed).

    A run killed in a pooled step never frees its slot, and every later run of that pool would
    wait for it forever. Returns the runs whose slots were freed.
    """
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return []
    freed = []
    for run_id in sorted(storage.get_concurrency_run_ids()):
        run = instance.get_run_by_id(run_id)
        if run is None or run.is_finished:
            storage.free_concurrency_slots_for_run(run_id)
            freed.append(run_id)
    return freed


def stuck_slots(instance: Any) -> list[dict[str, str]]:
    """The pool slots held by a run that can no longer free them: it ended, or its process is
    gone. Every later run of that pool would wait for them."""
    import dagster as dg

    stuck = []
    for pool in held_slots(instance):
        for claim in pool["held_by"]:
            run = instance.get_run_by_id(claim["run_id"])
            if run is None or run.is_finished:
                why = "the run has ended"
            elif run.status in (
                dg.DagsterRunStatus.STARTED,
                dg.DagsterRunStatus.STARTING,
            ) and run_process_gone(run.tags):
                why = f"its process (pid {run.tags[PID_TAG]}) is gone"
            else:
                continue
            stuck.append({"pool": pool["pool"], "run_id": claim["run_id"], "why": why})
    return stuck


def held_slots(instance: Any) -> list[dict[str, Any]]:
    """Each pool's limit and the runs (and steps) that hold its slots now."""
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return []
    pools = []
    for key in sorted(storage.get_concurrency_keys()):
        info = storage.get_concurrency_info(key)
        held = [{"run_id": c.run_id, "step": c.step_key} for c in info.claimed_slots]
        pools.append({"pool": key, "limit": info.slot_count, "held_by": held})
    return pools
