"""The pure parts of the supervisor: binaries, passwords, state, ports and error messages."""

from __future__ import annotations

import configparser
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dagma.lib import processes
from dagma.services import postgres
from dagma.services.config import ServicesConfig
from dagma.services.procs import (
    ProcRecord,
    ServiceError,
    StateFile,
    free_port,
    pid_alive,
    port_in_use,
    record_alive,
    spawn,
    terminate,
)
from dagma.services.supervisor import (
    Topology,
    ensure_experiment,
    vector_store,
    write_mlflow_auth_config,
)


def test_newest_postgres_major_is_chosen(tmp_path):
    for major in ("9", "15", "16"):
        (tmp_path / major / "bin").mkdir(parents=True)
        (tmp_path / major / "bin" / "initdb").touch()
    (tmp_path / "17").mkdir()  # a major without server binaries
    assert postgres.find_bin_dir(root=tmp_path) == tmp_path / "16" / "bin"


def test_missing_postgres_says_install_postgresql(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ServiceError, match="install postgresql"):
        postgres.find_bin_dir(root=tmp_path / "none")


def test_passwords_are_generated_once_into_a_private_file(tmp_path, monkeypatch):
    for name in ("SUPERUSER", "DAGSTER", "MLFLOW"):
        monkeypatch.delenv(f"DAGMA_PG_{name}_PASSWORD", raising=False)
    monkeypatch.delenv("DAGMA_MLFLOW_ADMIN_PASSWORD", raising=False)
    config = ServicesConfig(dagma_home=tmp_path)
    first = config.passwords()
    assert set(first) == {
        "postgres", "dagster", "mlflow", "mlflow_admin", "mlflow_flask_secret", "api_secret"
    }  # fmt: skip
    assert len(set(first.values())) == 6
    assert config.secrets_file.stat().st_mode & 0o777 == 0o600
    assert ServicesConfig(dagma_home=tmp_path).passwords() == first


def test_a_password_from_the_environment_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGMA_PG_MLFLOW_PASSWORD", "from-env")
    assert ServicesConfig(dagma_home=tmp_path).passwords()["mlflow"] == "from-env"


def test_mlflow_runs_with_basic_auth_and_an_admin_password_that_is_not_the_default(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("DAGMA_MLFLOW_ADMIN_PASSWORD", "s3cret%pw")  # pragma: allowlist secret
    config = ServicesConfig(dagma_home=tmp_path)
    passwords = config.passwords()
    topology = Topology(config)
    mlflow = next(s for s in topology.services(passwords) if s.name == "mlflow")
    assert mlflow.argv[mlflow.argv.index("--app-name") + 1] == "basic-auth"
    assert mlflow.env["MLFLOW_AUTH_ADMIN_PASSWORD"] == "s3cret%pw"  # pragma: allowlist secret
    assert mlflow.env["MLFLOW_FLASK_SERVER_SECRET_KEY"] == passwords["mlflow_flask_secret"]
    client_env = topology.env(passwords)
    assert client_env["MLFLOW_TRACKING_USERNAME"] == "admin"
    assert client_env["MLFLOW_TRACKING_PASSWORD"] == "s3cret%pw"  # pragma: allowlist secret

    write_mlflow_auth_config(config, passwords)
    ini = config.mlflow_auth_file
    assert ini.stat().st_mode & 0o777 == 0o600
    parsed = configparser.ConfigParser()
    parsed.read(ini)
    assert parsed["mlflow"]["database_uri"] == postgres.database_url(
        "mlflow", passwords["mlflow"], config.dagma_pg_port, db="mlflow_auth"
    )
    assert parsed["mlflow"]["default_permission"] == "READ"
    assert "admin_password" not in parsed["mlflow"]  # only in the server's environment


def test_database_url_quotes_the_password():
    url = postgres.database_url("mlflow", "a/b@c", 5555)
    assert url == "postgresql+psycopg://mlflow:a%2Fb%40c@127.0.0.1:5555/mlflow"


def test_state_file_round_trip(tmp_path):
    state = StateFile(tmp_path / "state.json")
    record = ProcRecord("x", 123, "python", "/log", 1.0)
    state.put(record)
    assert state.load() == {"x": record}
    state.drop("x")
    assert state.load() == {}


def test_spawned_process_is_detached_logged_and_terminated(tmp_path):
    argv = [sys.executable, "-c", "import time; print('hello', flush=True); time.sleep(60)"]
    record = spawn("sleeper", argv, env={}, log=tmp_path / "sleeper.log")
    try:
        assert record_alive(record)
        deadline = time.monotonic() + 60
        while "hello" not in (tmp_path / "sleeper.log").read_text():
            assert time.monotonic() < deadline, "the child never wrote to its log"
            time.sleep(0.1)
        assert subprocess.run(
            ["ps", "-o", "sid=", "-p", str(record.pid)], capture_output=True, text=True, check=True
        ).stdout.strip() == str(record.pid)
    finally:
        terminate([record.pid], timeout=5)
    assert not pid_alive(record.pid)
    assert "hello" in (tmp_path / "sleeper.log").read_text()


def test_a_recycled_pid_is_not_mistaken_for_our_process():
    assert not record_alive(ProcRecord("mlflow", 1, "mlflow", "", 0.0))


def test_up_names_the_port_in_use_and_the_variable_to_change(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert port_in_use(port)
        config = ServicesConfig(dagma_home=tmp_path, dagma_mlflow_port=port)
        topology = Topology(config)
        mlflow = next(s for s in topology.services(config.passwords()) if s.name == "mlflow")
        with pytest.raises(ServiceError, match=f"port {port}.*DAGMA_MLFLOW_PORT"):
            topology._ensure_started(mlflow, progress=lambda _: None)
    assert not port_in_use(free_port())


def test_every_service_binds_loopback(tmp_path):
    config = ServicesConfig(dagma_home=tmp_path)
    for service in Topology(config).services(config.passwords()):
        argv = " ".join(service.argv)
        assert "0.0.0.0" not in argv
        if service.port is not None:
            assert "127.0.0.1" in argv


def test_embedded_vector_store_unless_qdrant_url(tmp_path):
    assert vector_store(None, None, tmp_path)["kind"] == "embedded"
    down = vector_store(f"http://127.0.0.1:{free_port()}", "key", tmp_path)
    assert down == {"kind": "qdrant-server", "location": down["location"], "healthy": False}


def test_a_refused_mlflow_admin_login_names_the_password_to_fix():
    import http.server
    import threading

    class Refuses(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.send_response(401)
            self.end_headers()
            self.wfile.write(b"You are not authenticated.")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Refuses)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        with pytest.raises(ServiceError, match="DAGMA_MLFLOW_ADMIN_PASSWORD"):
            ensure_experiment(url, "dagma", ("admin", "stale"))
    finally:
        server.shutdown()


def test_services_backup_needs_its_postgres_running_and_writes_nothing(tmp_path):
    from dagma.backup import BackupError
    from dagma.services.backup import backup

    config = ServicesConfig(dagma_home=tmp_path / "home", dagma_pg_port=free_port())
    archive = tmp_path / "lab.tar.gz"
    with pytest.raises(BackupError, match=r"not running.*dagma services up"):
        backup(config, archive)
    assert not archive.exists() and not list(tmp_path.glob("*.partial"))


def test_a_process_caught_before_its_arguments_appear_is_still_ours(monkeypatch):
    """Right after exec, /proc/PID/cmdline reads empty for a moment; that is not another program."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        record = ProcRecord("sleeper", proc.pid, Path(sys.executable).name, "", time.time())
        real = Path.read_bytes
        reads = []

        def read_bytes(self: Path) -> bytes:
            reads.append(self)
            return b"" if len(reads) < 3 else real(self)

        monkeypatch.setattr(Path, "read_bytes", read_bytes)
        assert record_alive(record)
        assert len(reads) == 3
    finally:
        proc.kill()
        proc.wait()


def test_services_down_leaves_alone_a_program_that_got_a_recorded_pid(tmp_path):
    """After a reboot a recorded pid can be another program of the same name: told apart by its
    start time, it is neither reported alive nor stopped. A state file from before start times
    were recorded still loads."""
    other = subprocess.Popen(["sleep", "120"], start_new_session=True)
    try:
        config = ServicesConfig(dagma_home=tmp_path)
        topology = Topology(config)
        started = processes.start_time(other.pid)
        record = ProcRecord("daemon", other.pid, "sleep", "", 0.0, start_ticks=started - 1)
        topology.state.put(record)
        assert not record_alive(record)
        terminate([record], timeout=1)
        topology.down(progress=lambda line: None, timeout=1)
        assert other.poll() is None
        assert topology.state.load() == {}
        (config.state_dir / "state.json").write_text(
            '{"mlflow": {"name": "mlflow", "pid": 1, "argv0": "mlflow", "log": "", "started": 0}}'
        )
        assert topology.state.load()["mlflow"].start_ticks is None
    finally:
        other.kill()
        other.wait()
