"""The Monitoring page: the lab's dashboard from a real Prometheus, through Streamlit's harness."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from streamlit.testing.v1 import AppTest

from dagma.services.procs import free_port
from tests.app._support import APP
from tests.lib.test_prometheus_api import HOSTILE, Lab, prometheus  # noqa: F401 (a fixture)


@pytest.fixture(autouse=True)
def empty_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lab with nothing built, so the Overview the app opens on costs nothing."""
    monkeypatch.setenv("DAGMA_HOME", str(tmp_path / "home"))
    for name in ("MLFLOW_TRACKING_URI", "DAGSTER_HOME", "QDRANT_URL", "DAGMA_GRAFANA_DASHBOARD"):
        monkeypatch.delenv(name, raising=False)


def open_monitoring() -> AppTest:
    app = AppTest.from_file(str(APP), default_timeout=60).run()
    app.switch_page("pages/monitoring.py").run()
    assert not app.exception, [e.value for e in app.exception]
    assert app.title[0].value == "Monitoring"
    return app


def lines(app: AppTest) -> list[set[str]]:
    """Each line chart's series names, in page order."""
    found = []
    for chart in app.get("vega_lite_chart"):
        proto: Any = chart.proto
        raw = proto.datasets[0].data.data if proto.datasets else proto.data.data
        frame = pa.ipc.open_stream(raw).read_all().to_pandas()
        found.append(set(frame["series"]))
    return found


def texts(app: AppTest) -> list[str]:
    """Everything on the page that Streamlit reads as markdown."""
    shown = [e.value for e in (*app.markdown, *app.caption, *app.error, *app.info)]
    return shown + [m.label for m in app.metric]


def test_without_a_prometheus_url_the_page_says_how_to_set_it(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("DAGMA_PROMETHEUS_URL", raising=False)
    app = open_monitoring()
    (hint,) = app.info
    assert "DAGMA_PROMETHEUS_URL=http://127.0.0.1:59090" in hint.value
    assert "dagma services up --with observability" in hint.value
    assert not app.get("vega_lite_chart") and not app.metric and not app.radio


def test_the_lab_dashboard_renders_from_prometheus(
    prometheus: Lab,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
):
    monkeypatch.setenv("DAGMA_PROMETHEUS_URL", prometheus.url)
    app = open_monitoring()
    assert not app.error, [e.value for e in app.error]
    charts = lines(app)
    assert {"success", "failure"} in charts  # "Runs by outcome", one line per legend
    assert {"wine_model success", f"{HOSTILE} failure"} in charts  # a label is data, verbatim
    inbox = next(m for m in app.metric if m.label == "Inbox files waiting")
    assert inbox.value == "2"
    assert any(m.value == "0 %" for m in app.metric if "failure rate" in m.label)
    assert any(f"{prometheus.url}/graph?g0.expr=" in c.value for c in app.caption)
    assert not any("<img" in t or "](https://evil" in t for t in texts(app))
    app.radio[0].set_value("15 min").run()
    assert not app.exception and not app.error
    assert any("g0.range_input=900s" in c.value for c in app.caption)


def test_labels_show_as_written_and_a_bad_query_is_one_panels_error(
    prometheus: Lab,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
):
    steps = {
        "type": "stat",
        "title": "Steps",
        "targets": [{"expr": "dagma_asset_steps_total", "legendFormat": "{{asset}}"}],
    }
    broken = {"type": "timeseries", "title": "Broken", "targets": [{"expr": "rate(up[1m]"}]}
    dashboard = tmp_path / "mine.json"
    dashboard.write_text(
        json.dumps({"panels": [steps, broken, {"type": "text", "title": "Notes"}]})
    )
    monkeypatch.setenv("DAGMA_GRAFANA_DASHBOARD", str(dashboard))
    monkeypatch.setenv("DAGMA_PROMETHEUS_URL", prometheus.url)
    app = open_monitoring()
    hostile, wine = sorted(m.label for m in app.metric)  # one metric per series, by its legend
    # Escaped: markdown would render the link and the emphasis (and HTML, were it allowed).
    assert "\\<img src\\=x" in hostile and "\\[click\\]\\(https\\:" in hostile
    assert "\\*\\*bold" in hostile and wine == "Steps · wine\\_model"
    (error,) = app.error
    assert "`rate(up[1m]`" in error.value and "parse error" in error.value
    assert "Fix:" in error.value
    assert any("A text panel" in c.value for c in app.caption)


def test_an_unreachable_prometheus_is_one_error_with_the_fix(monkeypatch: pytest.MonkeyPatch):
    url = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("DAGMA_PROMETHEUS_URL", url)
    app = open_monitoring()
    (error,) = app.error
    assert url in error.value and "dagma services up --with observability" in error.value
    assert not app.metric and not app.get("vega_lite_chart")


def test_a_missing_dashboard_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("DAGMA_PROMETHEUS_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("DAGMA_GRAFANA_DASHBOARD", str(tmp_path / "gone.json"))
    app = open_monitoring()
    (error,) = app.error
    assert "gone.json" in error.value and "Cannot read the dashboard" in error.value
