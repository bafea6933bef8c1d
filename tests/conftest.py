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
    from datetime import UTC, datetime

    from dagma.lib import arrivals

    settings = get_settings()
    # As `dagma demo` does, so that the current hour (the demo's partition) has samples.
    if not arrivals.landed_in(settings.inbox_dir, arrivals.hour_key(datetime.now(UTC))):
        arrivals.write_sample(settings.inbox_dir)
    run = materialize(settings, console=QUIET)
    assert run.success, run.error
    return settings, run
