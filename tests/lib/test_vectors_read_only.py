"""The app reads the embedded store without writing it: compose mounts it read-only.

The store is published by this process (as root: 0755 folders, 0644 files); the app's data
layer then searches it in a process that may not write there: as `nobody` when the suite runs
as root (root ignores permission bits), else as this user over a copy made read-only.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from dagma.lib.vectors import EmbeddedStore, point_id

COLLECTION = "dagma_docs"
READER = """
import json, sys
import numpy as np
from dagma.app import data
from dagma.settings import Settings

store = data.open_vectors(Settings())
version = data.collection_version(store, "dagma_docs")
query = np.array(json.loads(sys.argv[1]), dtype=np.float32)
hits = [h.id for h in store.search("dagma_docs", query, k=3)]
red = [h.id for h in store.search("dagma_docs", query, k=3, filter={"color": "red"})]
print(json.dumps({"version": version.name, "hits": hits, "red": red, "n": store.count("dagma_docs")}))
"""


@pytest.fixture
def shared() -> Iterator[Path]:
    """A folder another user can traverse (pytest's tmp_path is 0700)."""
    folder = Path(tempfile.mkdtemp(prefix="dagma-ro-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size, p.stat().st_mode)
        for p in root.rglob("*")
    }


def read_only(root: Path) -> None:
    for p in (root, *root.rglob("*")):
        p.chmod(stat.S_IMODE(p.stat().st_mode) & 0o555)


def reader(home: Path, tmp: Path, query: np.ndarray) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": os.environ["PATH"],
        "DAGMA_HOME": str(home),
        "HOME": str(tmp),
        "TMPDIR": str(tmp),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    as_nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    argv = [*(as_nobody if os.geteuid() == 0 else []), sys.executable, "-c", READER]
    return subprocess.run(
        [*argv, json.dumps(query.tolist())],
        env=env,
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_app_searches_a_store_it_may_not_write_and_writes_nothing(shared):
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((200, 16)).astype(np.float32)
    ids = [point_id("doc", str(i)) for i in range(200)]
    payloads = [{"i": i, "color": ("red", "blue")[i % 2], "text": f"chunk {i}"} for i in range(200)]
    home = shared / "home"
    old = os.umask(0o022)
    try:
        store = EmbeddedStore(home / "qdrant")
        store.publish(COLLECTION, ids, vectors, payloads)
    finally:
        os.umask(old)
    query = vectors[5]
    expected = [h.id for h in store.search(COLLECTION, query, k=3)]
    expected_red = [h.id for h in store.search(COLLECTION, query, k=3, filter={"color": "red"})]
    if os.geteuid() != 0:
        read_only(home)
    before = snapshot(home)
    tmp = shared / "tmp"
    tmp.mkdir(mode=0o777)
    tmp.chmod(0o777)

    done = reader(home, tmp, query)

    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.splitlines()[-1])
    assert found == {"version": "v0001", "hits": expected, "red": expected_red, "n": 200}
    assert found["hits"][0] == ids[5]
    assert snapshot(home) == before  # nothing written, not even a lock file
    assert list(tmp.glob("dagma-vectors-*")) == []  # the private copy went with the process
