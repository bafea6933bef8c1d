import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.app._support import free_port
from tests.conftest import require

CHROMIUM = Path(os.environ.get("DAGMA_CHROMIUM") or "/usr/bin/chromium")


@pytest.fixture(autouse=True)
def no_dagster_webserver(monkeypatch: pytest.MonkeyPatch) -> None:
    """Point DAGSTER_UI_URL at a closed port, so pages read the embedded instance."""
    monkeypatch.setenv("DAGSTER_UI_URL", f"http://127.0.0.1:{free_port()}")


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """Debian's Chromium through Playwright (never Playwright's own download), one per session."""
    require(CHROMIUM.exists(), f"no Chromium at {CHROMIUM}")
    sync_api = pytest.importorskip("playwright.sync_api")
    playwright = sync_api.sync_playwright().start()
    try:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
        )
        try:
            yield chromium
        finally:
            chromium.close()
    finally:
        playwright.stop()
