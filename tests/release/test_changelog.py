"""git-cliff with cliff.toml turns Conventional Commits into the changelog and release notes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GIT_CLIFF = Path(sys.executable).with_name("git-cliff")
# The arguments release.yml gives git-cliff for a release's body.
RELEASE_ARGS = ["--latest", "--strip", "header"]
GIT_ENV = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.org",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.org",
}


def git(cwd: Path, *args: str) -> None:
    env = {**os.environ, **GIT_ENV}
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr


def cliff(repo: Path, *args: str, config: Path = ROOT / "cliff.toml") -> str:
    if not GIT_CLIFF.exists():
        pytest.fail(f"{GIT_CLIFF} is missing: run `uv sync --frozen` (dev group)")
    if not config.is_file():  # git-cliff would fall back to its own default configuration
        pytest.fail(f"{config} is missing: restore it from git")
    done = subprocess.run(
        [str(GIT_CLIFF), "--config", str(config), "--repository", str(repo), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Old unconventional history, a v0.1.0 release of three changes and noise, one more fix."""
    path = tmp_path_factory.mktemp("changelog")
    git(path, "init", "--quiet")
    for message in [
        "Initial import",
        "feat(cli): dagma --version prints the commit (issue 21)",
        "fix(api): an empty bearer is a missing token",
        "style: ruff format",
        "docs: how to cut a release",
        "fixup! docs: how to cut a release",
    ]:
        git(path, "commit", "--quiet", "--allow-empty", "-m", message)
    git(path, "tag", "v0.1.0")
    git(path, "commit", "--quiet", "--allow-empty", "-m", "perf(search)!: one query per page")
    return path


def test_release_notes_group_the_release_s_commits(repo: Path) -> None:
    notes = cliff(repo, *RELEASE_ARGS)
    assert notes.lstrip().startswith("## [0.1.0] - ")
    sections = re.findall(r"^### (.+)$", notes, flags=re.M)
    assert sections == ["Features", "Bug fixes", "Documentation"]
    assert "- **cli:** dagma --version prints the commit (issue 21) (" in notes
    assert "- **api:** an empty bearer is a missing token (" in notes
    assert "- how to cut a release (" in notes
    for noise in ("Initial import", "ruff format", "fixup!", "one query per page", "<!--"):
        assert noise not in notes, noise


def test_the_unreleased_preview_names_the_next_tag_and_flags_breaking_changes(repo: Path) -> None:
    notes = cliff(repo, "--unreleased", "--tag", "v0.2.0")
    assert notes.startswith("# Changelog")
    assert "## [0.2.0]" in notes and "## [0.1.0]" not in notes
    assert "### Performance\n\n- **search:** [**breaking**] one query per page (" in notes


def test_release_yml_runs_git_cliff_with_these_args() -> None:
    workflow = (ROOT / ".github" / "workflows" / "release.yml").read_text()
    assert "git-cliff --config cliff.toml " + " ".join(RELEASE_ARGS) in workflow


def test_a_config_without_commit_parsers_gives_no_groups(repo: Path, tmp_path: Path) -> None:
    broken = tmp_path / "cliff.toml"
    text = (ROOT / "cliff.toml").read_text()
    broken.write_text(re.sub(r"commit_parsers = \[.*?\n\]\n", "", text, flags=re.S))
    assert broken.read_text() != text
    assert "### Features" not in cliff(repo, *RELEASE_ARGS, config=broken)
