"""Check that commit messages are Conventional Commits, with the commit-msg hook's own rules.

    python scripts/check-commit-messages.py [--strict] BASE HEAD   # the commits in BASE..HEAD
    python scripts/check-commit-messages.py [--strict] --file MSG  # one message file

CI runs the first form over a pull request's or a push's commits. Commits up to CUTOVER (the
history from before the convention was enforced) are never checked; an unknown or all-zero
BASE (a new branch, a manual run) checks everything after CUTOVER. The types and options are
the `conventional-pre-commit` hook's args in .pre-commit-config.yaml, so the hook and CI agree.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from conventional_pre_commit import hook

ROOT = Path(__file__).resolve().parents[1]
CUTOVER = "1610fb8748b41234ecad6921933a14262a5f8485"  # pragma: allowlist secret (a commit id)
HOOK_ID = "conventional-pre-commit"
GUIDE = "docs/contributing.md (Commit messages: Conventional Commits)"


class CheckError(Exception):
    """The check cannot run (no config, a commit missing from a shallow clone)."""


def hook_args(config: Path) -> list[str]:
    """The types and options the commit-msg hook passes to conventional-pre-commit."""
    if not config.is_file():
        raise CheckError(f"{config} is missing: restore it from git")
    for repo in yaml.safe_load(config.read_text()).get("repos", []):
        for entry in repo.get("hooks", []):
            if entry.get("id") == HOOK_ID:
                return [str(arg) for arg in entry.get("args", [])]
    raise CheckError(f"{config} has no '{HOOK_ID}' hook: add it (see {GUIDE})")


def git(*args: str, cwd: Path) -> str:
    done = subprocess.run(  # nosec B603, B607 # argv built here, no shell; git from PATH
        ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )
    if done.returncode != 0:
        raise CheckError(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def has_commit(ref: str, cwd: Path) -> bool:
    try:
        git("cat-file", "-e", f"{ref}^{{commit}}", cwd=cwd)
    except CheckError:
        return False
    return True


def commits(base: str, head: str, cutover: str, cwd: Path) -> list[str]:
    """Non-merge commits in base..head that come after the cut-over, oldest first."""
    if not has_commit(cutover, cwd):
        raise CheckError(
            f"the cut-over commit {cutover[:12]} is not in this clone: fetch the whole history "
            "(actions/checkout with fetch-depth: 0, or git fetch --unshallow)"
        )
    since = [f"^{cutover}"]
    if base.strip("0") and has_commit(base, cwd):
        since.append(f"^{base}")
    out = git("rev-list", "--no-merges", "--reverse", head, *since, cwd=cwd)
    return out.split()


def check_message(message: str, args: list[str]) -> str | None:
    """None when the message passes conventional-pre-commit with `args`, else its report."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "COMMIT_EDITMSG"
        path.write_text(message, encoding="utf-8")
        report = io.StringIO()
        with contextlib.redirect_stdout(report), contextlib.redirect_stderr(report):
            code = hook.main([*args, str(path)])
    return None if code == hook.RESULT_SUCCESS else report.getvalue().strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", nargs="?", help="the commit before the range (exclusive)")
    parser.add_argument("head", nargs="?", default="HEAD", help="the last commit to check")
    parser.add_argument("--file", type=Path, help="check this one message file instead")
    parser.add_argument("--strict", action="store_true", help="refuse fixup! and merge messages")
    parser.add_argument("--cutover", default=CUTOVER, help="commits up to it are not checked")
    parser.add_argument("--repo", type=Path, default=Path.cwd(), help="the git checkout")
    parser.add_argument("--config", type=Path, default=ROOT / ".pre-commit-config.yaml")
    opts = parser.parse_args(argv)
    try:
        # Options first: after the types, argparse would take no more positional (the file).
        flags = ["--no-color", "--verbose", *(["--strict"] if opts.strict else [])]
        args = flags + hook_args(opts.config)
        if opts.file:
            todo = [(str(opts.file), opts.file.read_text(encoding="utf-8"))]
        else:
            shas = commits(opts.base or "", opts.head, opts.cutover, opts.repo)
            todo = [(sha[:12], git("log", "-1", "--format=%B", sha, cwd=opts.repo)) for sha in shas]
    except (CheckError, OSError) as exc:
        print(f"check-commit-messages: {exc}", file=sys.stderr)
        return 2
    bad = []
    for name, message in todo:
        report = check_message(message, args)
        if report is not None:
            subject = message.strip().splitlines()[0] if message.strip() else "(empty message)"
            bad.append(f"✗ {name} {subject!r}\n{report}")
    for line in bad:
        print(line, end="\n\n")
    if bad:
        print(
            f"{len(bad)} of {len(todo)} commit message(s) are not Conventional Commits "
            "(<type>(<scope>): <summary>, a type from the hook's list). Fix: reword them "
            f"(git rebase -i, 'reword'), then push again; see {GUIDE}."
        )
        return 1
    print(f"✓ {len(todo)} commit message(s) follow Conventional Commits")
    return 0


if __name__ == "__main__":
    sys.exit(main())
