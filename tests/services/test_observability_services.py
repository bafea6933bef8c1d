"""The metrics exporter and `--with observability` on their own, without the topology (that
runs once, in test_services_mode.py): what they refuse and how, what the exporter serves, and
that the Prometheus config `up` writes is one Prometheus accepts."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from dagma.services import prometheus
from dagma.services.config import ServicesConfig
from dagma.services.procs import ServiceError, free_port, marked_pids
from dagma.services.supervisor import Topology
from tests.conftest import require

ROOT = Path(__file__).resolve().parents[2]


def services_cli(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DAGMA_", "PROMETHEUS_"))}
    return subprocess.run(
        [sys.executable, "-m", "dagma.services.cli", *args],
        env={**clean, "DAGMA_HOME": str(home), **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def said(done: subprocess.CompletedProcess[str]) -> str:
    return " ".join((done.stdout + done.stderr).split())


def test_up_with_observability_and_no_prometheus_names_the_package_and_starts_nothing(
    tmp_path: Path,
):
    home = tmp_path / "home"
    done = services_cli(
        home, "up", "--with", "observability", DAGMA_PROMETHEUS_BIN=str(tmp_path / "none")
    )
    assert done.returncode == 1, said(done)
    assert f"prometheus: {tmp_path / 'none'} not found" in said(done)
    assert "apt-get install prometheus" in said(done) and "DAGMA_PROMETHEUS_BIN" in said(done)
    assert not (home / "postgres").exists() and not marked_pids(str(home.resolve()))


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (
            ["--with", "grafana"],
            {},
            "unknown --with grafana: the choices are observability",
        ),
        (
            ["--with", "observability"],
            {"DAGMA_PROMETHEUS_SCRAPE_INTERVAL": "fast"},
            "DAGMA_PROMETHEUS_SCRAPE_INTERVAL='fast' is not a Prometheus duration",
        ),
    ],
)
def test_up_refuses_an_unknown_extra_and_a_bad_scrape_interval(
    tmp_path: Path, args: list[str], env: dict[str, str], message: str
):
    require(Path("/usr/bin/prometheus").is_file(), "no Prometheus (Debian's prometheus)")
    home = tmp_path / "home"
    done = services_cli(home, "up", *args, **env)
    assert done.returncode == 1 and message in said(done), said(done)
    assert not (home / "postgres").exists()


@pytest.fixture
def config(tmp_path: Path) -> Iterator[ServicesConfig]:
    """A home whose exporter and Prometheus get free ports; stopped afterwards."""
    require(any(Path("/usr/lib/postgresql").glob("*/bin/initdb")), "no PostgreSQL server binaries")
    found = ServicesConfig(
        dagma_home=tmp_path / "home",
        dagma_metrics_port=free_port(),
        dagma_prometheus_port=free_port(),
        dagma_api_port=free_port(),
        dagma_prometheus_scrape_interval="1s",
    )
    yield found
    Topology(found).down(progress=lambda _: None)
    assert not marked_pids(str(found.home))


@pytest.mark.parametrize(
    ("taken", "variable"),
    [
        ("dagma_metrics_port", "DAGMA_METRICS_PORT"),
        ("dagma_prometheus_port", "DAGMA_PROMETHEUS_PORT"),
    ],
)
def test_a_taken_port_is_named_with_the_variable_that_moves_it(
    config: ServicesConfig, taken: str, variable: str
):
    require(config.dagma_prometheus_bin.is_file(), "no Prometheus (Debian's prometheus)")
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", getattr(config, taken)))
        squatter.listen()
        topology = Topology(config, ["observability"])
        with pytest.raises(ServiceError, match=rf"already in use .* \({variable}\)"):
            topology.up(progress=lambda _: None, only={"metrics", "prometheus"})


def test_the_exporter_serves_every_process_of_the_folder_the_dead_ones_too(tmp_path: Path):
    folder = tmp_path / "metrics"
    folder.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder)}
    record = (
        "from dagma.lib.telemetry import metrics\n"
        "metrics.record('dagma_asset_steps', asset='wine_model', outcome='success')"
    )
    for _ in range(2):  # two processes, both gone before anything serves their figures
        subprocess.run([sys.executable, "-c", record], env=env, check=True, timeout=60)
    port = free_port()
    argv = [sys.executable, "-m", "dagma.services.metrics_exporter", "--port", str(port)]
    exporter = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    text = r.read().decode()
                break
            except OSError:
                assert exporter.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
        line = 'dagma_asset_steps_total{asset="wine_model",outcome="success"} 2.0'
        assert line in text, text
        # A second exporter on the same port says which port and how to move it.
        again = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
        assert again.returncode == 1
        assert f"Cannot serve metrics on 127.0.0.1:{port}" in again.stderr, again.stderr
    finally:
        exporter.terminate()
        assert exporter.wait(timeout=30) == 0  # SIGTERM is a clean stop
    # Without a shared folder it has nothing to serve, and says how it is meant to start.
    alone = {k: v for k, v in env.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    lonely = subprocess.run(argv, env=alone, capture_output=True, text=True, timeout=60)
    assert lonely.returncode == 1
    assert "PROMETHEUS_MULTIPROC_DIR is not set" in lonely.stderr, lonely.stderr


def test_the_generated_prometheus_config_is_one_promtool_accepts(tmp_path: Path):
    promtool = shutil.which("promtool")
    require(promtool is not None, "no promtool (Debian's prometheus)")
    config = ServicesConfig(
        dagma_home=tmp_path, dagma_metrics_port=58101, dagma_prometheus_scrape_interval="2s"
    )
    path = prometheus.write_config(config)
    assert path == tmp_path.resolve() / "services" / "prometheus" / "prometheus.yml"
    assert (path.parent / "data").is_dir()
    document = yaml.safe_load(path.read_text())
    assert document["global"]["scrape_interval"] == "2s"
    jobs = {job["job_name"]: job for job in document["scrape_configs"]}
    assert jobs["dagma"]["static_configs"] == [{"targets": ["127.0.0.1:58101"]}]
    assert jobs["dagma-api"]["static_configs"] == [{"targets": ["127.0.0.1:58000"]}]
    assert set(jobs) == {"dagma", "dagma-api", "prometheus"}
    checked = subprocess.run(
        [str(promtool), "check", "config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
