"""One real `dagma serve` (uvicorn on a free loopback port) over the session's demo lab."""

from __future__ import annotations

import datetime
import os
import secrets
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydantic import SecretStr

from dagma.api.auth import SCOPES, issue_token
from dagma.client import DagmaClient
from dagma.settings import Settings
from tests.app._support import free_port, running


@dataclass(frozen=True)
class LabApi:
    """The served API: its URL, the lab's settings (with the API's secret) and a token maker."""

    url: str
    settings: Settings
    pid: int
    log: Path

    def token(self, scopes: Sequence[str] = SCOPES) -> str:
        return issue_token(self.settings, list(scopes), datetime.timedelta(minutes=30), "tests")

    def client(self, scopes: Sequence[str] = SCOPES) -> DagmaClient:
        return DagmaClient(self.url, self.token(scopes), timeout=300)


@pytest.fixture(scope="session")
def lab_api(
    demo: tuple[Settings, object], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LabApi]:
    """`dagma serve` on the demo lab; the champion is asked for on every request (TTL 0)."""
    settings, _ = demo
    secret = secrets.token_urlsafe(32)
    port = free_port()
    env = {
        **os.environ,
        "DAGMA_HOME": str(settings.home),
        "MLFLOW_TRACKING_URI": settings.tracking_uri,
        "DAGMA_API_SECRET": secret,
        "DAGMA_API_MODEL_TTL": "0",
        "DAGMA_LLM": "local",
    }
    env.pop("DAGMA_OIDC_ISSUER", None)
    log = Path(tmp_path_factory.mktemp("api")) / "serve.log"
    argv = [sys.executable, "-m", "dagma.cli", "serve", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    with running(argv, env, log, f"{url}/healthz", timeout=90) as proc:
        api_settings = settings.model_copy(
            update={"dagma_api_secret": SecretStr(secret), "dagma_oidc_issuer": None}
        )
        yield LabApi(url, api_settings, proc.pid, log)
