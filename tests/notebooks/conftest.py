import shutil
from pathlib import Path

import pytest

from dagma.settings import PROJECT_ROOT


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
