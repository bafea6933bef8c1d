"""The version comes from the git tag; `dagma --version` and the doctor show it with the commit."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.version import Version

from dagma import doctor, version

ROOT = Path(__file__).resolve().parents[2]
UV = shutil.which("uv") or str(ROOT / ".tools" / "bin" / "uv")
GIT_ENV = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.org",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.org",
}


def git(cwd: Path, *args: str) -> str:
    env = {**os.environ, **GIT_ENV}
    done = subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def built_version(project: Path) -> str:
    """What the build backend in pyproject.toml's [build-system] says the version is."""
    requires = tomllib.loads((project / "pyproject.toml").read_text())["build-system"]["requires"]
    withs = [arg for req in requires for arg in ("--with", req)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SETUPTOOLS_SCM", "VIRTUAL"))}
    argv = [UV, "run", "--isolated", "--no-project", "--python", sys.executable, *withs]
    done = subprocess.run(
        [*argv, "python", "-m", "hatchling", "version"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A fresh repository holding the working copy's pyproject.toml (also where the tree has no
    .git, as in the Nix check), so no tag of this repository's history interferes."""
    path = tmp_path / "project"
    path.mkdir()
    shutil.copy(ROOT / "pyproject.toml", path / "pyproject.toml")
    git(path, "init", "--quiet")
    git(path, "add", "pyproject.toml")
    git(path, "commit", "--quiet", "-m", "build: the project")
    return path


def test_the_version_comes_from_the_tag_and_grows_after_it(project: Path) -> None:
    git(project, "tag", "v9.8.7")
    assert built_version(project) == "9.8.7"

    git(project, "commit", "--quiet", "--allow-empty", "-m", "fix: after the release")
    after = Version(built_version(project))
    assert after > Version("9.8.7") and after.is_devrelease, after
    assert after.local is None  # the commit is reported at run time, not in the version


def head() -> str | None:
    """HEAD's short sha, or None where the tree has no .git (the Nix check's source)."""
    if not (ROOT / ".git").exists():
        return None
    return git(ROOT, "rev-parse", "--short", "HEAD")


def describes(line: str, heads: set[str | None]) -> bool:
    """`line` is `dagma <version> (commit <one of heads>[-dirty])`, or says there is none."""
    prefix = f"dagma {importlib.metadata.version('dagma')} "
    shas = sorted(h for h in heads if h)
    if not shas:
        return line == prefix + "(no git commit)"
    commit = r"\(commit (" + "|".join(shas) + r")(-dirty)?\)"
    return re.fullmatch(re.escape(prefix) + commit, line) is not None


def test_dagma_version_prints_the_version_and_the_commit() -> None:
    before = head()  # and after: someone may commit meanwhile
    done = subprocess.run(
        [str(Path(sys.executable).with_name("dagma")), "--version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert describes(done.stdout.strip(), {before, head()}), done.stdout


def test_the_doctor_shows_the_version_and_the_commit(tmp_path: Path) -> None:
    before = head()
    checks = doctor.collect(doctor.Context(env_file=tmp_path / ".env", timeout=1.0))
    assert checks[0].name == "version" and checks[0].ok
    assert doctor.render(checks[:1]) == f"✓ version: {checks[0].detail}"
    assert describes(checks[0].detail, {before, head()}), checks[0].detail


def checkout(root: Path) -> Path:
    """A git checkout laid out like this one; returns its src/dagma."""
    package = root / "src" / "dagma"
    package.mkdir(parents=True)
    (root / "pyproject.toml").write_text("[project]\nname = 'dagma'\n")
    git(root, "init", "--quiet")
    git(root, "add", "pyproject.toml")
    git(root, "commit", "--quiet", "-m", "feat: first")
    return package


def test_the_commit_of_a_checkout_is_short_and_says_dirty(tmp_path: Path) -> None:
    package = checkout(tmp_path)
    sha = git(tmp_path, "rev-parse", "--short", "HEAD")
    assert version.commit(package) == sha
    (package / "new.py").write_text("")  # untracked files leave the tree clean
    assert version.commit(package) == sha
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'changed'\n")
    assert version.commit(package) == f"{sha}-dirty"


def test_without_a_checkout_the_commit_is_the_build_arg_or_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    installed = tmp_path / "site-packages" / "dagma"  # a wheel install, not src/dagma
    installed.mkdir(parents=True)
    monkeypatch.delenv(version.COMMIT_ENV, raising=False)
    assert version.commit(installed) is None
    copy = tmp_path / "app" / "src" / "dagma"  # the image: a source tree without .git
    copy.mkdir(parents=True)
    (tmp_path / "app" / "pyproject.toml").write_text("")
    assert version.commit(copy) is None
    monkeypatch.setenv(version.COMMIT_ENV, "abc1234")
    assert version.commit(copy) == "abc1234"


def test_the_doctor_warns_when_the_checkout_s_tag_is_not_the_installed_version(
    tmp_path: Path,
) -> None:
    package, ctx = checkout(tmp_path), doctor.Context(env_file=tmp_path / ".env")
    assert doctor.check_version(ctx, package).ok  # no tag on HEAD
    git(tmp_path, "tag", "v9.9.9")
    stale = doctor.check_version(ctx, package)
    assert not stale.ok and not stale.blocks
    assert stale.detail.endswith("but the checkout is at the release tag v9.9.9")
    assert stale.fix.startswith("uv sync --frozen")
    git(tmp_path, "tag", "--delete", "v9.9.9")
    git(tmp_path, "tag", "v" + importlib.metadata.version("dagma"))
    assert doctor.check_version(ctx, package).ok
