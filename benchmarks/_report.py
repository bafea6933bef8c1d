"""What every benchmark prints about the machine, and how it rewrites its section of the docs."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
SHOWN = 10  # changed files named in a section's commit line; the rest are counted


@dataclass(frozen=True)
class Tree:
    """The commit a benchmark measures, and the tracked files that differ from it."""

    commit: str | None  # short hash of HEAD; None when git cannot tell
    changed: tuple[str, ...] = ()  # docs/benchmarks.md aside: the benchmarks rewrite it
    error: str = ""  # why git could not tell


def _git(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)


def tree_state(root: Path = ROOT, docs: Path = DOCS) -> Tree:
    """HEAD and the tracked files with uncommitted changes (staged or not); untracked ones
    do not count."""
    head = _git(root, "rev-parse", "--short", "HEAD")
    if head.returncode != 0:
        return Tree(None, error=head.stderr.strip() or f"git rev-parse failed in {root}")
    status = _git(root, "status", "--porcelain=v1", "-z", "--untracked-files=no", "--no-renames")
    if status.returncode != 0:
        return Tree(None, error=status.stderr.strip() or f"git status failed in {root}")
    skip = docs.resolve().relative_to(root.resolve()).as_posix()
    # Each entry is "XY path"; -z keeps paths unquoted.
    paths = {entry[3:] for entry in status.stdout.split("\0") if len(entry) > 3}
    return Tree(head.stdout.strip(), tuple(sorted(paths - {skip})))


def add_docs_flags(parser: argparse.ArgumentParser) -> None:
    """`--write-docs` and `--allow-dirty`, the same in every benchmark."""
    parser.add_argument(
        "--write-docs",
        action="store_true",
        help="rewrite this benchmark's section of docs/benchmarks.md (from a committed HEAD)",
    )
    parser.add_argument(
        "--allow-dirty",
        action="store_true",
        help="with --write-docs: record despite uncommitted changes, named in the section",
    )


def check_docs_flags(
    parser: argparse.ArgumentParser, args: argparse.Namespace, *partial: str
) -> None:
    """`--allow-dirty` needs `--write-docs`, which records only a full run (none of `partial`,
    the flags that shorten a run)."""
    if args.allow_dirty and not args.write_docs:
        parser.error("--allow-dirty applies only with --write-docs; drop it or add --write-docs")
    used = [f"--{name.replace('_', '-')}" for name in partial if getattr(args, name)]
    if args.write_docs and used:
        parser.error(
            f"--write-docs records a full run only, not one with {' or '.join(used)}: "
            "drop one or the other"
        )


def _names(paths: tuple[str, ...] | list[str]) -> str:
    shown = ", ".join(paths[:SHOWN])
    return shown + (f" and {len(paths) - SHOWN} more" if len(paths) > SHOWN else "")


def _refuse(problem: str) -> NoReturn:
    print(
        f"error: --write-docs records results from a committed HEAD only, but {problem}.\n"
        "Commit first (git commit -m ... -- PATHS), or pass --allow-dirty to record them "
        "anyway, marked in the section as measured with uncommitted changes.",
        file=sys.stderr,
    )
    raise SystemExit(2)


def start(write_docs: bool, allow_dirty: bool, root: Path = ROOT, docs: Path = DOCS) -> Tree:
    """The tree this run measures; exits 2 when `--write-docs` would record uncommitted
    changes without `--allow-dirty`. Call it before any timing: a refusal costs nothing."""
    tree = tree_state(root, docs)
    if not write_docs or allow_dirty:
        return tree
    if tree.commit is None:
        _refuse(f"git cannot tell which commit this is ({tree.error})")
    if tree.changed:
        _refuse(f"these tracked files differ from HEAD ({tree.commit}): {', '.join(tree.changed)}")
    return tree


def commit_line(started: Tree, now: Tree) -> str:
    """`abc1234`, or `abc1234 **plus uncommitted changes in: ...**`, for a section."""
    text = started.commit or "unknown"
    if now.commit != started.commit:
        text += f" **(HEAD moved to {now.commit or 'unknown'} during the run)**"
    changed = sorted(set(started.changed) | set(now.changed))
    if changed:
        text += f" **plus uncommitted changes in: {_names(changed)}**"
    return text


def write_section(
    section: str,
    start_marker: str,
    end_marker: str,
    started: Tree,
    allow_dirty: bool,
    root: Path = ROOT,
    docs: Path = DOCS,
) -> None:
    """`replace_section`, unless the tree changed since `started` (another commit, an edit)
    and `allow_dirty` is off: then exit 2, since the results may mix two versions."""
    now = tree_state(root, docs)
    if now != started and not allow_dirty:
        what = []
        if now.commit != started.commit:
            what.append(f"HEAD moved from {started.commit} to {now.commit}")
        if now.changed:
            what.append(f"these tracked files differ from HEAD: {', '.join(now.changed)}")
        _refuse(
            "the tree changed during the run (" + "; ".join(what or ["git state differs"]) + "), "
            "so these results may mix two versions; they are printed above, not recorded"
        )
    replace_section(section, start_marker, end_marker, docs)


def write_titled_section(
    title: str,
    intro: str,
    body: str,
    start_marker: str,
    end_marker: str,
    started: Tree,
    allow_dirty: bool,
    root: Path = ROOT,
    docs: Path = DOCS,
) -> None:
    """`write_section` of `## title`, the intro wrapped at 100 columns, then `body`."""
    section = "\n".join(
        [start_marker, f"## {title}", "", textwrap.fill(intro, width=100), "", body, end_marker]
    )
    write_section(section, start_marker, end_marker, started, allow_dirty, root, docs)


def machine(
    load_start: tuple[float, ...],
    load_end: tuple[float, ...],
    packages: tuple[str, ...],
    started: Tree,
) -> list[str]:
    """Markdown bullets: CPU, load average, Python, the `packages`' versions and the commit
    (`started`, marked with any uncommitted change then or now)."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = ", ".join(f"{pkg} {importlib.metadata.version(pkg)}" for pkg in packages)

    def load(avg: tuple[float, ...]) -> str:
        return " / ".join(f"{x:.2f}" for x in avg)

    return [
        f"- Machine: {os.cpu_count()} CPUs (`nproc`: {len(os.sched_getaffinity(0))}), {cpu}",
        f"- Load average (1/5/15 min): {load(load_start)} at start, {load(load_end)} at end",
        f"- Python {platform.python_version()}, "
        f"PYTHONDONTWRITEBYTECODE={os.environ.get('PYTHONDONTWRITEBYTECODE', 'unset')}",
        f"- Versions: {versions}",
        f"- Commit: {commit_line(started, tree_state())}",
    ]


def replace_section(section: str, start: str, end: str, docs: Path = DOCS) -> None:
    """Put `section` (which begins with `start` and ends with `end`) in place of the old one."""
    text = docs.read_text() if docs.exists() else "# Benchmarks\n\n"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        text = before + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    docs.write_text(text)


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without any lab state, plus `extra`."""
    drop = ("DAGSTER_HOME", "MLFLOW_TRACKING_URI", "QDRANT_URL", "DAGMA_CONTEXT")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("DAGMA_")}
    env.update(extra)
    return env


def fmt(seconds: float | None) -> str:
    """Seconds for a table cell; "failed" when there is no measurement."""
    return "failed" if seconds is None else f"{seconds:.2f}"
