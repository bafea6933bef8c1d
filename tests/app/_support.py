"""Shared by the app's tests: where the app is, its pages, free ports and servers."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from dagma.services.procs import free_port as free_port  # one picker for every test
from dagma.settings import PROJECT_ROOT

APP = PROJECT_ROOT / "src" / "dagma" / "app" / "streamlit_app.py"
PAGES = ("overview", "experiments", "model", "search", "chat", "notebooks")


@contextlib.contextmanager
def running(
    argv: Sequence[str], env: Mapping[str, str], log: Path, ready_url: str, timeout: float
) -> Iterator[subprocess.Popen[bytes]]:
    """A server process, once `ready_url` answers; stopped with its children on exit."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            list(argv),
            env=dict(env),
            cwd=PROJECT_ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    with urllib.request.urlopen(ready_url, timeout=2):
                        break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        pytest.fail(f"{argv[0]} did not start:\n{log.read_text()[-3000:]}")
                    time.sleep(0.5)
            yield proc
        finally:
            _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """End `proc` and its children: it leads a process group of its own."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
