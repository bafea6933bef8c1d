"""The app reads the embedded store without writing it: compose mounts it read-only.

The store is published by this process (0755 folders, 0644 files, as under a 022 umask), then
made read-only, and the app's data layer searches it in a process that may not write there. As
root that process drops every capability first (root ignores permission bits only through
them), so it needs no other user who could reach this checkout's venv.
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
    """A scratch folder of its own, outside pytest's tmp_path."""
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
    no_capabilities = ["setpriv", "--bounding-set=-all", "--inh-caps=-all"]
    argv = [*(no_capabilities if os.geteuid() == 0 else []), sys.executable, "-c", READER]
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
    for path in (home / "qdrant").rglob("*"):  # another reader (user) sees what the folder shows
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) & 0o044 == 0o044, path
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
