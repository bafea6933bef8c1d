"""A process's own writable copy of a published version, for readers that may not write it.

qdrant-edge maps a shard's files read-write even to search, and Qdrant does not run on a
read-only file system (qdrant/qdrant#3276), so the app, which mounts the store read-only, loads
each version it searches from a copy under TMPDIR. Versions are immutable, so the copy never goes
stale; the embedded store removes it when it opens the next version, and the process at exit.
"""

from __future__ import annotations

import atexit
import errno
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

_FOLDER: list[tuple[int, Path]] = []  # (pid, folder): a forked child makes its own


def _folder() -> Path:
    if not _FOLDER or _FOLDER[0][0] != os.getpid():
        folder = Path(tempfile.mkdtemp(prefix="dagma-vectors-"))  # mode 0700, under TMPDIR
        _FOLDER[:] = [(os.getpid(), folder)]
        atexit.register(_remove, os.getpid(), folder)
    return _FOLDER[0][1]


def _remove(pid: int, folder: Path) -> None:
    if os.getpid() == pid:
        shutil.rmtree(folder, ignore_errors=True)


def _extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """The (start, end) ranges of the file that hold data: a shard's page files are mostly holes."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # a file system without SEEK_DATA: copy the rest
                yield offset, size
            return  # ENXIO: only a hole is left
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, end
        offset = end


def copy_sparse(src: str, dst: str) -> None:
    """Copy a file, keeping its holes."""
    with open(src, "rb") as source, open(dst, "wb") as target:
        fd = source.fileno()
        size = os.fstat(fd).st_size
        for start, end in _extents(fd, size):
            target.seek(start)
            while start < end:
                chunk = os.pread(fd, min(1 << 20, end - start), start)
                if not chunk:
                    break
                target.write(chunk)
                start += len(chunk)
        target.truncate(size)


def private_copy(version: Path) -> Path:
    """Copy the `version` folder into this process's private folder, writable by it alone."""
    copy = _folder() / f"{version.parent.name}-{version.name}-{uuid.uuid4().hex[:8]}"
    try:
        shutil.copytree(version, copy, copy_function=copy_sparse)
        for path in (copy, *copy.rglob("*")):
            path.chmod(0o700 if path.is_dir() else 0o600)
    except BaseException:
        shutil.rmtree(copy, ignore_errors=True)
        raise
    return copy
