"""`dagma lab`: dagster dev, the MLflow UI, JupyterLab and the app in the foreground, together.

Unlike services mode nothing is detached: the processes live as long as the command, and
Ctrl-C, SIGTERM, SIGHUP (a closed terminal) or any of them dying stops them all, including the
kernels they started. JupyterLab asks for a token, fresh per run unless JUPYTER_TOKEN is set.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dagma.lib import processes
from dagma.lib.telemetry import metrics
from dagma.services import health, metrics_exporter
from dagma.services.procs import (
    MARKER,
    ProcRecord,
    ServiceError,
    marked_pids,
    port_in_use,
    record_alive,
    spawn,
    terminate,
    venv_bin,
)
from dagma.services.supervisor import tail
from dagma.settings import PROJECT_ROOT, Settings

LOOPBACK = "127.0.0.1"
DEFAULT_PORTS = {"dagster": 3000, "mlflow": 5000, "jupyter": 8888, "app": 8501, "metrics": 9464}
LAB_MARKER = re.compile(r"lab-(?P<pid>\d+)-(?P<started>\d+)-\w+")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
ROOT_WARNING = (
    "warning: running as root, so JupyterLab starts with --allow-root and every notebook, "
    "kernel and terminal in it runs as root. Run `dagma lab` as a normal user instead (in a "
    "container: a non-root USER, like the devcontainer's)."
)


@dataclass
class LabProcess:
    name: str
    argv: list[str]
    port: int
    url: str
    health_url: str
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class LabPlan:
    processes: list[LabProcess]
    skipped: dict[str, str]
    urls: dict[str, str]
    warnings: list[str] = field(default_factory=list)
    # The session's shared folder of Prometheus figures; None with --metrics-port 0.
    metrics_dir: Path | None = None


def plan(settings: Settings, ports: Mapping[str, int], jupyter: bool = True) -> LabPlan:
    """What `dagma lab` starts; an MLflow server already in use (services mode) is reused."""
    ports = {**DEFAULT_PORTS, **ports}
    url = {name: f"http://{LOOPBACK}:{port}" for name, port in ports.items()}
    skipped: dict[str, str] = {}
    warnings: list[str] = []
    procs = [
        LabProcess(
            "dagster",
            [
                venv_bin("dagster"),
                "dev",
                "-m",
                "dagma.definitions",
                "-h",
                LOOPBACK,
                "-p",
                str(ports["dagster"]),
            ],
            ports["dagster"],
            url["dagster"],
            url["dagster"] + "/server_info",
            {"DAGSTER_HOME": str(settings.dagster_dir)},
        )
    ]
    if settings.tracking_uri.startswith(("http://", "https://")):
        url["mlflow"] = settings.mlflow_ui
        skipped["mlflow"] = f"MLFLOW_TRACKING_URI is the server {settings.tracking_uri}"
    else:
        procs.append(
            LabProcess(
                "mlflow",
                [
                    venv_bin("mlflow"),
                    "ui",
                    "--host",
                    LOOPBACK,
                    "--port",
                    str(ports["mlflow"]),
                    "--backend-store-uri",
                    settings.tracking_uri,
                    "--default-artifact-root",
                    str(settings.artifact_root),
                ],
                ports["mlflow"],
                url["mlflow"],
                url["mlflow"] + "/health",
            )
        )
    jupyter_bin = Path(sys.executable).parent / "jupyter-lab"
    if not jupyter:
        skipped["jupyter"] = "--no-jupyter"
    elif not jupyter_bin.exists():
        skipped["jupyter"] = "JupyterLab is not installed: run `make lab` (uv's `lab` group)"
    else:
        # The token goes in the environment, not argv, which every local user can read in `ps`.
        token = os.environ.get("JUPYTER_TOKEN") or secrets.token_urlsafe(32)
        argv = [str(jupyter_bin), "--ip", LOOPBACK, "--port", str(ports["jupyter"])]
        argv += ["--no-browser", "--notebook-dir", str(settings.notebooks_dir)]
        if os.geteuid() == 0:
            argv.append("--allow-root")
            warnings.append(ROOT_WARNING)
        procs.append(
            LabProcess(
                "jupyter",
                argv,
                ports["jupyter"],
                f"{url['jupyter']}/lab?token={token}",
                url["jupyter"] + "/api",  # answers without the token
                {"JUPYTER_TOKEN": token},
            )
        )
    procs.append(
        LabProcess(
            "app",
            [
                venv_bin("streamlit"),
                "run",
                str(PROJECT_ROOT / "src/dagma/app/streamlit_app.py"),
                "--server.address",
                LOOPBACK,
                "--server.port",
                str(ports["app"]),
                "--server.headless",
                "true",
                "--browser.gatherUsageStats",
                "false",
            ],
            ports["app"],
            url["app"],
            url["app"] + "/_stcore/health",
        )
    )
    metrics_dir = None
    if ports["metrics"]:
        metrics_dir = settings.home / "metrics" / "lab"
        procs.append(
            LabProcess(
                "metrics",
                metrics_exporter.command(LOOPBACK, ports["metrics"]),
                ports["metrics"],
                url["metrics"] + "/metrics",
                url["metrics"] + "/metrics",
            )
        )
    else:
        skipped["metrics"] = "--metrics-port 0"
    urls = {p.name: p.url for p in procs}
    if "mlflow" in skipped:
        urls["mlflow"] = url["mlflow"]
    return LabPlan(procs, skipped, urls, warnings, metrics_dir)


class Lab:
    """The started processes; `stop()` ends them and everything they spawned."""

    def __init__(self, settings: Settings, lab_plan: LabPlan) -> None:
        self.settings = settings
        self.plan = lab_plan
        # Names this process (pid and start time), so a later lab can tell its leftovers.
        me = os.getpid()
        self.marker = f"lab-{me}-{processes.start_time(me)}-{uuid.uuid4().hex[:8]}"
        self.records: dict[str, ProcRecord] = {}
        self.logs = settings.home / "logs" / "lab"
        self.stopping = False

    def env(self) -> dict[str, str]:
        env = {**os.environ, MARKER: self.marker, "DAGMA_HOME": str(self.settings.home)}
        env["DAGSTER_UI_URL"] = self.plan.urls["dagster"]
        env["MLFLOW_UI_URL"] = self.plan.urls["mlflow"]
        env.setdefault("MLFLOW_TRACKING_URI", self.settings.tracking_uri)
        env.pop(metrics.MULTIPROC_ENV, None)  # a shell's or an enclosing session's
        if self.plan.metrics_dir is not None:
            env[metrics.MULTIPROC_ENV] = str(self.plan.metrics_dir)
        return env

    def start(self, progress: Callable[[str], None], timeout: float = 120.0) -> None:
        """Start every process and wait until each answers its health URL."""
        left = leftovers(self.settings.home)
        if left:
            terminate(left, timeout=10)
            progress(f"stopped {len(left)} processes a killed `dagma lab` left running: {left}")
        busy = [p for p in self.plan.processes if port_in_use(p.port)]
        if busy:
            names = ", ".join(f"{p.name} ({p.port})" for p in busy)
            raise ServiceError(
                f"port in use: {names}. Stop what listens there or pick other ports, "
                f"e.g. `dagma lab --{busy[0].name}-port {busy[0].port + 1}`."
            )
        self.settings.ensure_dirs()
        if self.plan.metrics_dir is not None:
            # The last session's processes are gone (swept above): its figures go too.
            metrics.shared_dir_env(self.plan.metrics_dir, fresh=True)
        base = self.env()
        for proc in self.plan.processes:
            log = self.logs / f"{proc.name}.log"
            self.records[proc.name] = spawn(
                proc.name, proc.argv, env={**base, **proc.env}, log=log, cwd=PROJECT_ROOT
            )
            progress(f"starting {proc.name} (log: {log})")
        deadline = time.monotonic() + timeout
        waiting = list(self.plan.processes)
        while waiting:
            for proc in list(waiting):
                self.check_alive(proc.name)
                if health.http_ok(proc.health_url, timeout=2)[0]:
                    progress(f"{proc.name} is up at {proc.url}")
                    waiting.remove(proc)
            if waiting and time.monotonic() > deadline:
                names = ", ".join(p.name for p in waiting)
                raise ServiceError(
                    f"{names} did not answer within {timeout:.0f} s; see the logs in {self.logs}"
                )
            time.sleep(0.5)

    def check_alive(self, name: str) -> None:
        record = self.records[name]
        if not record_alive(record):
            raise ServiceError(
                f"{name} exited; the end of its log ({record.log}):\n{tail(Path(record.log), 15)}"
            )

    def run(self, progress: Callable[[str], None], ready: Callable[[], None]) -> None:
        """Start everything, call `ready`, and wait. Ctrl-C, SIGTERM and SIGHUP return, a dead
        process raises ServiceError; either way everything is stopped first."""
        previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._interrupt)
        try:
            self.start(progress)
            ready()
            self.wait()
        except KeyboardInterrupt:
            pass
        finally:
            self.stopping = True  # from here on a signal no longer interrupts the stopping
            with contextlib.suppress(OSError):  # a closed terminal cannot be written to
                progress("Stopping the lab...")
            self.stop()
            with contextlib.suppress(OSError):
                progress("Stopped.")
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _interrupt(self, signum: int, frame: Any) -> None:
        if not self.stopping:
            self.stopping = True
            raise KeyboardInterrupt

    def wait(self) -> None:
        """Block until interrupted (KeyboardInterrupt) or a process dies (ServiceError)."""
        while True:
            for name in self.records:
                self.check_alive(name)
            time.sleep(0.5)

    def stop(self, timeout: float = 20.0) -> list[int]:
        """SIGTERM each process group, then whatever still carries the marker (kernels)."""
        terminate(list(self.records.values()), timeout=timeout)
        leftovers = marked_pids(self.marker)
        terminate(leftovers, timeout=5)
        return leftovers


def leftovers(home: Path) -> list[int]:
    """What a `dagma lab` on `home` started and left running when it was killed (SIGKILL gives
    it no time to stop them): processes with its marker whose lab process is gone."""
    found = []
    for pid in processes.tagged("DAGMA_HOME", str(home)):
        lab = LAB_MARKER.fullmatch(processes.environ(pid).get(MARKER, ""))
        if lab and not processes.same_process(int(lab["pid"]), int(lab["started"])):
            found.append(pid)
    return found
