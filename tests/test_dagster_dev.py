"""`dagster dev` serves the graph: the webserver's GraphQL API lists every demo asset."""

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


def test_dagster_dev_loads_the_graph(tmp_path: Path):
    port = free_port()
    env = {**os.environ, "DAGMA_HOME": str(tmp_path), "DAGSTER_HOME": str(tmp_path / "dagster")}
    (tmp_path / "dagster").mkdir()
    dagster = str(Path(sys.executable).with_name("dagster"))
    proc = subprocess.Popen(
        [dagster, "dev", "-h", "127.0.0.1", "-p", str(port)],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline, nodes = time.monotonic() + 180, None
        while nodes is None and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(1)
            nodes = asset_nodes(port)
        assert nodes is not None, "dagster dev did not serve GraphQL within 180 s"
        assert {"/".join(n["assetKey"]["path"]) for n in nodes} >= DEMO_ASSETS
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
