"""compose, `.env.example`, the devcontainer and `dagma.env_secrets` agree on the secrets.

Each check runs on the real files and on a deliberately broken copy in tmp_path.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterable
from pathlib import Path

import json5
import pytest

from dagma import env_secrets

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILES = ["compose.yaml", ".devcontainer/compose.devcontainer.yaml"]
FILES = [*COMPOSE_FILES, ".env.example", ".devcontainer/devcontainer.json"]
INIT = ".devcontainer/init-env.sh"
# Declared for Codespaces, required by nothing: the local model needs no key.
OPTIONAL_SECRETS = {"OPENAI_API_KEY"}


def required(root: Path, module: Iterable[str]) -> dict[str, set[str]]:
    """Where each set of required secrets is declared -> the names it declares."""
    lines = [line for rel in COMPOSE_FILES for line in (root / rel).read_text().splitlines()]
    compose = "\n".join(line for line in lines if not line.lstrip().startswith("#"))
    example = env_secrets.read(root / ".env.example")
    spec = json5.loads((root / ".devcontainer" / "devcontainer.json").read_text())
    return {
        "compose (${NAME:?})": set(re.findall(r"\$\{(\w+):\?", compose)),
        ".env.example placeholders": {
            name for name, value in example.items() if env_secrets.placeholder_reason(value)
        },
        "dagma.env_secrets.REQUIRED": set(module),
        "devcontainer.json secrets": set(spec.get("secrets", {})) - OPTIONAL_SECRETS,
    }


def disagreements(root: Path, module: Iterable[str] = env_secrets.REQUIRED) -> list[str]:
    found = required(root, module)
    every = set().union(*found.values())
    problems = [f"{where} lacks {sorted(every - names)}" for where, names in found.items()]
    problems = [p for p in problems if not p.endswith("lacks []")]
    init = (root / INIT).read_text()
    if not re.search(r"-m dagma\.env_secrets init \.env", init):
        problems.append(f"{INIT} does not run `python3 -m dagma.env_secrets init .env`")
    if listed := sorted(name for name in every if name in init):
        problems.append(f"{INIT} keeps its own list of names: {listed}")
    return problems


def test_every_front_door_requires_the_same_secrets() -> None:
    assert disagreements(ROOT) == []


def copy(dest: Path) -> None:
    for rel in [*FILES, INIT]:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, dest / rel)


OWN_LIST = "for name in POSTGRES_PASSWORD QDRANT_API_KEY; do echo $name; done\n"


@pytest.mark.parametrize(
    ("rel", "old", "new", "problem"),
    [
        (".env.example", "\nCLICKHOUSE_PASSWORD=", "\n# CLICKHOUSE_PASSWORD=", ".env.example"),
        ("compose.yaml", "${CLICKHOUSE_PASSWORD:?", "${CLICKHOUSE_TOKEN:?", "CLICKHOUSE_TOKEN"),
        (".devcontainer/devcontainer.json", '"MLFLOW_FLASK_SECRET_KEY"', '"X"', "devcontainer"),
        (INIT, "-m dagma.env_secrets init .env", "-c pass\n" + OWN_LIST, "own list"),
    ],
)
def test_the_agreement_check_rejects_a_broken_copy(
    tmp_path: Path, rel: str, old: str, new: str, problem: str
) -> None:
    copy(tmp_path)
    target = tmp_path / rel
    text = target.read_text()
    assert old in text
    target.write_text(text.replace(old, new, 1))
    problems = disagreements(tmp_path)
    assert any(problem in p for p in problems), problems


def test_the_agreement_check_rejects_a_shorter_module_list() -> None:
    problems = disagreements(ROOT, env_secrets.REQUIRED[:-1])
    assert f"dagma.env_secrets.REQUIRED lacks ['{env_secrets.REQUIRED[-1]}']" in problems
