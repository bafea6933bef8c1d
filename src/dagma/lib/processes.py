"""Find processes by a variable in their environment, which every descendant inherits, and
know a process by its pid and its start time, since a pid alone is reused.

A tag in the environment survives what a process tree does not: a kernel leaving its process
group, or an orphan being reparented when its parent is killed.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def alive(pid: int, proc: Path = Path("/proc")) -> bool:
    """True for a running process; a zombie (exited, not yet reaped) counts as dead."""
    try:
        state = (proc / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def start_time(pid: int, proc: Path = Path("/proc")) -> int | None:
    """When the process started, in clock ticks since boot (field 22 of `/proc/<pid>/stat`);
    None when there is no such process. Parsed after the last ')', as the name may hold one."""
    try:
        fields = (proc / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def same_process(pid: int, started: int | None, proc: Path = Path("/proc")) -> bool:
    """`pid` is alive and still the process that started at `started` (from `start_time`),
    not another one that reused the pid. With `started` unknown (None) only liveness counts."""
    if not alive(pid, proc):
        return False
    return started is None or start_time(pid, proc) == started


def environ(pid: int, proc: Path = Path("/proc")) -> dict[str, str]:
    """A process's environment as it started; empty when it is gone or another user's."""
    try:
        raw = (proc / str(pid) / "environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.decode(errors="replace").partition("=") for item in raw.split(b"\0") if item)
    return {name: value for name, _, value in pairs}


def tagged(name: str, value: str, proc: Path = Path("/proc")) -> list[int]:
    """Live pids (not this process) whose environment has `name=value`."""
    needle = f"{name}={value}".encode()
    found = []
    for entry in proc.iterdir() if proc.is_dir() else []:
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone meanwhile, or another user's
            continue
        if needle in environ.split(b"\0") and alive(int(entry.name), proc):
            found.append(int(entry.name))
    return found


def kill(pids: list[int], wait: float = 10.0) -> list[int]:
    """SIGKILL each pid and wait until they are gone; the pids that were signalled."""
    killed = []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + wait
    while any(alive(p) for p in killed) and time.monotonic() < deadline:
        time.sleep(0.05)
    return killed
