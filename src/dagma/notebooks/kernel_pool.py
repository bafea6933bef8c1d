"""Spare Jupyter kernels, started ahead of time and pre-warmed; each one runs one notebook.

An owner (`KernelPool`: the CLI while it runs the graph, or the lab's code server) keeps up to
`size` kernels ready, each pre-warmed with the imports of the notebooks' first code cells. A
ticket per kernel lives in `<folder>/spare/`. A runner claims one by renaming its ticket into
`claimed/` (atomic, so exactly one claimant wins), adopts the kernel by its connection file,
gives it its own environment and working folder, and kills it after its one notebook. The
owner replaces what was taken and kills the kernel of a claimant that died; a new owner first
kills whatever a dead owner left behind. Kernels carry `POOL_ENV=<owner pid>`, so a reused pid
is never mistaken for one of them.

Longer than 450 lines because both sides of the pool, the owner that starts and sweeps and
the claimant that adopts and kills, live on one ticket format and one set of kill rules.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jupyter_client import KernelManager

from dagma.errors import DagmaError
from dagma.lib import processes
from dagma.lib.atomic import write_atomic

if TYPE_CHECKING:
    from dagma.settings import Settings

from dagma.notebooks.kernel_warmup import imports_of, papermill_notebooks, warm_code

SIZE_ENV = "DAGMA_KERNEL_POOL"  # spare kernels to keep; 0 turns the pool off
POOL_ENV = "DAGMA_KERNEL_POOL_OWNER"  # in each pooled kernel's environment: its owner's pid
DIR_ENV = "DAGMA_KERNEL_POOL_DIR"  # and the pool folder it belongs to
DEFAULT_SIZE = 1
MAX_SIZE = 8
# What one warm kernel may take (a kernel with numpy, pandas, sklearn and mlflow is ~250 MiB),
# and what the machine keeps free besides: the pool starts no kernel that would cut into it.
KERNEL_MEMORY = 400 * 2**20
RESERVE_MEMORY = 1024 * 2**20
# Environment variables that take effect when a kernel's interpreter starts (the rest is
# replaced when a run adopts it), and the lab's home: a kernel started under other values is
# never handed out.
_KEY_PREFIXES = ("PYTHON", "LD_")
_KEY_NAMES = {"DAGMA_HOME"}
_SOCKET_PATH = 100  # a Unix socket's path must fit in 108 bytes, with the kernel's "-<port>"
SWEEP_EVERY = 2.0  # seconds between an owner's sweeps for dead claimants' kernels
RUN_TAG = "DAGMA_KERNEL_RUN_ID"  # papermill_engine.RUN_ENV: set when a run adopts the kernel
_PER_RUN = {POOL_ENV, DIR_ENV, RUN_TAG, "DAGMA_OWNER_PID", "PYTEST_CURRENT_TEST"}


class PoolError(DagmaError, ValueError):
    """A bad pool setting; the message names it and the fix."""


def pool_size(environ: dict[str, str] | None = None) -> int:
    """Spare kernels to keep: $DAGMA_KERNEL_POOL, else 1; at most MAX_SIZE."""
    raw = (environ if environ is not None else os.environ).get(SIZE_ENV, "").strip()
    if not raw:
        return DEFAULT_SIZE
    if not raw.isdigit() or int(raw) > MAX_SIZE:
        raise PoolError(
            f"{SIZE_ENV}={raw!r}: write a whole number from 0 (no spare kernels) to {MAX_SIZE}."
        )
    return int(raw)


def available_memory(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """MemAvailable in bytes, or None where the kernel does not say."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def room_for_kernels(wanted: int, free: int | None) -> int:
    """How many of `wanted` spare kernels fit beside the reserve (all of them if unknown)."""
    if free is None:
        return wanted
    return max(0, min(wanted, (free - RESERVE_MEMORY) // KERNEL_MEMORY))


def environment_key(environ: dict[str, str] | None = None) -> str:
    """What a kernel's start fixed for good: its interpreter, its PYTHON*/LD_* variables, and
    the lab it belongs to."""
    env = environ if environ is not None else dict(os.environ)
    fixed = sorted(
        (k, v)
        for k, v in env.items()
        if (k.startswith(_KEY_PREFIXES) or k in _KEY_NAMES) and k not in _PER_RUN
    )
    return hashlib.sha256(repr((sys.executable, fixed)).encode()).hexdigest()[:16]


@dataclass
class Ticket:
    """One pooled kernel, as its file in the pool folder says."""

    id: str
    pid: int
    owner: int
    key: str
    connection: dict[str, Any]
    modules: list[str] = field(default_factory=list)
    claimant: int | None = None
    run_id: str | None = None
    # Start times (`processes.start_time`) of the kernel and its owner, so that another process
    # given one of their pids is not taken for them. None in tickets written before.
    started: int | None = None
    owner_started: int | None = None
    claimant_started: int | None = None

    @classmethod
    def read(cls, path: Path) -> Ticket | None:
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def write(self, path: Path) -> None:
        write_atomic(path, json.dumps(asdict(self)))

    def kernel_alive(self) -> bool:
        return processes.same_process(self.pid, self.started)

    def owner_alive(self) -> bool:
        return processes.same_process(self.owner, self.owner_started)

    def claimant_alive(self) -> bool:
        return self.claimant is not None and processes.same_process(
            self.claimant, self.claimant_started
        )


def _is_pooled_kernel(pid: int, owner: int) -> bool:
    """The pid is still the kernel that `owner` started, not a process that reused its pid."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"{POOL_ENV}={owner}".encode() in environ and processes.alive(pid)


def _kill(pid: int, owner: int, started: int | None = None) -> None:
    if _is_pooled_kernel(pid, owner) and processes.same_process(pid, started):
        processes.kill([pid], wait=5.0)


def _folders(folder: Path) -> tuple[Path, Path]:
    spare, claimed = folder / "spare", folder / "claimed"
    spare.mkdir(parents=True, exist_ok=True)
    claimed.mkdir(parents=True, exist_ok=True)
    return spare, claimed


def sweep(folder: Path) -> list[int]:
    """Kill what dead owners and dead claimants left: their kernels, tickets and connection
    files, including a kernel whose owner died before it had a ticket. The pids killed."""
    spare, claimed = _folders(folder)
    starting = folder / "starting"
    killed, in_use = [], set()
    for path in [*spare.glob("*.json"), *claimed.glob("*.json"), *starting.glob("*.json")]:
        ticket = Ticket.read(path)
        if ticket is None:
            path.unlink(missing_ok=True)
            continue
        # A claimed ticket names its claimant a moment after the rename: until then it is
        # still its owner's, or a sweep would kill the kernel being adopted.
        claimant = ticket.claimant if path.parent == claimed else None
        if ticket.claimant_alive() if claimant is not None else ticket.owner_alive():
            in_use.add(ticket.pid)
            continue
        if _is_pooled_kernel(ticket.pid, ticket.owner) and ticket.kernel_alive():
            processes.kill([ticket.pid], wait=5.0)
            killed.append(ticket.pid)
        path.unlink(missing_ok=True)
    orphans = [pid for pid in _kernels_of_dead_owners(folder) if pid not in in_use]
    killed += processes.kill(orphans, wait=5.0)
    for path in folder.glob("kernel-*"):  # connection files and sockets
        owner = path.name.split("-")[1]
        if not owner.isdigit() or not processes.alive(int(owner)):
            path.unlink(missing_ok=True)
    return sorted(set(killed))


def _kernels_of_dead_owners(folder: Path, proc: Path = Path("/proc")) -> list[int]:
    """Kernels started for this pool folder whose owner is gone, found by their environment."""
    here = f"{DIR_ENV}={folder.resolve()}".encode()
    found = []
    for pid in processes.tagged(DIR_ENV, str(folder.resolve()), proc):
        try:
            environ = (proc / str(pid) / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        owner = next(
            (v.split(b"=", 1)[1] for v in environ if v.startswith(b"%s=" % POOL_ENV.encode())), b""
        )
        if here in environ and owner.isdigit() and not processes.alive(int(owner)):
            found.append(pid)
    return found


def kernels_of_run(folder: Path, run_id: str) -> list[int]:
    """The pooled kernels claimed for a Dagster run (for reaping a dead run)."""
    found = []
    for path in (folder / "claimed").glob("*.json"):
        ticket = Ticket.read(path)
        if ticket is not None and ticket.run_id == run_id and ticket.kernel_alive():
            found.append(ticket.pid)
    return found


class AdoptedKernelManager(KernelManager):
    """A kernel that another process (or thread) started, known by its connection and pid.

    It runs one notebook: shutting it down kills it, and it is never restarted.
    """

    def adopt(self, ticket: Ticket, path: Path) -> None:
        self.load_connection_info(ticket.connection)
        self._ticket, self._ticket_path = ticket, path

    @property
    def has_kernel(self) -> bool:
        return self._ticket.kernel_alive()

    def is_alive(self) -> bool:
        return self._ticket.kernel_alive()

    def interrupt_kernel(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._ticket.pid, signal.SIGINT)

    def shutdown_kernel(self, now: bool = False, restart: bool = False) -> None:
        discard(self._ticket, self._ticket_path)

    def cleanup_resources(self, restart: bool = False) -> None:
        pass

    def restart_kernel(self, now: bool = False, newports: bool = False, **kw: Any) -> None:
        raise RuntimeError("A pooled kernel runs one notebook and is never restarted.")


def discard(ticket: Ticket, path: Path) -> None:
    """Kill a claimed kernel and drop its ticket: it ran its one notebook."""
    _kill(ticket.pid, ticket.owner, ticket.started)
    path.unlink(missing_ok=True)
    _remove_files(path.parent.parent, ticket)


def _remove_files(folder: Path, ticket: Ticket) -> None:
    """A dead kernel's connection file and sockets."""
    for leftover in folder.glob(f"kernel-{ticket.owner}-{ticket.id[:6]}*"):
        leftover.unlink(missing_ok=True)


def _run_silently(km: KernelManager, code: str, timeout: float) -> bool:
    """Execute `code` without history, output or a new `_`: True if it ran without error."""
    kc: Any = km.client()  # a BlockingKernelClient
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=timeout)
        msg_id = kc.execute(code, silent=True, store_history=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reply = kc.get_shell_msg(timeout=max(deadline - time.monotonic(), 0.01))
            if reply["parent_header"].get("msg_id") == msg_id:
                return bool(reply["content"].get("status") == "ok")
        return False
    finally:
        kc.stop_channels()


def _adopt_code(env: dict[str, str], cwd: str) -> str:
    return (
        "(lambda os: (os.environ.clear(), os.environ.update("
        f"{env!r}), os.chdir({cwd!r})))(__import__('os'))"
    )


def take(
    folder: Path,
    *,
    cwd: Path,
    env: dict[str, str],
    modules: list[str] | None = None,
    run_id: str | None = None,
    wait: float = 5.0,
) -> AdoptedKernelManager | None:
    """Claim a spare kernel for one notebook, with `env` and `cwd` as its own; None if none.

    A spare kernel that is still starting is waited for up to `wait` seconds, as long as its
    owner lives: it is usually ready sooner than a new kernel would be.
    """
    spare = folder / "spare"
    if not spare.is_dir():
        return None
    key = environment_key(env)
    wanted = set(modules or [])
    deadline = time.monotonic() + wait
    while True:
        tickets = [(p, Ticket.read(p)) for p in sorted(spare.glob("*.json"))]
        usable = [(p, t) for p, t in tickets if t is not None and t.key == key]
        usable.sort(key=lambda pt: not wanted <= set(pt[1].modules))  # best-warmed first
        for path, ticket in usable:
            claimed = folder / "claimed" / path.name
            try:
                os.rename(path, claimed)
            except FileNotFoundError:  # another claimant won it
                continue
            ticket.claimant, ticket.run_id = os.getpid(), run_id
            ticket.claimant_started = processes.start_time(os.getpid())
            ticket.write(claimed)
            km = AdoptedKernelManager(kernel_name="python3")
            km.adopt(ticket, claimed)
            if ticket.kernel_alive() and _run_silently(km, _adopt_code(env, str(cwd)), 30):
                return km
            discard(ticket, claimed)
        owners = _starting(folder, key)
        if time.monotonic() >= deadline or not any(t.owner_alive() for t in owners):
            return None
        time.sleep(0.02)


def _starting(folder: Path, key: str) -> list[Ticket]:
    return [t for t in _tickets(folder / "starting") if t.key == key]


def for_command(
    settings: Settings, selection: list[str] | None, processes: int | None = None
) -> KernelPool | None:
    """A pool for a CLI command about to run `selection` (None: everything) in this process on
    `processes` (default $DAGMA_PROCESSES, else 1), started before the command imports Dagster,
    so that the kernels start meanwhile."""
    from dagma import reaping

    settings.ensure_dirs()
    settings.export_env()  # before the kernels start: they run in the lab's environment
    reaping.own_processes()
    notebooks = papermill_notebooks(settings.notebooks_dir, selection or None)
    raw = os.environ.get("DAGMA_PROCESSES", "").strip()  # checked, with its error, by the run
    at_once = processes or (int(raw) if raw.isdigit() and int(raw) > 0 else 1)
    return for_notebooks(settings.kernels_dir, notebooks, settings.notebooks_dir, at_once)


def for_notebooks(
    folder: Path, notebooks: list[Path], cwd: Path, at_once: int = 1
) -> KernelPool | None:
    """An open pool with a spare kernel for each notebook that may start at once (at least the
    pool size, at most the notebooks about to run), or None: the pool is off, nothing will
    run, or a live owner already keeps spares here."""
    wanted = pool_size()
    size = min(max(wanted, at_once), len(notebooks)) if wanted else 0
    if size == 0 or any(t.owner_alive() for t in _tickets(folder / "spare")):
        return None
    pool = KernelPool(folder, size=size, modules=imports_of(notebooks), cwd=cwd)
    pool.limit = len(notebooks)
    pool.open()
    return pool


def _tickets(folder: Path) -> list[Ticket]:
    found = [Ticket.read(p) for p in sorted(folder.glob("*.json"))]
    return [t for t in found if t is not None]


class KernelPool:
    """Keeps `size` spare kernels ready in `folder` while it is open (see the module's doc)."""

    def __init__(
        self, folder: Path, *, size: int, modules: list[str], cwd: Path, poll: float = 0.1
    ) -> None:
        self.folder, self.size, self.modules, self.cwd, self.poll = (
            folder,
            size,
            modules,
            cwd,
            poll,
        )
        self.limit: int | None = None  # kernels to start in all, when known (a CLI's run)
        self.started = 0  # kernels this pool has started, for tests and benchmarks
        self._kernels: dict[str, KernelManager] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> KernelPool:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        """Clear what a dead owner left, then start filling the pool in the background."""
        sweep(self.folder)
        (self.folder / "starting").mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._keep_filled, name="kernel-pool", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop filling, and kill the spare kernels nobody claimed. Claimed ones are their
        claimants' to kill (the next sweep kills them if a claimant dies first)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        me = os.getpid()
        for sub in ("spare", "starting", "claimed"):
            for path in (self.folder / sub).glob("*.json"):
                ticket = Ticket.read(path)
                unclaimed = ticket is not None and (sub != "claimed" or ticket.claimant is None)
                if ticket is not None and unclaimed and ticket.owner == me:
                    _kill(ticket.pid, me, ticket.started)
                    path.unlink(missing_ok=True)
                    _remove_files(self.folder, ticket)
        self._reap()

    def spare(self) -> list[Ticket]:
        """The kernels ready to be claimed now."""
        return [t for t in _tickets(self.folder / "spare") if t.owner == os.getpid()]

    def _keep_filled(self) -> None:
        swept = time.monotonic()
        while not self._stop.is_set():
            try:
                self._reap()
                if time.monotonic() - swept > SWEEP_EVERY:  # a sweep reads every process
                    sweep(self.folder)
                    swept = time.monotonic()
                ready = len(self.spare())
                more = self.limit is None or self.started < self.limit
                if more and ready < room_for_kernels(self.size, available_memory()):
                    self._start_one()
                    continue
            except Exception:  # nosec B110: a kernel that fails to start is not handed out
                pass
            self._stop.wait(self.poll)

    def _start_one(self) -> None:
        me = os.getpid()
        kernel_id = uuid.uuid4().hex[:12]
        starting = self.folder / "starting" / f"{kernel_id}.json"
        # Unix sockets, not TCP: a kernel started ahead of time must not take a port that a
        # service about to start (MLflow, the webserver) was given. TCP where the path is too
        # long for a socket.
        ipc = self.folder / f"kernel-{me}-{kernel_id[:6]}"
        km = KernelManager(
            kernel_name="python3",
            connection_file=str(self.folder / f"kernel-{me}-{kernel_id}.json"),
            **({"transport": "ipc", "ip": str(ipc)} if len(str(ipc)) < _SOCKET_PATH else {}),
        )
        env = {k: v for k, v in os.environ.items() if k not in (RUN_TAG, POOL_ENV, DIR_ENV)}
        km.start_kernel(
            cwd=str(self.cwd), env={**env, POOL_ENV: str(me), DIR_ENV: str(self.folder.resolve())}
        )
        self.started += 1
        self._kernels[kernel_id] = km
        pid = int(getattr(km.provisioner, "pid", 0) or 0)
        ticket = Ticket(
            id=kernel_id,
            pid=pid,
            owner=me,
            key=environment_key(),
            connection=_plain(km.get_connection_info()),
            modules=list(self.modules),
            started=processes.start_time(pid),
            owner_started=processes.start_time(me),
        )
        ticket.write(starting)
        if self._stop.is_set() or not _run_silently(km, warm_code(self.modules), 120):
            _kill(pid, me, ticket.started)
            starting.unlink(missing_ok=True)
            return
        os.rename(starting, self.folder / "spare" / f"{kernel_id}.json")

    def _reap(self) -> None:
        """Forget (and wait for) the kernels this pool started that have exited."""
        for kernel_id, km in list(self._kernels.items()):
            provisioner: Any = km.provisioner
            process = getattr(provisioner, "process", None)
            if process is not None and process.poll() is None:
                continue
            with contextlib.suppress(Exception):
                km.cleanup_resources()
            self._kernels.pop(kernel_id)


def _plain(info: dict[str, Any]) -> dict[str, Any]:
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in info.items()}
