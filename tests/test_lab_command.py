"""`dagma lab`: dagster dev serves the graph, the MLflow UI and the app answer, JupyterLab asks
for its token (and starts as root), the metrics exporter serves the session's shared folder,
and SIGTERM or SIGHUP (a closed terminal) stops it all."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from dagma.services.procs import free_port
from dagma.settings import PROJECT_ROOT
from tests.test_definitions import DEMO_ASSETS

pytestmark = pytest.mark.integration
QUERY = b'{"query": "{ assetNodes { assetKey { path } groupName } }"}'


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


def start_lab(bin_dir: Path, home: Path, ports: dict[str, int], log: Path) -> subprocess.Popen:
    """`dagma lab` of `bin_dir`'s environment in its own session, as a terminal would run it."""
    env = {**os.environ, "DAGMA_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    env["DAGMA_AUTOMATION"] = "false"  # no nightly retrain starting if this runs at 02:00
    for var in ("DAGSTER_HOME", "MLFLOW_TRACKING_URI", "DAGSTER_UI_URL", "MLFLOW_UI_URL"):
        env.pop(var, None)
    env.pop("JUPYTER_TOKEN", None)
    argv = [str(bin_dir / "dagma"), "lab"]
    for name, port in ports.items():
        argv += [f"--{name}-port", str(port)]
    with open(log, "wb") as out:
        return subprocess.Popen(
            argv,
            cwd=PROJECT_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_ready(proc: subprocess.Popen, log: Path, timeout: float = 240) -> str:
    deadline = time.monotonic() + timeout
    while "Ctrl-C stops everything" not in log.read_text() and proc.poll() is None:
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(1)
    output = log.read_text()
    assert proc.poll() is None, output
    return output


def stopped_by(proc: subprocess.Popen, sig: int, log: Path, home: Path, ports: dict) -> None:
    """`sig` to `dagma lab` alone ends it with 0 and leaves no process and no port behind."""
    os.kill(proc.pid, sig)
    assert proc.wait(timeout=60) == 0, log.read_text()
    assert "Stopped." in log.read_text()
    assert lab_pids(home) == []
    assert not any(port_open(p) for p in ports.values())


def cleanup(proc: subprocess.Popen, home: Path, keep_orphans: bool = False) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    if sys.exc_info()[0] is not None or not keep_orphans:
        for pid in lab_pids(home):
            os.kill(pid, signal.SIGKILL)


def test_dagma_lab_serves_everything_and_sigterm_stops_it_all(tmp_path: Path):
    """It serves; killed outright (SIGKILL, no time to stop anything), it leaves its processes,
    and the next `dagma lab` stops them and takes their ports; SIGTERM stops everything."""
    home, log = tmp_path / "home", tmp_path / "killed.log"
    ports = {name: free_port() for name in ("dagster", "mlflow", "jupyter", "app", "metrics")}
    proc = start_lab(Path(sys.executable).parent, home, ports, log)
    try:
        wait_ready(proc, log)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert lab_pids(home)  # orphans, holding the ports
    finally:
        cleanup(proc, home, keep_orphans=True)
    log = tmp_path / "lab.log"
    proc = start_lab(Path(sys.executable).parent, home, ports, log)
    try:
        output = wait_ready(proc, log)
        for name in ("dagster", "mlflow", "app"):
            assert f"http://127.0.0.1:{ports[name]}" in output
        nodes = asset_nodes(ports["dagster"])
        assert nodes is not None, output
        assert {"/".join(n["assetKey"]["path"]) for n in nodes} >= DEMO_ASSETS
        assert get_ok(f"http://127.0.0.1:{ports['mlflow']}/health")
        assert get_ok(f"http://127.0.0.1:{ports['app']}/_stcore/health")
        metrics_url = f"http://127.0.0.1:{ports['metrics']}/metrics"
        assert re.search(rf"^  metrics +{re.escape(metrics_url)}$", output, re.M), output
        assert get_ok(metrics_url)
        # Every process of the session writes into the one folder the exporter serves.
        shared = f"PROMETHEUS_MULTIPROC_DIR={home / 'metrics' / 'lab'}".encode()
        children = [pid for pid in lab_pids(home) if pid != proc.pid]
        assert children and all(shared in environ(pid) for pid in children), children
        assert (home / "metrics" / "lab").stat().st_mode & 0o777 == 0o700
        if not Path(sys.executable).with_name("jupyter-lab").exists():
            assert "jupyter not started: JupyterLab is not installed: run `make lab`" in output
        assert "processes a killed `dagma lab` left running" in output
        stopped_by(proc, signal.SIGTERM, log, home, ports)
    finally:
        cleanup(proc, home)


@pytest.fixture(scope="module")
def lab_group_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The project with uv's `lab` group, as `make lab` runs it, beside (never in) .venv, which
    leaves JupyterLab out on purpose. From uv's cache in ~20-40 s, bytecode not compiled, and
    without llama-cpp-python, the one sdist: uv rebuilds it (~6 min) whenever PyPI's cached
    answer for it has expired, and `dagma lab` does not load it."""
    uv = shutil.which("uv") or str(PROJECT_ROOT / ".tools/bin/uv")
    venv = tmp_path_factory.mktemp("lab-group") / "venv"
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env.update(UV_PROJECT_ENVIRONMENT=str(venv), UV_COMPILE_BYTECODE="0")
    env["UV_PYTHON_DOWNLOADS"] = "never"
    subprocess.run(
        [uv, "sync", "--frozen", "--group", "lab", "--no-install-package", "llama-cpp-python"],
        cwd=PROJECT_ROOT,
        env=env,
        check=True,
        capture_output=True,
    )
    yield venv / "bin"
    shutil.rmtree(venv, ignore_errors=True)


def api_status(url: str, token: str | None = None, method: str = "GET") -> int:
    request = urllib.request.Request(url, method=method, data=b"{}" if method == "POST" else None)
    if token is not None:
        request.add_header("Authorization", f"token {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # nosec B310
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_jupyterlab_asks_for_its_token_and_sighup_stops_everything(
    tmp_path: Path, lab_group_env: Path
):
    """JupyterLab starts (as root too), refuses a request without the token, and closing the
    terminal (SIGHUP) stops it, its kernel and the rest."""
    home, log = tmp_path / "home", tmp_path / "lab.log"
    ports = {name: free_port() for name in ("dagster", "mlflow", "jupyter", "app", "metrics")}
    proc = start_lab(lab_group_env, home, ports, log)
    try:
        output = wait_ready(proc, log)
        found = re.search(rf"http://127\.0\.0\.1:{ports['jupyter']}/lab\?token=(\S+)", output)
        assert found, output
        token, api = found.group(1), f"http://127.0.0.1:{ports['jupyter']}/api"
        if os.geteuid() == 0:
            assert "warning: running as root, so JupyterLab starts with --allow-root" in output
        assert api_status(f"{api}/contents", token) == 200
        assert api_status(f"{api}/contents") == 403
        assert api_status(f"{api}/contents", "wrong-token") == 403
        assert api_status(f"{api}/kernels", token, method="POST") == 201  # a kernel to stop
        assert all(token.encode() not in cmdline(pid) for pid in lab_pids(home))  # not in `ps`
        assert oct((home / "logs/lab/jupyter.log").stat().st_mode & 0o777) == "0o600"
        stopped_by(proc, signal.SIGHUP, log, home, ports)
    finally:
        cleanup(proc, home)


def test_a_taken_metrics_port_stops_the_lab_before_it_starts_anything(tmp_path: Path):
    home, log = tmp_path / "home", tmp_path / "lab.log"
    ports = {name: free_port() for name in ("dagster", "mlflow", "jupyter", "app", "metrics")}
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", ports["metrics"]))
        squatter.listen()
        proc = start_lab(Path(sys.executable).parent, home, ports, log)
        try:
            assert proc.wait(timeout=120) == 1, log.read_text()
        finally:
            cleanup(proc, home)
    said = " ".join(log.read_text().split())
    assert f"port in use: metrics ({ports['metrics']})" in said, said
    assert f"dagma lab --metrics-port {ports['metrics'] + 1}" in said, said
    assert lab_pids(home) == []


def test_metrics_port_0_starts_no_exporter_and_shares_no_folder(tmp_path: Path):
    from dagma.services import devlab
    from dagma.settings import Settings

    settings = Settings(dagma_home=tmp_path)
    off = devlab.plan(settings, {"metrics": 0}, jupyter=False)
    assert "metrics" not in {p.name for p in off.processes} and off.metrics_dir is None
    assert off.skipped["metrics"] == "--metrics-port 0"
    assert "PROMETHEUS_MULTIPROC_DIR" not in devlab.Lab(settings, off).env()
    on = devlab.plan(settings, {}, jupyter=False)
    assert on.urls["metrics"] == "http://127.0.0.1:9464/metrics"
    assert devlab.Lab(settings, on).env()["PROMETHEUS_MULTIPROC_DIR"] == str(
        tmp_path.resolve() / "metrics" / "lab"
    )


def environ(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return []


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0
