"""Backends that cannot be reached give 503s naming the setting to fix; slow answers a 504."""

from __future__ import annotations

import datetime
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from dagma.api.app import create_app
from dagma.api.auth import SCOPES, issue_token
from dagma.client import DagmaApiError, DagmaClient
from dagma.lab import LabRun
from dagma.settings import Settings
from tests.api.auth_servers import serving
from tests.app._support import free_port

QUESTION = "How do I catch an exception and still run clean-up code?"


def _client(settings: Settings) -> Iterator[DagmaClient]:
    """A client of `create_app(settings)` under a real uvicorn, in this process."""
    token = issue_token(settings, list(SCOPES), datetime.timedelta(minutes=5))
    with serving(create_app(settings)) as url, DagmaClient(url, token, timeout=120) as api:
        yield api


@pytest.fixture
def down(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[DagmaClient]:
    """An app whose MLflow, Qdrant and OpenAI-compatible chat server are closed ports."""
    closed = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("DAGMA_LLM", "openai")
    monkeypatch.setenv("DAGMA_LLM_MODEL", "smollm2")
    monkeypatch.setenv("OPENAI_BASE_URL", f"{closed}/v1")
    settings = Settings(
        _env_file=None,
        dagma_home=tmp_path,
        mlflow_tracking_uri=closed,
        qdrant_url=closed,
        dagma_api_secret=SecretStr(secrets.token_urlsafe(32)),
    )
    yield from _client(settings)


def test_each_unreachable_backend_is_503_with_its_fix(down: DagmaClient) -> None:
    ready = down.ready()
    assert not ready.ready
    fixes = {name: (c.ok, c.fix or "") for name, c in ready.components.items()}
    assert not fixes["model"][0] and "MLFLOW_TRACKING_URI" in fixes["model"][1]
    assert not fixes["collection"][0] and "QDRANT_URL" in fixes["collection"][1]
    assert not fixes["llm"][0] and "OPENAI_BASE_URL" in ready.components["llm"].detail
    calls = {
        "MLflow": lambda: down.predict([{"alcohol": 13.0}]),
        "QDRANT_URL": lambda: down.search("exceptions"),
        "QDRANT_URL ": lambda: down.ask(QUESTION),
    }
    for needle, call in calls.items():
        with pytest.raises(DagmaApiError) as caught:
            call()
        assert caught.value.status == 503, caught.value
        assert needle.strip() in str(caught.value), caught.value


@pytest.mark.integration
def test_an_unreachable_chat_server_is_503_and_a_slow_answer_504(
    demo: tuple[Settings, LabRun], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, _ = demo
    secret = SecretStr(secrets.token_urlsafe(32))
    monkeypatch.setenv("DAGMA_LLM", "openai")
    monkeypatch.setenv("DAGMA_LLM_MODEL", "smollm2")
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{free_port()}/v1")
    for api in _client(settings.model_copy(update={"dagma_api_secret": secret})):
        with pytest.raises(DagmaApiError) as caught:
            api.ask(QUESTION)
        assert caught.value.status == 503 and "OPENAI_BASE_URL" in str(caught.value)
        with pytest.raises(DagmaApiError) as caught:
            list(api.ask_stream(QUESTION))
        assert caught.value.status == 503 and "OPENAI_BASE_URL" in str(caught.value)
    monkeypatch.setenv("DAGMA_LLM", "local")
    slow = settings.model_copy(update={"dagma_api_secret": secret, "dagma_api_ask_timeout": 0.01})
    for api in _client(slow):
        with pytest.raises(DagmaApiError) as caught:
            api.ask(QUESTION)
        assert caught.value.status == 504, caught.value
        assert "DAGMA_API_ASK_TIMEOUT=0.01" in caught.value.error
        with pytest.raises(DagmaApiError) as caught:
            list(api.ask_stream(QUESTION))
        assert caught.value.status in (503, 504), caught.value  # 503: the abandoned one runs on
        assert "DAGMA_API_ASK_TIMEOUT" in caught.value.fix
