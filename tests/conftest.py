import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from dagma.lab import LabRun, materialize
from dagma.settings import PROJECT_ROOT, Settings, get_settings

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


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temp copy of notebooks/ and a fresh DAGMA_HOME."""
    folder = tmp_path / "notebooks"
    shutil.copytree(PROJECT_ROOT / "notebooks", folder)
    monkeypatch.setenv("DAGMA_NOTEBOOKS_DIR", str(folder))
    monkeypatch.setenv("DAGMA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return folder


def stored_value(settings: Settings, name: str) -> Any:
    """What the IO manager stored at asset `name`'s latest materialization.

    A run's `values` holds only the small dicts its materializations recorded as metadata.
    """
    import dagster as dg

    from dagma.lab import load_definitions

    definitions = load_definitions(settings)  # exports DAGSTER_HOME for the instance
    instance = dg.DagsterInstance.get()
    event = instance.get_latest_materialization_event(dg.AssetKey(name))
    assert event is not None and event.dagster_event is not None, f"{name} was never materialized"
    partition = event.dagster_event.partition
    return definitions.load_asset_value(name, instance=instance, partition_key=partition)


def require(present: bool, what: str) -> None:
    """Skip a test whose system tool is missing; under CI (`CI` set) that is a failure."""
    if present:
        return
    message = f"{what}: `bash scripts/install-system-tools.sh` installs it (make test runs it)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)
