"""No known secrets: `dagma secrets init`, and every front door refuses a placeholder.

The scripts run for real on a copy of the files they need, with the host's python3 (no venv,
no dagma installed) and without docker on PATH.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from dagma import env_secrets
from dagma.env_secrets import REQUIRED, SecretsError
from dagma.services.config import ServicesConfig
from dagma.settings import PROJECT_ROOT

DAGMA = Path(sys.executable).with_name("dagma")
HOST_PYTHON = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
EXAMPLE = PROJECT_ROOT / ".env.example"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_fills_every_required_secret_and_keeps_real_values(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    shutil.copy(EXAMPLE, env)
    env.chmod(0o644)
    with env.open("a") as handle:
        handle.write("POSTGRES_PASSWORD='a real one'  \n# my note\nCLICKHOUSE_PASSWORD=\n")

    report = env_secrets.init(env, environ={"QDRANT_API_KEY": "from-a-codespaces-secret"})

    values = env_secrets.read(env)
    assert report.kept == ["POSTGRES_PASSWORD"] and values["POSTGRES_PASSWORD"] == "a real one"
    assert report.from_environment == ["QDRANT_API_KEY"]
    assert values["QDRANT_API_KEY"] == "from-a-codespaces-secret"
    assert set(report.generated) == set(REQUIRED) - {"POSTGRES_PASSWORD", "QDRANT_API_KEY"}
    generated = [values[name] for name in report.generated]
    assert len(set(generated)) == len(generated) and all(len(v) >= 32 for v in generated)
    assert env_secrets.placeholders(env, environ={}, missing=True) == []
    assert mode(env) == 0o600 and report.mode_fixed
    text = env.read_text()
    assert "# my note" in text and "# DAGMA_SEED=42" in text  # comments survive
    # The line compose reads (the last) is replaced in place; nothing is appended.
    assert text.endswith(f"# my note\nCLICKHOUSE_PASSWORD={values['CLICKHOUSE_PASSWORD']}\n")
    for value in generated:
        assert value not in report.summary()  # names only, never values

    again = env_secrets.init(env, environ={})
    assert again.generated == [] and sorted(again.kept) == sorted(REQUIRED)
    assert env.read_text() == text


def test_placeholders_name_empty_change_me_and_the_examples_value(tmp_path: Path) -> None:
    example = tmp_path / ".env.example"
    example.write_text("POSTGRES_PASSWORD=known-to-all\n")
    env = tmp_path / ".env"
    env.write_text(
        "POSTGRES_PASSWORD=known-to-all\nexport DAGSTER_PG_PASSWORD='Change-Me'\n"
        'MLFLOW_PG_PASSWORD=""\nQDRANT_API_KEY=fine # a comment\n'
    )
    found = env_secrets.placeholders(
        env, environ={"MINIO_ROOT_PASSWORD": "change-me-minio"}, example=example
    )
    why = {p.name: (p.where, p.why) for p in found}
    assert why == {
        "POSTGRES_PASSWORD": (str(env), "is the value in .env.example"),
        "DAGSTER_PG_PASSWORD": (str(env), "is a placeholder (change-me...)"),
        "MLFLOW_PG_PASSWORD": (str(env), "is empty"),
        "MINIO_ROOT_PASSWORD": ("the environment", "is a placeholder (change-me...)"),
    }
    with pytest.raises(SecretsError) as caught:
        env_secrets.refuse(found, "start compose")
    message = str(caught.value)
    assert "DAGSTER_PG_PASSWORD in " in message and "dagma secrets init" in message
    assert "unset MINIO_ROOT_PASSWORD" in message and "token_urlsafe" in message


def test_secrets_init_command_writes_a_private_env(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text("POSTGRES_PASSWORD=change-me-postgres\n")
    done = subprocess.run(
        [str(DAGMA), "secrets", "init", "--env-file", str(env)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if k not in REQUIRED},
    )
    assert done.returncode == 0, done.stderr
    values = env_secrets.read(env)
    assert set(REQUIRED) <= set(values) and mode(env) == 0o600
    assert "POSTGRES_PASSWORD" in done.stdout and str(env) in done.stdout
    assert not any(values[name] in done.stdout for name in REQUIRED)


def test_secrets_init_names_a_folder_it_cannot_write(tmp_path: Path) -> None:
    env = tmp_path / "missing" / ".env"
    done = subprocess.run(
        [str(DAGMA), "secrets", "init", "--env-file", str(env)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert f"cannot write {env}" in done.stdout + done.stderr


def copy_for_host(root: Path, *files: str) -> Path:
    """The files a host script needs, and a bin folder that puts the host's python3 first."""
    for rel in (*files, "src/dagma/__init__.py", "src/dagma/errors.py"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(PROJECT_ROOT / rel, root / rel)
    shutil.copy(PROJECT_ROOT / "src/dagma/env_secrets.py", root / "src/dagma/env_secrets.py")
    bin_dir = root / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(HOST_PYTHON)
    return bin_dir


def host_run(
    shell: str, script: Path, bin_dir: Path, **extra: str
) -> subprocess.CompletedProcess[str]:
    path = f"{bin_dir}:/usr/bin:/bin"
    assert not shutil.which("docker", path=path) and not shutil.which("docker-compose", path=path)
    return subprocess.run(
        [shell, str(script), "minimal"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": path, "HOME": str(bin_dir), **extra},
    )


def test_start_env_refuses_placeholder_secrets(tmp_path: Path) -> None:
    bin_dir = copy_for_host(tmp_path, "scripts/start_env.sh", ".env.example")
    shutil.copy(EXAMPLE, tmp_path / ".env")
    done = host_run("/bin/bash", tmp_path / "scripts" / "start_env.sh", bin_dir)
    assert done.returncode == 2
    assert "MLFLOW_ADMIN_PASSWORD in .env is a placeholder" in done.stderr, done.stderr
    assert "dagma secrets init" in done.stderr
    assert "Docker Compose" not in done.stderr  # refused before compose is looked for
    assert not list((tmp_path / "src").rglob("__pycache__"))  # the host's checkout stays clean

    env_secrets.init(tmp_path / ".env", environ={})
    done = host_run("/bin/bash", tmp_path / "scripts" / "start_env.sh", bin_dir)
    assert done.returncode == 2 and "Install Docker Compose v2" in done.stderr  # check passed


def test_devcontainer_init_writes_every_required_secret(tmp_path: Path) -> None:
    bin_dir = copy_for_host(tmp_path, ".devcontainer/init-env.sh", ".env.example")
    env = tmp_path / ".env"
    env.write_text("DAGSTER_PG_PASSWORD=mine\nPOSTGRES_PASSWORD=change-me-postgres\n")
    env.chmod(0o644)
    done = host_run(
        "/bin/sh", tmp_path / ".devcontainer" / "init-env.sh", bin_dir, QDRANT_API_KEY="cs-key"
    )
    assert done.returncode == 0, done.stderr
    values = env_secrets.read(env)
    assert values["DAGSTER_PG_PASSWORD"] == "mine" and values["QDRANT_API_KEY"] == "cs-key"
    assert env_secrets.placeholders(env, environ={}, missing=True) == []
    assert mode(env) == 0o600


def test_services_up_refuses_a_placeholder_override(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {
        **os.environ,
        "DAGMA_HOME": str(home),
        "DAGMA_PG_SUPERUSER_PASSWORD": "change-me-postgres",
        "DAGMA_PG_BIN": str(tmp_path / "no-postgres"),  # should anything start, it fails fast
    }
    done = subprocess.run(
        [str(DAGMA), "services", "up"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
    )
    assert done.returncode == 1
    assert "DAGMA_PG_SUPERUSER_PASSWORD" in done.stdout + done.stderr
    assert not home.exists()  # refused before anything was created


def test_an_empty_override_means_generated(tmp_path: Path) -> None:
    config = ServicesConfig(dagma_home=tmp_path, dagma_pg_dagster_password="")
    config.refuse_placeholders()
    assert len(config.passwords()["dagster"]) >= 32
    with pytest.raises(SecretsError, match="DAGMA_MLFLOW_ADMIN_PASSWORD"):
        ServicesConfig(dagma_home=tmp_path, dagma_mlflow_admin_password="change-me").passwords()


def test_an_environment_value_ending_in_a_newline_is_refused_not_cut(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    with pytest.raises(SecretsError, match=r"POSTGRES_PASSWORD .*newline"):
        value = "s3cret-from-codespaces\n"  # pragma: allowlist secret (a test value)
        env_secrets.init(env, environ={"POSTGRES_PASSWORD": value})
    assert not env.exists() or "s3cret" not in env.read_text()
