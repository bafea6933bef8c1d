"""What every benchmark prints about the machine, and how it rewrites its section of the docs."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"


def machine(
    load_start: tuple[float, ...], load_end: tuple[float, ...], packages: tuple[str, ...]
) -> list[str]:
    """Markdown bullets: CPU, load average, Python, the `packages`' versions and the commit."""
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

    def git(*args: str) -> str:
        proc = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("status", "--porcelain", "--", "src"):
        commit += " plus uncommitted changes in src/"
    return [
        f"- Machine: {os.cpu_count()} CPUs (`nproc`: {len(os.sched_getaffinity(0))}), {cpu}",
        f"- Load average (1/5/15 min): {load(load_start)} at start, {load(load_end)} at end",
        f"- Python {platform.python_version()}, "
        f"PYTHONDONTWRITEBYTECODE={os.environ.get('PYTHONDONTWRITEBYTECODE', 'unset')}",
        f"- Versions: {versions}",
        f"- Commit: {commit}",
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
