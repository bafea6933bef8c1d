import pytest
from rich.console import Console

from dagma.lab import LabRun, materialize
from dagma.settings import Settings, get_settings

QUIET = Console(quiet=True)


@pytest.fixture(scope="session")
def demo() -> tuple[Settings, LabRun]:
    settings = get_settings()
    run = materialize(settings, console=QUIET)
    assert run.success, run.error
    return settings, run
