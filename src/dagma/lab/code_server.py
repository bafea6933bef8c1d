"""`python -m dagma.lab.code_server ARGS`: Dagster's code server (`dagster api grpc ARGS`),
whose runs start warm.

Dagster's code server starts each run worker as a new Python (`spawn`), which imports Dagster
and loads the code location again before its first step. This one forks each run worker from a
fork server that imported Dagster, papermill and MLflow and loaded the code location once
(`dagma.lab.forkserver`), and keeps spare kernels for their notebooks
(`dagma.notebooks.kernel_pool`). Everything else is Dagster's: each run is a process of its
own, started, cancelled (its termination event) and watched (run monitoring asks this server
about its workers) exactly as before.
"""

from __future__ import annotations

import multiprocessing
import sys
from typing import Any

from dagma.settings import Settings, get_settings


def fork_run_workers(settings: Settings) -> None:
    """Make Dagster's code server fork its run workers from the warm fork server, and start
    that server now, so that it loads while the code server loads."""
    from dagster._grpc import server

    from dagma.lab.forkserver import preload_modules, start_forkserver

    original = server.DagsterApiServer.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self._mp_ctx = multiprocessing.get_context("forkserver")

    server.DagsterApiServer.__init__ = init  # type: ignore[method-assign]
    start_forkserver(preload_modules(), settings.dagster_dir / "run-workers.log")


def main(argv: list[str] | None = None) -> None:
    from dagster._cli.api import api_cli

    from dagma.notebooks import kernel_pool, kernel_warmup

    settings = get_settings()
    settings.ensure_dirs()
    settings.export_env()
    notebooks = kernel_warmup.papermill_notebooks(settings.notebooks_dir, None)
    size = min(kernel_pool.pool_size(), len(notebooks))  # a bad setting stops it here, named
    fork_run_workers(settings)  # before any thread starts: the fork server is forked from here
    pool = kernel_pool.KernelPool(
        settings.kernels_dir,
        size=size,
        modules=kernel_warmup.imports_of(notebooks),
        cwd=settings.notebooks_dir,
    )
    pool.open()
    try:
        api_cli.main(["grpc", *(sys.argv[1:] if argv is None else argv)], prog_name="dagma")
    finally:
        pool.close()


if __name__ == "__main__":
    main()
