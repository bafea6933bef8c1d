"""Offline checks of compose.yaml and the Dockerfiles: no Docker daemon needed.

Each check runs on the real files and on a deliberately broken copy, so a check that
silently passes everything would fail here.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DOCKERFILES = sorted(ROOT.glob("docker/*/Dockerfile"))


def run(*argv: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def compose_config(compose: Path, env_file: Path) -> subprocess.CompletedProcess[str]:
    return run(
        BIN / "docker-compose",
        "--project-directory",
        compose.parent,
        "-f",
        compose,
        "--env-file",
        env_file,
        "--profile",
        "full",
        "config",
        "-q",
    )


def test_compose_config_is_valid_with_the_example_env():
    done = compose_config(ROOT / "compose.yaml", ROOT / ".env.example")
    assert done.returncode == 0, done.stderr


def test_compose_config_fails_on_a_dangling_dependency(tmp_path):
    broken = tmp_path / "compose.yaml"
    text = (ROOT / "compose.yaml").read_text()
    broken.write_text(
        text.replace("      user-code:\n        condition", "      user-cod:\n        condition", 1)
    )
    done = compose_config(broken, ROOT / ".env.example")
    assert done.returncode != 0
    assert "user-cod" in done.stderr


def test_compose_config_fails_when_a_secret_is_missing(tmp_path):
    env = tmp_path / "env"
    lines = (ROOT / ".env.example").read_text().splitlines()
    env.write_text("\n".join(x for x in lines if not x.startswith("POSTGRES_PASSWORD=")))
    done = compose_config(ROOT / "compose.yaml", env)
    assert done.returncode != 0
    assert "POSTGRES_PASSWORD" in done.stderr


def resolved_services() -> dict:
    """compose.yaml as compose resolves it with the example .env, every profile on."""
    done = run(
        BIN / "docker-compose",
        "--env-file",
        ROOT / ".env.example",
        "--profile",
        "full",
        "config",
        "--format",
        "json",
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["services"]


def test_the_app_reads_with_the_read_only_key_and_mlflow_requires_a_login():
    from dotenv import dotenv_values

    example = dotenv_values(ROOT / ".env.example")
    services = resolved_services()
    app = services["app"]["environment"]
    assert app["QDRANT_READ_ONLY_API_KEY"] == example["QDRANT_READ_ONLY_API_KEY"]
    assert "QDRANT_API_KEY" not in app  # the write key stays with the pipelines
    mlflow = services["mlflow"]
    assert "--app-name=basic-auth" in mlflow["command"]
    admin = example["MLFLOW_ADMIN_PASSWORD"]
    assert mlflow["environment"]["MLFLOW_AUTH_ADMIN_PASSWORD"] == admin
    for client in ("user-code", "webserver", "daemon"):
        env = services[client]["environment"]
        assert env["MLFLOW_TRACKING_USERNAME"] == "admin", client
        assert env["MLFLOW_TRACKING_PASSWORD"] == admin, client
    # The app reads as MLflow's `reader` (tests/static/test_least_privilege.py).
    assert app["MLFLOW_TRACKING_USERNAME"] == "reader"


def test_the_dev_container_logs_in_to_mlflow():
    """The devcontainer's workspace talks to the mlflow service, which requires a login."""
    done = run(
        BIN / "docker-compose",
        "-f",
        ROOT / "compose.yaml",
        "-f",
        ROOT / ".devcontainer" / "compose.devcontainer.yaml",
        "--env-file",
        ROOT / ".env.example",
        "config",
        "--format",
        "json",
    )
    assert done.returncode == 0, done.stderr
    services = json.loads(done.stdout)["services"]
    dev = services["dev"]["environment"]
    assert dev["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert dev["MLFLOW_TRACKING_USERNAME"] == "admin"
    admin = services["mlflow"]["environment"]["MLFLOW_AUTH_ADMIN_PASSWORD"]
    assert dev["MLFLOW_TRACKING_PASSWORD"] == admin


def test_the_devcontainer_installs_jupyterlab_for_its_forwarded_port():
    """Port 8888 is forwarded as JupyterLab: postCreateCommand installs a group that has it."""
    import json5

    spec = json5.loads((ROOT / ".devcontainer" / "devcontainer.json").read_text())
    assert 8888 in spec["forwardPorts"]
    argv = shlex.split(spec["postCreateCommand"])
    assert argv[argv.index("uv") :][:2] == ["uv", "sync"] and "--frozen" in argv
    groups = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--group"]
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["dependency-groups"]
    assert any(
        req.startswith("jupyterlab") for group in groups for req in declared.get(group, [])
    ), groups
    assert "dagma lab" in spec["portsAttributes"]["8888"]["label"]  # where its URL comes from


def test_every_port_is_published_on_loopback_only():
    services = resolved_services()
    published = [(n, p) for n, s in services.items() for p in s.get("ports", [])]
    assert published
    assert all(p.get("host_ip") == "127.0.0.1" for _, p in published), published


def check_schema(path: Path) -> subprocess.CompletedProcess[str]:
    return run(BIN / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", path)


def test_compose_file_matches_the_compose_spec_schema():
    done = check_schema(ROOT / "compose.yaml")
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_schema_check_fails_on_an_unknown_key(tmp_path):
    broken = tmp_path / "compose.yaml"
    text = (ROOT / "compose.yaml").read_text()
    broken.write_text(text.replace("    restart: unless-stopped", "    restartt: always", 1))
    done = check_schema(broken)
    assert done.returncode != 0
    assert "restartt" in done.stdout + done.stderr


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    return run(BIN / "hadolint", "--config", ROOT / ".hadolint.yaml", path)


def test_there_are_base_dev_and_prod_dockerfiles():
    assert {p.parent.name for p in DOCKERFILES} >= {"base", "dev", "prod"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_dockerfile_passes_hadolint(dockerfile):
    done = hadolint(dockerfile)
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_fails_on_an_unpinned_root_image(tmp_path):
    broken = tmp_path / "Dockerfile"
    shutil.copy(ROOT / "docker" / "prod" / "Dockerfile", broken)
    text = broken.read_text().replace(
        "python:3.11.14-slim-bookworm AS runtime", "python AS runtime"
    )
    broken.write_text(
        text.replace("USER 10001", "USER root").replace("WORKDIR /app", "WORKDIR app")
    )
    done = hadolint(broken)
    assert done.returncode != 0
    assert "DL3006" in done.stdout and "DL3000" in done.stdout
