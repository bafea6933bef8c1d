"""Which executed-notebook folders under runs/ to keep: pure, no Dagster.

A folder `runs/<run id>/<notebook>/` is kept when a current materialization points at it, when
its run may still be going, or when it is among the newest `keep` of its notebook.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from dagma.lib.run_folder import RunFolder

TRASH_PREFIX = ".trash-"


def run_folders(runs_dir: Path) -> list[RunFolder]:
    """Every `<run id>/<notebook>/` folder under `runs_dir`."""
    return RunFolder.every(runs_dir)


def to_delete(folders: list[RunFolder], protected: set[str], keep: int) -> list[RunFolder]:
    """The folders no materialization points at, beyond the newest `keep` of each notebook."""
    if keep < 0:
        raise ValueError(f"keep must be 0 or more, got {keep}.")
    by_notebook: dict[str, list[RunFolder]] = {}
    for folder in folders:
        by_notebook.setdefault(folder.notebook, []).append(folder)
    doomed = []
    for group in by_notebook.values():
        newest_first = sorted(group, key=lambda f: f.mtime, reverse=True)
        doomed += [f for f in newest_first[keep:] if f.run_id not in protected]
    return sorted(doomed, key=lambda f: (f.notebook, f.mtime))


def remove(folders: list[RunFolder], runs_dir: Path) -> int:
    """Delete `folders`; each is first renamed away, so no reader sees half of one. Bytes freed.

    A gc killed midway leaves only `.trash-*` folders, which the next call removes.
    """
    freed = 0
    for folder in folders:
        trash = runs_dir / f"{TRASH_PREFIX}{folder.run_id}-{folder.notebook}"
        folder.path.rename(trash)
        if not any(folder.path.parent.iterdir()):
            folder.path.parent.rmdir()
    for trash in runs_dir.glob(f"{TRASH_PREFIX}*"):
        freed += sum(p.stat().st_size for p in trash.rglob("*") if p.is_file())
        shutil.rmtree(trash, ignore_errors=True)
    return freed
