"""`/metrics` of a real `dagma serve`: requests counted by route template, never by raw path,
open to a direct scrape and refused to a request a proxy (the gateway) forwards."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dagma.version import version
from tests.api.conftest import LabApi

pytestmark = pytest.mark.integration


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The exposition's samples called `name`: sorted labels -> value."""
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


def test_metrics_count_requests_by_route_template_and_never_by_raw_path(lab_api: LabApi) -> None:
    token = {"Authorization": f"Bearer {lab_api.token(['search'])}"}
    with httpx.Client(base_url=lab_api.url, timeout=300) as http:
        assert (
            http.get("/v1/search", params={"q": "wine acidity"}, headers=token).status_code == 200
        )
        assert http.get("/v1/nope/123").status_code == 404
        assert http.get("/v1/nope/456", headers=token).status_code == 404
        scrape = http.get("/metrics")  # no token: Prometheus scrapes it directly
    assert scrape.status_code == 200, scrape.text
    assert scrape.headers["content-type"].startswith("text/plain")
    requests = samples(scrape.text, "dagma_api_requests_total")
    search = (("method", "GET"), ("route", "/v1/search"), ("status", "200"))
    assert requests.get(search, 0) >= 1, requests
    assert requests[(("method", "GET"), ("route", "other"), ("status", "404"))] >= 2, requests
    assert "/v1/nope" not in scrape.text  # an unknown path adds no series
    durations = samples(scrape.text, "dagma_api_request_duration_seconds_count")
    assert durations[(("method", "GET"), ("route", "/v1/search"))] >= 1, durations
    searches = samples(scrape.text, "dagma_vector_search_duration_seconds_count")
    assert searches[(("backend", "embedded"),)] >= 1, searches  # the search behind the route
    [(labels, one)] = samples(scrape.text, "dagma_build_info").items()
    assert one == 1 and dict(labels)["version"] == version(), labels


def test_metrics_are_refused_to_a_request_the_gateway_forwards(lab_api: LabApi) -> None:
    """Traefik routes every path of the API's host name to it, /metrics included, and adds
    X-Forwarded-For to each request: the API itself answers those with 404."""
    with httpx.Client(base_url=lab_api.url, timeout=60) as http:
        direct = http.get("/metrics")
        for header in ("X-Forwarded-For", "Forwarded", "X-Real-Ip"):
            forwarded = http.get("/metrics", headers={header: "203.0.113.9"})
            assert forwarded.status_code == 404, (header, forwarded.text)
            assert "dagma_api_requests_total" not in forwarded.text
    assert direct.status_code == 200 and "dagma_api_requests_total" in direct.text


def test_with_tracing_on_each_request_is_a_span_named_by_its_route(tmp_path: Path) -> None:
    """OpenTelemetry's FastAPI instrumentation on the app's own provider; /healthz and /metrics
    (a probe and a scrape every few seconds) make no spans."""
    from fastapi.testclient import TestClient
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from pydantic import SecretStr

    from dagma.api.app import create_app
    from dagma.lib.telemetry import tracing
    from dagma.settings import Settings

    exporter = InMemorySpanExporter()
    tracing.configure(exporter)
    try:
        settings = Settings(dagma_home=tmp_path, dagma_api_secret=SecretStr("s" * 43))
        with TestClient(create_app(settings)) as client:
            assert client.get("/v1/search", params={"q": "wine"}).status_code == 401
            assert client.get("/healthz").status_code == 200
            assert client.get("/metrics").status_code == 200
    finally:
        tracing.shutdown()
    names = {span.name for span in exporter.get_finished_spans()}
    assert "GET /v1/search" in names, names
    assert not [n for n in names if "/healthz" in n or "/metrics" in n], names
