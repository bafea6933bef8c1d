"""Which Dagma this is: the installed version (from the git tag) and the commit it runs from.

Standard library only, and nothing runs at import: `commit()` asks git when it is called.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess  # nosec B404 # git with argv lists built here, never a shell
from pathlib import Path

PACKAGE = "dagma"
PACKAGE_DIR = Path(__file__).resolve().parent
# An image built without .git records its commit here (docker/prod/Dockerfile, release.yml).
COMMIT_ENV = "DAGMA_COMMIT"
# pyproject.toml's [tool.hatch.version] fallback-version: a build without git metadata.
UNKNOWN_VERSION = "0.0.0"


def version() -> str:
    """The installed package's version: X.Y.Z at a vX.Y.Z tag, X.Y.(Z+1).devN after it."""
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return UNKNOWN_VERSION


def checkout_root(package_dir: Path = PACKAGE_DIR) -> Path | None:
    """The git checkout this package runs from (an editable install's src/dagma), else None."""
    root = package_dir.parent.parent
    if package_dir.parent.name != "src" or not (root / "pyproject.toml").is_file():
        return None  # an installed wheel: a git repository above site-packages is not ours
    return root if (root / ".git").exists() else None


def _git(root: Path, *args: str) -> str:
    git = shutil.which("git") or "git"
    done = subprocess.run(  # nosec B603 # argv built here, no shell
        # No optional locks: a status must not hold index.lock while someone commits.
        [git, "--no-optional-locks", "-C", str(root), *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    )
    return done.stdout.strip()


def commit(package_dir: Path = PACKAGE_DIR) -> str | None:
    """The checkout's short commit, with `-dirty` when tracked files changed; None outside git."""
    root = checkout_root(package_dir)
    if root is None:
        return os.environ.get(COMMIT_ENV, "").strip() or None
    try:
        sha = _git(root, "rev-parse", "--short", "HEAD")
        dirty = _git(root, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}-dirty" if dirty else sha


def tag(package_dir: Path = PACKAGE_DIR) -> str | None:
    """The release tag (vX.Y.Z) on the checkout's HEAD, if there is one."""
    root = checkout_root(package_dir)
    if root is None:
        return None
    try:
        return _git(root, "describe", "--tags", "--exact-match", "--match", "v[0-9]*", "HEAD")
    except (OSError, subprocess.SubprocessError):
        return None  # no tag on HEAD


def describe() -> str:
    """One line: `dagma <version> (commit <sha>)`, as `dagma --version` prints it."""
    sha = commit()
    return f"{PACKAGE} {version()} " + (f"(commit {sha})" if sha else "(no git commit)")
