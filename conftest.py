"""Session set-up shared by the unit tests, the integration tests and nbval.

nbval starts each notebook's kernel before any fixture runs, so the lab home the kernels
use is created here, at session start, with the notebooks' upstream data materialized.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

SESSION_HOME = "DAGMA_TEST_SESSION_HOME"


def pytest_sessionstart(session) -> None:  # type: ignore[no-untyped-def]
    if os.environ.get(SESSION_HOME):
        return
    home = Path(tempfile.mkdtemp(prefix="dagma-test-"))
    os.environ[SESSION_HOME] = str(home)
    for name in ("DAGSTER_HOME", "MLFLOW_TRACKING_URI", "QDRANT_URL", "DAGMA_QDRANT_PATH"):
        os.environ.pop(name, None)
    os.environ["DAGMA_HOME"] = str(home)
    from dagma.lab import materialize
    from dagma.settings import get_settings

    run = materialize(get_settings(), selection=["wine_table", "doc_corpus"])
    if not run.success:
        raise RuntimeError(f"Could not prepare the test lab home {home}: {run.error}")


def pytest_sessionfinish(session, exitstatus) -> None:  # type: ignore[no-untyped-def]
    home = os.environ.get(SESSION_HOME)
    if home and not os.environ.get("DAGMA_KEEP_TEST_HOME"):
        shutil.rmtree(home, ignore_errors=True)
