"""The lab's metrics: off costs nothing, names are checked, labels are bounded, and figures
from separate processes of one session meet in one exposition."""

import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from dagma.lib.telemetry import metrics
from dagma.services.procs import free_port

CHILD = """
import sys
from dagma.lib.telemetry import metrics
metrics.record("dagma_asset_steps", asset=sys.argv[1], outcome="success")
metrics.record("dagma_notebook_cell_duration_seconds", 0.2, notebook=sys.argv[1])
"""


def test_off_records_nothing_and_imports_no_prometheus_client():
    code = (
        "import sys\nfrom dagma.lib.telemetry import metrics\n"
        "metrics.record('dagma_runs', outcome='success')\n"
        "print('prometheus_client' in sys.modules)"
    )
    env = {
        k: v for k, v in os.environ.items() if k not in (metrics.MULTIPROC_ENV, metrics.PUSH_ENV)
    }
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )  # nosec B603
    assert out.stdout.strip() == "False"


def test_an_unknown_metric_or_label_names_the_registry(monkeypatch):
    monkeypatch.setenv(metrics.PUSH_ENV, "http://127.0.0.1:9")  # metrics on, as when pushing
    with pytest.raises(metrics.MetricsError, match="add it to METRICS"):
        metrics.record("dagma_nope")
    with pytest.raises(metrics.MetricsError, match="dagma_runs"):
        metrics.record("dagma_runs", status="x")


def test_label_values_are_bounded_per_label():
    for i in range(metrics.MAX_LABEL_VALUES):
        assert metrics.bounded("test_metric", "asset", f"a{i}") == f"a{i}"
    assert metrics.bounded("test_metric", "asset", "one more") == metrics.OTHER
    assert metrics.bounded("test_metric", "asset", "a3") == "a3"
    assert metrics.bounded("other_metric", "x", "we<ird>\nvalue") == "we_ird__value"


def test_processes_of_one_session_share_one_exposition(tmp_path: Path):
    env = {**os.environ, **metrics.shared_dir_env(tmp_path / "m", fresh=True)}
    for asset in ("alpha", "beta", "alpha"):
        subprocess.run([sys.executable, "-c", CHILD, asset], env=env, check=True)  # nosec B603
    port = free_port()
    serve = (
        "import sys, time\nfrom dagma.lib.telemetry import metrics\n"
        f"metrics.serve('127.0.0.1', {port})\nprint('up', flush=True)\ntime.sleep(60)"
    )
    server = subprocess.Popen(
        [sys.executable, "-c", serve], env=env, stdout=subprocess.PIPE, text=True
    )  # nosec B603
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "up"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:  # nosec B310
            text = reply.read().decode()
    finally:
        server.kill()
        server.wait()
    assert 'dagma_asset_steps_total{asset="alpha",outcome="success"} 2.0' in text
    assert 'dagma_asset_steps_total{asset="beta",outcome="success"} 1.0' in text
    assert 'dagma_notebook_cell_duration_seconds_count{notebook="alpha"} 2.0' in text
    # a fresh session forgets the last one's figures
    metrics.shared_dir_env(tmp_path / "m", fresh=True)
    assert not list((tmp_path / "m").glob("*.db"))


def test_a_taken_port_is_named_with_the_fix():
    port = free_port()
    first = metrics.serve("127.0.0.1", port)
    try:
        with pytest.raises(metrics.MetricsError, match=rf"127.0.0.1:{port}.*--metrics-port"):
            metrics.serve("127.0.0.1", port)
    finally:
        first.shutdown()


def test_a_push_to_nowhere_names_the_url_and_the_setting(monkeypatch):
    monkeypatch.setenv(metrics.PUSH_ENV, "http://127.0.0.1:9")  # metrics on, as when pushing
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(metrics.MetricsError, match=rf"{url}.*DAGMA_METRICS_PUSH_URL"):
        metrics.push(url, job="dagma_run")


def test_a_shared_folder_not_made_yet_is_made_on_first_use(tmp_path: Path):
    folder = tmp_path / "not" / "yet"
    env = {**os.environ, metrics.MULTIPROC_ENV: str(folder)}
    subprocess.run([sys.executable, "-c", CHILD, "gamma"], env=env, check=True)  # nosec B603
    assert list(folder.glob("counter_*.db"))
