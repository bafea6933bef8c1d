import os
from collections.abc import Iterator

import pytest
from rich.console import Console

from dagma.lab import LabRun, materialize
from dagma.settings import Settings, get_settings

QUIET = Console(quiet=True)


@pytest.fixture(autouse=True)
def _restore_environ() -> Iterator[None]:
    """Undo what a test's `dagma run` exported (Settings.export_env sets DAGSTER_HOME and
    MLFLOW_TRACKING_URI for child processes), so no later test or kernel inherits its home."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="session")
def demo() -> tuple[Settings, LabRun]:
    settings = get_settings()
    run = materialize(settings, console=QUIET)
    assert run.success, run.error
    return settings, run
