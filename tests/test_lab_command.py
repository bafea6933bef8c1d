"""`dagma lab`: dagster dev serves the graph, the MLflow UI and the app answer, Ctrl-C stops all."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from dagma.settings import PROJECT_ROOT
from tests.test_definitions import DEMO_ASSETS

pytestmark = pytest.mark.integration
QUERY = b'{"query": "{ assetNodes { assetKey { path } groupName } }"}'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def asset_nodes(port: int) -> list[dict] | None:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql", data=QUERY, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # nosec B310
            return json.load(response)["data"]["assetNodes"]
    except (OSError, KeyError, TypeError, ValueError):
        return None


def get_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # nosec B310
            return bool(response.status == 200)
    except OSError:
        return False


def lab_pids(marker_dir: Path) -> list[int]:
    """Processes whose environment names this test's DAGMA_HOME: what `dagma lab` started."""
    needle = f"DAGMA_HOME={marker_dir}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def test_dagma_lab_serves_everything_and_ctrl_c_stops_it_all(tmp_path: Path):
    home = tmp_path / "home"
    ports = {name: free_port() for name in ("dagster", "mlflow", "jupyter", "app")}
    env = {**os.environ, "DAGMA_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    env["DAGMA_AUTOMATION"] = "false"  # no nightly retrain starting if this runs at 02:00
    for var in ("DAGSTER_HOME", "MLFLOW_TRACKING_URI", "DAGSTER_UI_URL", "MLFLOW_UI_URL"):
        env.pop(var, None)
    log = tmp_path / "lab.log"
    argv = [str(Path(sys.executable).with_name("dagma")), "lab"]
    for name, port in ports.items():
        argv += [f"--{name}-port", str(port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv,
            cwd=PROJECT_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 240
        while "Ctrl-C stops everything" not in log.read_text() and proc.poll() is None:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(1)
        output = log.read_text()
        assert proc.poll() is None, output
        for name in ("dagster", "mlflow", "app"):
            assert f"http://127.0.0.1:{ports[name]}" in output
        nodes = asset_nodes(ports["dagster"])
        assert nodes is not None, output
        assert {"/".join(n["assetKey"]["path"]) for n in nodes} >= DEMO_ASSETS
        assert get_ok(f"http://127.0.0.1:{ports['mlflow']}/health")
        assert get_ok(f"http://127.0.0.1:{ports['app']}/_stcore/health")
        if not Path(sys.executable).with_name("jupyter-lab").exists():
            assert "jupyter not started: JupyterLab is not installed: run `make lab`" in output
        else:
            assert get_ok(f"http://127.0.0.1:{ports['jupyter']}/api")

        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 0, log.read_text()
        assert "Stopped." in log.read_text()
        assert lab_pids(home) == []
        assert not any(port_open(p) for p in ports.values())
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in lab_pids(home):
            os.kill(pid, signal.SIGKILL)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0
