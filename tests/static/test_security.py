"""No secret in the repository (detect-secrets) and no unjustified bandit finding in src/."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dagma.settings import PROJECT_ROOT

BASELINE = PROJECT_ROOT / ".secrets.baseline"
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{name} is not installed in {BIN}: run `uv sync` (it is a dev dependency)")
    return str(path)


def secrets_found(baseline: dict, tmp: Path, root: Path = PROJECT_ROOT) -> set[tuple[str, str]]:
    """(file, hashed secret) for everything detect-secrets finds with the baseline's filters."""
    copy = tmp / "baseline.json"
    copy.write_text(json.dumps(baseline))
    # `scan --baseline` rewrites the file it is given: hand it a copy, never the repo's.
    subprocess.run(  # nosec B603
        [tool("detect-secrets"), "scan", "--baseline", str(copy)], cwd=root, check=True
    )
    found = json.loads(copy.read_text())["results"]
    return {(f, s["hashed_secret"]) for f, items in found.items() for s in items}


def recorded(baseline: dict) -> set[tuple[str, str]]:
    return {(f, s["hashed_secret"]) for f, items in baseline["results"].items() for s in items}


def test_no_secret_beyond_the_audited_baseline(tmp_path: Path):
    baseline = json.loads(BASELINE.read_text())
    new = secrets_found(baseline, tmp_path) - recorded(baseline)
    assert not new, (
        f"detect-secrets found possible secrets not in {BASELINE.name}: {sorted(new)}. Remove "
        "them (use an env var through dg.EnvVar or .env), or if one is a false positive run "
        "`uv run detect-secrets scan --baseline .secrets.baseline` and "
        "`uv run detect-secrets audit .secrets.baseline`."
    )
    unaudited = [
        f"{f}:{s['line_number']}"
        for f, items in baseline["results"].items()
        for s in items
        if s.get("is_secret") is not False
    ]
    assert not unaudited, f"audit these entries of {BASELINE.name}: {unaudited}"


def test_a_planted_key_is_caught(tmp_path: Path):
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)  # nosec B603 B607
    shutil.copy(BASELINE, repo / ".secrets.baseline")
    planted = repo / "settings.py"
    planted.write_text('AWS_SECRET = "AKIAZ7Q3XK4M2PLN8RTW"\n')  # pragma: allowlist secret
    subprocess.run(["git", "-C", str(repo), "add", "settings.py"], check=True)  # nosec B603 B607
    found = secrets_found(json.loads(BASELINE.read_text()), tmp_path, repo)
    assert [f for f, _ in found] == ["settings.py"]


def test_bandit_finds_nothing_unjustified_in_src():
    result = subprocess.run(  # nosec B603
        [tool("bandit"), "-q", "-r", "src", "-f", "txt"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, (
        "bandit flags code in src/: fix it, or justify it inline with "
        f"`# nosec BXXX # reason`.\n{result.stdout}{result.stderr}"
    )


def test_bandit_fails_on_a_shell_call(tmp_path: Path):
    bad = tmp_path / "bad.py"
    bad.write_text("import subprocess\nsubprocess.call('ls ' + input(), shell=True)\n")
    result = subprocess.run(  # nosec B603
        [tool("bandit"), "-q", str(bad)], capture_output=True, text=True
    )
    assert result.returncode == 1 and "B602" in result.stdout
