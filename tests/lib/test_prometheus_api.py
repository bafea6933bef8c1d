"""The Prometheus client against a real Prometheus that scrapes a real exposition server."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from dagma.lib.prometheus_api import (
    Prometheus,
    PrometheusError,
    Series,
    Window,
    dashboard_panels,
    series_name,
    substitute,
)
from dagma.lib.telemetry.metrics import METRICS
from dagma.services.procs import free_port
from dagma.settings import PROJECT_ROOT
from tests.conftest import require

PROMETHEUS = Path(os.environ.get("DAGMA_PROMETHEUS_BIN") or "/usr/bin/prometheus")
DASHBOARD = PROJECT_ROOT / "deploy" / "observability" / "grafana" / "dashboards" / "dagma-lab.json"
# A label value as a hostile notebook or route could make it: markup and a planted link.
HOSTILE = "<img src=x onerror=alert(1)> [click](https://evil.example/?q=1) **bold**"


@dataclass(frozen=True)
class Lab:
    url: str  # Prometheus
    registry: CollectorRegistry  # what the exposition server serves, in this process


# A sample value for each label of the lab's metrics; any other label gets "lab".
SAMPLE = {"outcome": "success", "asset": "wine_model", "phase": "execute", "state": "new"}


def _lab_registry() -> CollectorRegistry:
    """Every metric of the telemetry registry, with a value, and a few more series."""
    registry = CollectorRegistry()
    made = {}
    for spec in METRICS:
        kind = {"counter": Counter, "histogram": Histogram, "gauge": Gauge}[spec.kind]
        metric = kind(spec.name, spec.help, spec.labels, registry=registry)
        made[spec.name] = metric
        child = metric.labels(*(SAMPLE.get(label, "lab") for label in spec.labels))
        if spec.kind == "counter":
            child.inc(3)
        elif spec.kind == "histogram":
            child.observe(0.3)
        else:
            child.set(2)
    made["dagma_runs"].labels("failure").inc()
    made["dagma_asset_steps"].labels(HOSTILE, "failure").inc()
    return registry


def _answers(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(url, timeout=1).status_code == 200
    return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Prometheus leads a process group of its own: end the whole group."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait)
            return


@contextlib.contextmanager
def running_prometheus(tmp: Path) -> Iterator[Lab]:
    """An exposition server in this process and a Prometheus scraping it every second, once
    two scrapes are in (so a rate over them has a value)."""
    require(PROMETHEUS.exists(), f"no Prometheus at {PROMETHEUS} (apt-get install prometheus)")
    registry = _lab_registry()
    exporter_port, port = free_port(), free_port()
    server, thread = start_http_server(exporter_port, addr="127.0.0.1", registry=registry)
    config = tmp / "prometheus.yml"
    config.write_text(
        json.dumps(  # YAML is a superset of JSON
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [
                    {
                        "job_name": "lab",
                        "static_configs": [{"targets": [f"127.0.0.1:{exporter_port}"]}],
                    }
                ],
            }
        )
    )
    url = f"http://127.0.0.1:{port}"
    log = tmp / "prometheus.log"
    argv = [
        str(PROMETHEUS),
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    try:
        with log.open("wb") as out:
            proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            deadline = time.monotonic() + 20
            scraped = 'count_over_time(up{job="lab"}[1m]) >= 2'
            while not (_answers(f"{url}/-/ready") and Prometheus(url).query(scraped)):
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"Prometheus did not start or scrape:\n{log.read_text()[-3000:]}")
                time.sleep(0.2)
            yield Lab(url, registry)
        finally:
            _stop(proc)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with running_prometheus(tmp_path_factory.mktemp("prometheus")) as lab:
        yield lab


def test_an_instant_query_returns_the_series_with_their_labels(prometheus: Lab):
    found = Prometheus(prometheus.url).query("dagma_runs_total")
    values = {s.labels["outcome"]: s.points[-1][1] for s in found}
    assert values == {"success": 3.0, "failure": 1.0}
    assert all(s.labels["job"] == "lab" and len(s.points) == 1 for s in found)
    assert abs(found[0].points[0][0] - time.time()) < 30


def test_a_range_query_returns_a_point_per_step(prometheus: Lab):
    window = Window(seconds=4, step=1)
    (series,) = Prometheus(prometheus.url).query_range('dagma_inbox_files{state="new"}', window)
    assert series.labels["__name__"] == "dagma_inbox_files"
    assert 2 <= len(series.points) <= 5  # from the first scrape on, one per second
    assert {v for _, v in series.points} == {2.0}
    stamps = [t for t, _ in series.points]
    assert stamps == sorted(stamps) and stamps[-1] == pytest.approx(window.end, abs=0.01)


def test_a_rate_over_grafanas_rate_interval_has_a_value(prometheus: Lab):
    window = Window.last(900)
    expr = substitute("sum(rate(dagma_runs_total[$__rate_interval]))", {"__rate_interval": "1m"})
    (series,) = Prometheus(prometheus.url).query_range(expr, window)
    assert series.labels == {} and series.points[-1][1] == 0.0  # counters that stand still


def test_a_scalar_and_nan_come_back_as_floats(prometheus: Lab):
    (scalar,) = Prometheus(prometheus.url).query("scalar(sum(dagma_runs_total)) / 0 * 0")
    assert scalar.labels == {} and scalar.points[0][1] != scalar.points[0][1]  # NaN


def test_a_bad_query_names_the_expression_and_prometheus_words(prometheus: Lab):
    with pytest.raises(PrometheusError) as caught:
        Prometheus(prometheus.url).query("sum(rate(dagma_runs_total[5m])")
    message = str(caught.value)
    assert "`sum(rate(dagma_runs_total[5m])`" in message
    assert "bad_data" in message and "parse error" in message
    assert prometheus.url in message and "Fix:" in message


def test_an_unreachable_prometheus_says_how_to_start_it():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(PrometheusError) as caught:
        Prometheus(url, timeout=2).query("up")
    message = str(caught.value)
    assert url in message and "unreachable" in message
    assert "dagma services up --with observability" in message
    assert "unset DAGMA_PROMETHEUS_URL" in message


def test_a_server_that_is_not_prometheus_is_named(prometheus: Lab):
    # The exposition server answers every path with the metrics text, never the query API.
    with pytest.raises(PrometheusError, match="not Prometheus's API"):
        Prometheus(_exporter_url(prometheus)).query("up")


def _exporter_url(lab: Lab) -> str:
    (series,) = Prometheus(lab.url).query('up{job="lab"}')
    return f"http://{series.labels['instance']}"


@pytest.mark.parametrize("url", ["127.0.0.1:9090", "ftp://host/", "http://", ""])
def test_a_url_that_is_not_http_is_refused_with_an_example(url: str):
    with pytest.raises(PrometheusError, match=r"DAGMA_PROMETHEUS_URL=.*http://127\.0\.0\.1:59090"):
        Prometheus(url)


def test_the_graph_link_opens_the_expression_over_the_range(prometheus: Lab):
    api = Prometheus(prometheus.url + "/")
    link = api.graph_url('sum(rate(dagma_runs_total{outcome="failure"}[1m]))', Window.last(3600))
    assert link.startswith(f"{prometheus.url}/graph?g0.expr=sum%28rate%28dagma_runs_total")
    assert "g0.range_input=3600s" in link
    assert httpx.get(link, timeout=5, follow_redirects=True).status_code == 200


# --------------------------------------------------------------------------- dashboards


def _write(tmp_path: Path, document: object) -> Path:
    path = tmp_path / "dashboard.json"
    path.write_text(json.dumps(document))
    return path


FIXTURE = {
    "title": "Fixture",
    "panels": [
        {
            "type": "timeseries",
            "title": "Runs per second",
            "description": "Finished runs, by outcome.",
            "fieldConfig": {"defaults": {"unit": "ops"}},
            "targets": [
                {
                    "refId": "A",
                    "expr": "sum by (outcome) (rate(dagma_runs_total[$__rate_interval]))",
                    "legendFormat": "{{outcome}}",
                },
                {"refId": "B", "expr": "up", "hide": True},
            ],
        },
        {
            "type": "row",
            "title": "Collapsed",
            "collapsed": True,
            "panels": [
                {
                    "type": "stat",
                    "title": "Runs in range",
                    "targets": [{"expr": "sum(increase(dagma_runs_total[${__range}]))"}],
                }
            ],
        },
        {"type": "text", "title": "Notes", "options": {"content": "hello"}},
    ],
}


def test_panels_come_with_their_queries_and_grafanas_variables_filled_in(tmp_path: Path):
    panels = dashboard_panels(_write(tmp_path, FIXTURE), Window.last(3600))
    assert [(p.title, p.type, p.unit) for p in panels] == [
        ("Runs per second", "timeseries", "ops"),
        ("Runs in range", "stat", ""),
        ("Notes", "text", ""),
    ]
    (rate,) = panels[0].queries  # the hidden query is left out, as Grafana leaves it out
    assert rate.expr == "sum by (outcome) (rate(dagma_runs_total[60s]))"
    assert (rate.legend, rate.ref) == ("{{outcome}}", "A")
    assert panels[1].queries[0].expr == "sum(increase(dagma_runs_total[3600s]))"
    assert panels[2].queries == ()
    assert [p.description for p in panels] == ["Finished runs, by outcome.", "", ""]


def test_the_step_and_intervals_grow_with_the_range(tmp_path: Path):
    path = _write(tmp_path, FIXTURE)
    day = Window.last(86400)
    assert day.step == 360 and day.end - day.start == 86400
    assert "[375s]" in dashboard_panels(path, day)[0].queries[0].expr  # interval + a scrape
    assert Window.last(900).step == 15


def test_variables_that_are_not_grafanas_globals_stay_as_written():
    assert substitute(
        "x[$__interval] $job [[__range]] $__nope", {"__interval": "15s", "__range": "1h"}
    ) == ("x[15s] $job 1h $__nope")


@pytest.mark.parametrize(
    ("document", "words"),
    [
        ("{not json", "is not JSON"),
        ('{"title": "no panels"}', "not a Grafana dashboard"),
        ("[1, 2]", "not a Grafana dashboard"),
        ('{"panels": "many"}', "not a Grafana dashboard"),
        ('{"panels": [3]}', "Panel 1 of the dashboard"),
        ('{"panels": [{"title": "T", "targets": {"expr": "up"}}]}', "'T'"),
    ],
)
def test_anything_but_a_dashboard_is_refused_naming_the_file(
    tmp_path: Path, document: str, words: str
):
    path = tmp_path / "dashboard.json"
    path.write_text(document)
    with pytest.raises(PrometheusError) as caught:
        dashboard_panels(path, Window.last(900))
    assert words in str(caught.value) and str(path) in str(caught.value)
    assert "Fix:" in str(caught.value)


def test_a_missing_dashboard_is_named(tmp_path: Path):
    with pytest.raises(
        PrometheusError, match=r"Cannot read the dashboard .*nowhere\.json.*dagma-lab\.json"
    ):
        dashboard_panels(tmp_path / "nowhere.json", Window.last(900))


def test_the_envelope_of_grafanas_api_is_read_too(tmp_path: Path):
    path = _write(tmp_path, {"dashboard": FIXTURE, "meta": {"slug": "fixture"}})
    assert len(dashboard_panels(path, Window.last(900))) == 3


def test_the_lab_dashboard_yields_every_panel_with_its_queries(prometheus: Lab):
    require(DASHBOARD.exists(), f"no dashboard at {DASHBOARD} yet")
    document = json.loads(DASHBOARD.read_text())
    raw = [p for p in document["panels"] if p.get("type") != "row"]
    raw += [q for p in document["panels"] if p.get("type") == "row" for q in p.get("panels", [])]
    panels = dashboard_panels(DASHBOARD, Window.last(3600))
    assert sorted(p.title for p in panels) == sorted(p["title"] for p in raw)
    api = Prometheus(prometheus.url)
    for panel, source in zip(panels, raw, strict=False):
        shown = [t for t in source.get("targets", []) if t.get("expr") and not t.get("hide")]
        assert len(panel.queries) == len(shown), panel.title
        for query in panel.queries:
            assert "$__" not in query.expr and "${__" not in query.expr, query.expr
            api.query(query.expr)  # every query parses and runs: a PrometheusError fails here


# --------------------------------------------------------------------------- series names


def test_a_series_is_named_by_its_legend_else_its_labels_else_its_expression():
    series = Series({"__name__": "dagma_runs_total", "outcome": "failure", "job": "lab"}, [])
    assert (
        series_name(series, "{{outcome}} runs ({{ job }}, {{missing}})", "e")
        == "failure runs (lab, )"
    )
    assert series_name(series, "", "e") == 'dagma_runs_total{job="lab", outcome="failure"}'
    assert series_name(series, "__auto", "e") == 'dagma_runs_total{job="lab", outcome="failure"}'
    assert series_name(Series({"outcome": "x"}, []), "", "e") == '{outcome="x"}'
    assert series_name(Series({}, []), "", "sum(up)") == "sum(up)"
