"""Start, find and stop detached processes; their pids live in a small JSON state file."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess  # nosec B404 # we run argv lists we build, never a shell
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from dagma.errors import DagmaError
from dagma.lib import processes

MARKER = "DAGMA_SERVICES_HOME"


class ServiceError(DagmaError, RuntimeError):
    """A service cannot start or stop; the message names it and the fix."""


@dataclass
class ProcRecord:
    name: str
    pid: int
    argv0: str
    log: str
    started: float
    # Clock ticks since boot (`processes.start_time`): with the pid, it names the process even
    # after its pid is reused. None in state files written before it was recorded.
    start_ticks: int | None = None


class StateFile:
    """`{name: ProcRecord}` in `<state_dir>/state.json`, rewritten atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, ProcRecord]:
        if not self.path.is_file():
            return {}
        raw = json.loads(self.path.read_text() or "{}")
        return {name: ProcRecord(**rec) for name, rec in raw.items()}

    def save(self, records: Mapping[str, ProcRecord]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({n: asdict(r) for n, r in records.items()}, indent=2))
        tmp.replace(self.path)

    def put(self, record: ProcRecord) -> None:
        records = self.load()
        records[record.name] = record
        self.save(records)

    def drop(self, name: str) -> None:
        records = self.load()
        if records.pop(name, None) is not None:
            self.save(records)


def pid_alive(pid: int) -> bool:
    """True for a running process; a zombie (exited, not yet reaped) counts as dead."""
    return processes.alive(pid)


def record_alive(record: ProcRecord) -> bool:
    """Alive and still the process we started, not another that reused its pid."""
    if record.start_ticks is not None:
        return processes.same_process(record.pid, record.start_ticks)
    if not pid_alive(record.pid):
        return False
    # A record without a start time: judge by the program's name. Just after exec the kernel
    # has closed the parent's pipe (so Popen has returned) before it fills in the new
    # arguments: for a moment cmdline reads empty. Wait that moment out.
    deadline = time.monotonic() + 2.0
    while True:
        try:
            cmdline = Path(f"/proc/{record.pid}/cmdline").read_bytes()
        except OSError:
            return False
        if cmdline or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    args = cmdline.split(b"\0")[:3]
    return any(Path(arg.decode(errors="replace")).name == record.argv0 for arg in args)


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


_HANDED_OUT: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on, picked below the kernel's ephemeral range: the local port of
    an outgoing connection comes from that range, so none can take this one before its server
    binds it (a port from `bind(0)` can be). Never the same port twice in one process."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    span = max(low - 1024 - 10000, 1000)  # ports [low - span, low)
    for _ in range(500):
        port = low - 1 - secrets.randbelow(span)
        if port < 1024 or port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def venv_bin(name: str) -> str:
    """A console script of the running interpreter's environment (the project's venv)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else (shutil.which(name) or name)


def spawn(
    name: str,
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    log: Path,
    cwd: Path | None = None,
    user: str | None = None,
) -> ProcRecord:
    """Start `argv` detached (own session), appending stdout and stderr to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        with contextlib.suppress(OSError):  # logs can hold secrets (JupyterLab logs its token)
            os.fchmod(out.fileno(), 0o600)
        out.write(f"\n--- {time.strftime('%Y-%m-%dT%H:%M:%S')} starting {name}\n".encode())
        out.flush()
        try:
            proc = subprocess.Popen(  # nosec B603 # argv built here, no shell
                list(argv),
                env=dict(env),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                user=user,
            )
        except FileNotFoundError as exc:
            raise ServiceError(f"{name}: {argv[0]} not found ({exc}).") from exc
    return ProcRecord(
        name=name,
        pid=proc.pid,
        argv0=Path(argv[0]).name,
        log=str(log),
        started=time.time(),
        start_ticks=processes.start_time(proc.pid),  # set at fork, kept through exec
    )


def marked_pids(marker_value: str) -> list[int]:
    """Pids whose environment carries `MARKER=marker_value`: everything we started, and its
    descendants, including those that left our process groups (Jupyter kernels do)."""
    return processes.tagged(MARKER, marker_value)


def terminate(
    targets: Sequence[int | ProcRecord], *, sig: int = signal.SIGTERM, timeout: float = 15.0
) -> None:
    """Signal each process's group (or the process), then SIGKILL whatever outlives `timeout`.

    A record is signalled only while it is still the process it names (pid and start time); a
    bare pid is pinned to the process that has it now, so a pid freed and reused meanwhile is
    never signalled.
    """
    known = [_identity(t) for t in targets]
    pinned = [(pid, started) for pid, started in known if processes.same_process(pid, started)]
    for pid, _ in pinned:
        _signal(pid, sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(processes.same_process(*p) for p in pinned):
        time.sleep(0.2)
    for pid, started in pinned:
        if processes.same_process(pid, started):
            _signal(pid, signal.SIGKILL)


def _identity(target: int | ProcRecord) -> tuple[int, int | None]:
    if isinstance(target, ProcRecord):
        if target.start_ticks is not None:
            return target.pid, target.start_ticks
        if not record_alive(target):
            return target.pid, -1  # an old record whose program is gone: matches nothing
    pid = target.pid if isinstance(target, ProcRecord) else target
    return pid, processes.start_time(pid)


def _signal(pid: int, sig: int) -> None:
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
