"""A temporary folder beside a target, locked while its owner lives: the folder of an owner
that was killed is found by its free lock, and the next owner removes it."""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK = "owner.lock"


@contextmanager
def staging_folder(parent: Path, prefix: str) -> Iterator[Path]:
    """A new folder `parent/<prefix>...`, locked while the block runs and removed after it."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    # Locked under another name first, then renamed: a sweep never sees the lock unheld.
    fd = os.open(tmp / (LOCK + ".new"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(tmp / (LOCK + ".new"), tmp / LOCK)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        os.close(fd)


def abandoned(parent: Path, prefix: str) -> Iterator[Path]:
    """Each `parent/<prefix>...` folder whose owner is gone, its lock held while it is yielded
    (so two sweeps never clean the same folder). A folder with no lock file is not ours."""
    for tmp in sorted(parent.glob(prefix + "*")):
        try:
            fd = os.open(tmp / LOCK, os.O_RDONLY)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            yield tmp
        finally:
            os.close(fd)
