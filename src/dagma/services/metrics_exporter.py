"""`python -m dagma.services.metrics_exporter --port N`: one `/metrics` for a whole session.

`dagma services up` and `dagma lab` run it as one more process. It serves the figures every
process of the session writes into the shared folder (`PROMETHEUS_MULTIPROC_DIR`), the dead
ones' included, until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from dagma.errors import DagmaError
from dagma.lib.telemetry import metrics
from dagma.services.procs import venv_bin

LOOPBACK = "127.0.0.1"


def command(host: str, port: int) -> list[str]:
    """How a session starts the exporter."""
    return [venv_bin("python"), "-m", __name__, "--host", host, "--port", str(port)]


class ExporterError(DagmaError):
    """The exporter has no shared folder to serve, or cannot listen."""


def start(host: str, port: int) -> object:
    """Serve the session's folder on host:port; the server (`.shutdown()`)."""
    folder = os.environ.get(metrics.MULTIPROC_ENV)
    if not folder:
        raise ExporterError(
            f"the metrics exporter serves a session's shared folder, and {metrics.MULTIPROC_ENV} "
            "is not set. Fix: start it through `dagma services up` or `dagma lab`, or set "
            f"{metrics.MULTIPROC_ENV} to the folder the session's processes write to."
        )
    metrics.shared_dir_env(Path(folder), fresh=False)  # exists, mode 0700
    server = metrics.serve(host, port)
    metrics.build_info()
    return server


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dagma.services.metrics_exporter")
    parser.add_argument("--host", default=LOOPBACK)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    try:
        server = start(args.host, args.port)
    except DagmaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"serving the session's metrics on http://{args.host}:{args.port}/metrics", flush=True)
    while not stop.wait(1.0):
        pass
    server.shutdown()  # type: ignore[attr-defined]
    return 0


if __name__ == "__main__":
    sys.exit(main())
