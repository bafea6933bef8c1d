"""The fork server that step processes of a multiprocess run start from, warm.

It imports Dagster, papermill, MLflow and the code location once; each step process forks
from it instead of importing them again. It is started early, while this process prepares the
run.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

# Imported once by the fork server before the code location, so step processes skip them.
PRELOAD: tuple[str, ...] = (
    "dagster._utils.test",
    "papermill",
    "nbconvert",
    "mlflow",
    "dagma.lib.tracking",
    "dagma.notebooks.runner",
    "dagma.notebooks.kernel_pool",
)
# Set while the fork server starts: importing this module there loads the code location once.
_WARM_ENV = "DAGMA_FORK_SERVER_WARM"
_FORKSERVER_ENV: list[str] = []


def preload_modules() -> list[str]:
    """What the fork server imports once, so that each step's process starts with it."""
    import dagma

    root = Path(dagma.__file__).resolve().parent
    defs = []
    for path in sorted((root / "defs").rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        defs.append(".".join(("dagma", *parts)))
    return [
        "dagster._core.executor.multiprocess",
        *PRELOAD,
        "dagma.definitions",
        *defs,
        __name__,  # last: loads the code location there (see warm_fork_server)
    ]


def start_forkserver(preload: list[str], log: Path) -> None:
    """Start the fork server now, importing `preload` while this process prepares the run.

    Step processes inherit the server's environment, not ours: a server started under another
    environment (another DAGMA_HOME, say) is stopped and started again. They also inherit its
    stderr, which goes to `log`: each step process would otherwise print a DEBUG line through
    the progress bar. Failures still reach the run's events and the summary.
    """
    import hashlib
    import multiprocessing
    from multiprocessing import forkserver

    env = sorted((k, v) for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST")
    key = hashlib.sha256(repr((env, preload, str(log))).encode()).hexdigest()
    server: Any = getattr(forkserver, "_forkserver", None)
    running = getattr(server, "_forkserver_pid", None) is not None
    if running and key in _FORKSERVER_ENV:
        return
    if running:
        server._stop()
    multiprocessing.get_context("forkserver").set_forkserver_preload(preload)
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    target = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.environ[_WARM_ENV] = "1"
    try:
        os.dup2(target, 2)
        forkserver.ensure_running()
    finally:
        os.environ.pop(_WARM_ENV, None)
        os.dup2(saved, 2)
        os.close(saved)
        os.close(target)
    _FORKSERVER_ENV[:] = [key]


def warm_fork_server() -> None:
    """In the fork server: what every step process would otherwise build for itself."""
    try:
        from dagma.lab.definitions import step_definitions
        from dagma.notebooks.runner import warm_html_exporter

        step_definitions()
        warm_html_exporter()
    except Exception:  # nosec B110: each step process then loads what it needs itself
        pass


if os.environ.pop(_WARM_ENV, None) == "1":
    warm_fork_server()
