"""The commit-message check CI runs (scripts/check-commit-messages.py) and the commit-msg hook."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "check-commit-messages.py"
CONFIG = ROOT / ".pre-commit-config.yaml"
GIT_ENV = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.org",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.org",
}
ACCEPTED = [
    "feat: x",
    "fix(api): y",
    "feat!: breaking",
    "chore(deps): z",
    "bench(api): the layer's overhead",
    "docs: y\n\nWhat and why.\n\nRefs #5",
]
REFUSED = ["update stuff", "Feat:x", "", "feature: x", "fix(api) y"]


def git(cwd: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **GIT_ENV},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def check(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--repo", str(repo), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def commit(repo: Path, message: str) -> str:
    git(repo, "commit", "--quiet", "--allow-empty", "--allow-empty-message", "-m", message)
    return git(repo, "rev-parse", "HEAD")


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A repository whose old history is not conventional, then one commit per example."""
    path = tmp_path_factory.mktemp("commits")
    git(path, "init", "--quiet")
    shas = {"old": commit(path, "Initial import"), "cutover": commit(path, "Simpler README")}
    for message in ACCEPTED + REFUSED:
        shas[message] = commit(path, message)
    shas["path"] = str(path)
    return shas


@pytest.mark.parametrize("message", ACCEPTED)
def test_a_conventional_message_is_accepted(repo: dict[str, str], message: str) -> None:
    done = check(
        Path(repo["path"]), "--cutover", repo["cutover"], repo[message] + "~1", repo[message]
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "✓ 1 commit message(s)" in done.stdout


@pytest.mark.parametrize("message", REFUSED)
def test_another_message_is_refused_with_the_rule_and_the_fix(
    repo: dict[str, str], message: str
) -> None:
    sha = repo[message]
    done = check(Path(repo["path"]), "--cutover", repo["cutover"], sha + "~1", sha)
    assert done.returncode == 1, done.stdout
    assert f"✗ {sha[:12]} {message or '(empty message)'!r}" in done.stdout
    assert "not Conventional Commits (<type>(<scope>): <summary>" in done.stdout
    assert "docs/contributing.md" in done.stdout and "reword" in done.stdout


def test_a_range_names_only_its_bad_commits_and_skips_history_before_the_cutover(
    repo: dict[str, str],
) -> None:
    path = Path(repo["path"])
    # An all-zero base (a new branch, a tag push) checks everything after the cut-over.
    done = check(path, "--cutover", repo["cutover"], "0" * 40, "HEAD")
    assert done.returncode == 1
    named = {line.split()[1] for line in done.stdout.splitlines() if line.startswith("✗")}
    assert named == {repo[m][:12] for m in REFUSED}
    assert f"{len(REFUSED)} of {len(ACCEPTED) + len(REFUSED)} commit message(s)" in done.stdout
    # Without a cut-over, the old history would fail.
    assert (
        check(path, "--cutover", repo["old"], repo["cutover"] + "~1", repo["cutover"]).returncode
        == 1
    )


def test_a_missing_cutover_asks_for_the_whole_history(repo: dict[str, str]) -> None:
    done = check(Path(repo["path"]), "--cutover", "1" * 40, "0" * 40, "HEAD")
    assert done.returncode == 2
    assert "fetch-depth: 0" in done.stderr


def test_strict_refuses_a_fixup_the_hook_lets_through(tmp_path: Path) -> None:
    message = tmp_path / "COMMIT_EDITMSG"
    message.write_text("fixup! feat: x\n")
    assert check(ROOT, "--file", str(message)).returncode == 0
    done = check(ROOT, "--strict", "--file", str(message))
    assert done.returncode == 1 and not done.stderr, done.stderr
    assert f"✗ {message} 'fixup! feat: x'" in done.stdout
    assert "does not follow Conventional Commits formatting" in done.stdout


def hook(config: Path) -> dict:
    repos = yaml.safe_load(config.read_text())["repos"]
    found = [h for r in repos for h in r["hooks"] if h["id"] == "conventional-pre-commit"]
    assert len(found) == 1, found
    return found[0]


def test_pre_commit_installs_the_commit_msg_hook_with_the_types_this_repo_uses() -> None:
    config = yaml.safe_load(CONFIG.read_text())
    assert {"pre-commit", "commit-msg"} <= set(config["default_install_hook_types"])
    # Without it every pre-commit hook would also run on the message.
    assert config["default_stages"] == ["pre-commit"]
    entry = hook(CONFIG)
    assert entry["stages"] == ["commit-msg"] and "conventional-pre-commit" in entry["entry"]
    used = {"feat", "fix", "docs", "test", "chore", "build", "ci", "perf", "refactor", "bench"}
    assert used | {"style", "revert"} <= set(entry["args"])


def test_a_config_without_the_hook_is_refused(tmp_path: Path) -> None:
    broken = tmp_path / ".pre-commit-config.yaml"
    config = yaml.safe_load(CONFIG.read_text())
    for repo in config["repos"]:
        repo["hooks"] = [h for h in repo["hooks"] if h["id"] != "conventional-pre-commit"]
    broken.write_text(yaml.safe_dump(config))
    message = tmp_path / "msg"
    message.write_text("feat: x\n")
    done = check(ROOT, "--config", str(broken), "--file", str(message))
    assert done.returncode == 2
    assert "no 'conventional-pre-commit' hook" in done.stderr
