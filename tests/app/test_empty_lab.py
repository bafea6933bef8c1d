"""On a lab with nothing built yet, every page says what to run, and creates nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from dagma.settings import PROJECT_ROOT
from tests.app._support import APP, PAGES, free_port


@pytest.fixture
def empty_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "empty"
    monkeypatch.setenv("DAGMA_HOME", str(home))
    for name in ("MLFLOW_TRACKING_URI", "DAGSTER_HOME", "QDRANT_URL", "DAGMA_QDRANT_PATH"):
        monkeypatch.delenv(name, raising=False)
    return home


def open_page(name: str) -> AppTest:
    app = AppTest.from_file(str(APP), default_timeout=120).run()
    app.switch_page(f"pages/{name}.py").run()
    assert not app.exception, [e.value for e in app.exception]
    return app


@pytest.mark.parametrize("page", PAGES)
def test_page_says_what_to_run_and_creates_nothing(page: str, empty_home: Path):
    mlruns = (PROJECT_ROOT / "mlruns").exists(), (PROJECT_ROOT / "mlflow.db").exists()
    app = open_page(page)
    assert any("make demo" in i.value for i in app.info), [i.value for i in app.info]
    assert not app.warning
    assert not empty_home.exists()
    assert ((PROJECT_ROOT / "mlruns").exists(), (PROJECT_ROOT / "mlflow.db").exists()) == mlruns


@pytest.mark.parametrize(
    ("page", "variable"),
    [
        ("experiments", "MLFLOW_TRACKING_URI"),
        ("model", "MLFLOW_TRACKING_URI"),
        ("search", "QDRANT_URL"),
        ("chat", "QDRANT_URL"),
    ],
)
def test_page_names_the_fix_when_a_server_is_down(
    page: str, variable: str, empty_home: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("QDRANT_URL", f"http://127.0.0.1:{free_port()}")
    app = open_page(page)
    assert any(variable in w.value and "dagma services up" in w.value for w in app.warning)
    assert not empty_home.exists()
