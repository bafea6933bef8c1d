import pytest

from tests.app._support import free_port


@pytest.fixture(autouse=True)
def no_dagster_webserver(monkeypatch: pytest.MonkeyPatch) -> None:
    """Point DAGSTER_UI_URL at a closed port, so pages read the embedded instance."""
    monkeypatch.setenv("DAGSTER_UI_URL", f"http://127.0.0.1:{free_port()}")
