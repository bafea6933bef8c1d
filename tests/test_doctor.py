import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from dagma import doctor, env_secrets
from dagma.services.procs import free_port
from dagma.settings import PROJECT_ROOT


@pytest.fixture
def ctx(tmp_path: Path) -> doctor.Context:
    """This environment, with a private .env path and short timeouts."""
    return doctor.Context(env_file=tmp_path / ".env", timeout=1.0)


def by_name(checks: list[doctor.Check]) -> dict[str, doctor.Check]:
    return {c.name: c for c in checks}


def test_passes_on_this_environment(ctx: doctor.Context) -> None:
    checks = doctor.collect(ctx)
    assert [c for c in checks if c.blocks] == []
    names = set(by_name(checks))
    assert {"python", "venv", "bytecode", "kernel", "mlflow", "vector store", ".env"} <= names
    assert by_name(checks)["venv"].ok


def test_module_entry_point_prints_json() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "QDRANT_URL")}
    result = subprocess.run(
        [sys.executable, "-m", "dagma.doctor", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=PROJECT_ROOT,
        env=env,
    )
    report = json.loads(result.stdout)
    assert result.returncode == 0, result.stdout
    assert report["ok"] is True
    assert {"name", "ok", "severity", "detail", "fix"} <= set(report["checks"][0])


def test_venv_out_of_sync_with_lock(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lock = (PROJECT_ROOT / "uv.lock").read_text()
    marker = 'name = "numpy"\nversion = "'
    assert marker in lock
    start = lock.index(marker) + len(marker)
    changed = lock[:start] + "0.0.1" + lock[lock.index('"', start) :]
    (tmp_path / "uv.lock").write_text(changed)
    ctx = doctor.Context(lock_path=tmp_path / "uv.lock", env_file=tmp_path / ".env")

    venv = doctor.check_venv(ctx)
    assert not venv.ok and venv.blocks
    assert "numpy" in venv.detail and "locked 0.0.1" in venv.detail
    assert "uv sync --frozen" in venv.fix
    assert doctor.run(ctx=ctx) == 1
    assert "✗ venv" in capsys.readouterr().out


def test_package_missing_from_venv(tmp_path: Path) -> None:
    lock = (PROJECT_ROOT / "uv.lock").read_text()
    extra = (
        '\n[[package]]\nname = "not-installed-pkg"\nversion = "1.0"\nsource = { registry = "x" }\n'
    )
    lock = lock.replace(
        '    { name = "typer" },\n]',
        '    { name = "typer" },\n    { name = "not-installed-pkg" },\n]',
        1,
    )
    (tmp_path / "uv.lock").write_text(lock + extra)
    check = doctor.check_venv(doctor.Context(lock_path=tmp_path / "uv.lock"))
    assert not check.ok
    assert "1 missing: not-installed-pkg" in check.detail


def test_configured_service_down(
    ctx: doctor.Context, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("QDRANT_URL", f"http://127.0.0.1:{port}")
    checks = by_name(doctor.collect(ctx))
    for name in ("mlflow", "qdrant"):
        assert checks[name].blocks, checks[name]
        assert str(port) in checks[name].detail
        assert "dagma services up" in checks[name].fix
    assert checks["vector store"].detail == f"Qdrant server at http://127.0.0.1:{port}"
    assert doctor.run(as_json=True, ctx=ctx) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False


def test_postgres_down_when_services_mode_configured(
    ctx: doctor.Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DAGSTER_PG_HOST", "127.0.0.1")
    monkeypatch.setenv("DAGSTER_PG_PORT", str(free_port()))
    checks = by_name(doctor.collect(ctx))
    assert checks["postgres"].blocks
    assert checks["env DAGSTER_PG_PASSWORD"].blocks


def test_reachable_service_passes(ctx: doctor.Context, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("DAGSTER_PG_HOST", "127.0.0.1")
        monkeypatch.setenv("DAGSTER_PG_PORT", str(server.getsockname()[1]))
        monkeypatch.setenv("DAGSTER_PG_PASSWORD", "x")
        checks = by_name(doctor.collect(ctx))
    assert checks["postgres"].ok


def test_missing_keys_for_remote_backends(
    ctx: doctor.Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DAGMA_LLM", "openai")
    for name in ("DAGMA_LLM_MODEL", "OPENAI_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    checks = by_name(doctor.check_env_vars(doctor.Context(), doctor.Settings()))
    assert checks["env OPENAI_API_KEY"].blocks
    assert checks["env DAGMA_LLM_MODEL"].blocks
    assert "OPENAI_API_KEY" in checks["env OPENAI_API_KEY"].fix


def test_world_readable_env_file_flagged(ctx: doctor.Context) -> None:
    assert ctx.env_file is not None
    ctx.env_file.write_text("DAGMA_SEED=42\n")
    ctx.env_file.chmod(0o644)
    check = doctor.check_env_file(ctx)
    assert not check.ok
    assert check.fix == f"chmod 600 {ctx.env_file}"
    assert "✗ .env (warning)" in doctor.render([check])
    ctx.env_file.chmod(0o600)
    assert doctor.check_env_file(ctx).ok


def test_secrets_everyone_knows_are_reported(
    ctx: doctor.Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A .env copied from .env.example, or a change-me override, blocks; real values pass."""
    assert ctx.env_file is not None
    for name in ("POSTGRES_PASSWORD", "MLFLOW_ADMIN_PASSWORD", "QDRANT_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    ctx.env_file.write_text(
        "POSTGRES_PASSWORD=change-me-postgres\nMLFLOW_ADMIN_PASSWORD=\nQDRANT_API_KEY=r4nd0m-k3y\n"
    )
    monkeypatch.setenv("DAGMA_PG_DAGSTER_PASSWORD", "change-me")
    checks = by_name(doctor.collect(ctx))
    postgres = checks["secret POSTGRES_PASSWORD"]
    assert postgres.blocks and "is a placeholder" in postgres.detail
    assert "dagma secrets init" in postgres.fix
    assert "is empty" in checks["secret MLFLOW_ADMIN_PASSWORD"].detail
    override = checks["secret DAGMA_PG_DAGSTER_PASSWORD"]
    assert override.blocks and "unset DAGMA_PG_DAGSTER_PASSWORD" in override.fix
    assert "secret QDRANT_API_KEY" not in checks and "secrets" not in checks
    assert "✗ secret POSTGRES_PASSWORD: POSTGRES_PASSWORD in" in doctor.render(checks.values())

    monkeypatch.delenv("DAGMA_PG_DAGSTER_PASSWORD")
    env_secrets.init(ctx.env_file, environ={})
    assert [c.ok for c in doctor.check_secrets(ctx)] == [True]
    assert env_secrets.read(ctx.env_file)["QDRANT_API_KEY"] == "r4nd0m-k3y"


def test_python_version_mismatch(tmp_path: Path) -> None:
    (tmp_path / ".python-version").write_text("3.10\n")
    check = doctor.check_python(doctor.Context(root=tmp_path))
    assert check.blocks
    assert "3.10" in check.fix


class HealthHandler(BaseHTTPRequestHandler):
    """Answers MLflow's /health, and Qdrant's /readyz only with the right api-key."""

    def do_GET(self) -> None:
        ok = self.path == "/health" or (
            self.path == "/readyz" and self.headers.get("api-key") == "secret"
        )
        self.send_response(200 if ok else 401)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_reachable_servers_pass(ctx: doctor.Context, monkeypatch: pytest.MonkeyPatch) -> None:
    server = HTTPServer(("127.0.0.1", 0), HealthHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        monkeypatch.setenv("QDRANT_URL", url)
        monkeypatch.setenv("QDRANT_API_KEY", "secret")
        checks = by_name(doctor.collect(ctx))
        assert checks["mlflow"].ok, checks["mlflow"]
        assert checks["qdrant"].ok, checks["qdrant"]
        monkeypatch.setenv("QDRANT_API_KEY", "wrong")
        assert "HTTP 401" in doctor.check_services(ctx, doctor.Settings())[1].detail
    finally:
        server.shutdown()


# CI runs Qdrant and Postgres as service containers and names them here; conftest.py clears
# QDRANT_URL for the session, so the servers come in under test-only variables.
@pytest.mark.integration
@pytest.mark.skipif(
    not os.environ.get("DAGMA_TEST_QDRANT_URL"), reason="needs DAGMA_TEST_QDRANT_URL (CI)"
)
def test_real_qdrant_server(ctx: doctor.Context, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QDRANT_URL", os.environ["DAGMA_TEST_QDRANT_URL"])
    checks = by_name(doctor.collect(ctx))
    assert checks["qdrant"].ok, checks["qdrant"]
    assert checks["vector store"].detail.startswith("Qdrant server at")


@pytest.mark.integration
@pytest.mark.skipif(
    not os.environ.get("DAGMA_TEST_PG_PORT"), reason="needs DAGMA_TEST_PG_PORT (CI)"
)
def test_real_postgres_server(ctx: doctor.Context, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DAGSTER_PG_HOST", "127.0.0.1")
    monkeypatch.setenv("DAGSTER_PG_PORT", os.environ["DAGMA_TEST_PG_PORT"])
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", "unused-by-a-reachability-check")
    assert by_name(doctor.collect(ctx))["postgres"].ok


def test_a_slot_held_by_a_dead_run_is_reported_and_fixed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ctx: doctor.Context
) -> None:
    """What a `dagma run` killed in a pooled step leaves: its run STARTED, its slot claimed."""
    import dagster as dg
    from dagster._core.storage.dagster_run import DagsterRun

    from dagma.reaping import HOST_TAG, PID_TAG
    from dagma.settings import Settings

    monkeypatch.setenv("DAGMA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    settings = Settings()
    settings.ensure_dirs()
    gone = subprocess.Popen(["true"])
    gone.wait()
    tags = {PID_TAG: str(gone.pid), HOST_TAG: socket.gethostname()}
    with dg.DagsterInstance.from_config(str(settings.dagster_dir)) as instance:
        dead = instance.add_run(
            DagsterRun(job_name="__ASSET_JOB", status=dg.DagsterRunStatus.STARTED, tags=tags)
        )
        live = instance.add_run(
            DagsterRun(
                job_name="__ASSET_JOB",
                status=dg.DagsterRunStatus.STARTED,
                tags={**tags, PID_TAG: str(os.getpid())},
            )
        )
        storage = instance.event_log_storage
        storage.set_concurrency_slots("dagma_vectors", 2)
        assert storage.claim_concurrency_slot("dagma_vectors", dead.run_id, "slow").is_claimed
        assert storage.claim_concurrency_slot("dagma_vectors", live.run_id, "other").is_claimed

    check = by_name(doctor.collect(ctx))["pool slots"]
    assert not check.ok and check.blocks
    assert f"dagma_vectors held by run {dead.run_id[:8]}" in check.detail
    assert live.run_id[:8] not in check.detail  # a live run's slot is its own
    assert "dagma doctor --fix" in check.fix

    fixed = by_name(doctor.collect(ctx, fix=True))["pool slots"]
    assert fixed.ok and dead.run_id[:8] in fixed.detail
    with dg.DagsterInstance.from_config(str(settings.dagster_dir)) as instance:
        assert instance.get_run_by_id(dead.run_id).status == dg.DagsterRunStatus.FAILURE
        claims = instance.event_log_storage.get_concurrency_info("dagma_vectors").claimed_slots
        assert [c.run_id for c in claims] == [live.run_id]
    assert by_name(doctor.collect(ctx))["pool slots"].ok
