"""The search page keeps answering while a pipeline publishes new versions of its collection
(and the store deletes the versions past `keep`): no error, every answer complete."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from tests.app._support import APP

pytestmark = pytest.mark.integration
CHUNKS = 3000
# A pipeline stand-in: publishes the same chunks as new versions until told to stop.
WRITER = """import json, sys, time
from pathlib import Path
from dagma.lib.embeddings import get_embedder
from dagma.lib.vectors import EmbeddedStore, point_id
root, chunks, stop = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text()), Path(sys.argv[3])
vectors = get_embedder().embed([c["text"] for c in chunks])
ids = [point_id("dagma_docs", str(i)) for i in range(len(chunks))]
store = EmbeddedStore(root)
published = 0
while not stop.exists() or published < 5:
    store.publish("dagma_docs", ids, vectors, chunks)
    published += 1
    time.sleep(0.05)
print(published)
"""


def chunks() -> list[dict]:
    topics = ["try", "with", "for", "while", "def", "class", "import", "lambda"]
    return [
        {
            "source": f"pydoc:{topics[i % len(topics)]}",
            "title": f"The {topics[i % len(topics)]} statement, part {i}",
            "chunk": i,
            "text": f"How the {topics[i % len(topics)]} statement works, example {i}: "
            f"{' '.join(topics[(i + j) % len(topics)] for j in range(12))}.",
        }
        for i in range(CHUNKS)
    ]


def test_search_answers_while_the_collection_is_republished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from dagma.lib.embeddings import get_embedder
    from dagma.lib.vectors import EmbeddedStore, point_id

    root, data, stop = tmp_path / "qdrant", tmp_path / "chunks.json", tmp_path / "stop"
    rows = chunks()
    data.write_text(json.dumps(rows))
    ids = [point_id("dagma_docs", str(i)) for i in range(len(rows))]
    EmbeddedStore(root).publish(
        "dagma_docs", ids, get_embedder().embed([r["text"] for r in rows]), rows
    )
    monkeypatch.setenv("DAGMA_QDRANT_PATH", str(root))
    monkeypatch.delenv("QDRANT_URL", raising=False)

    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(root), str(data), str(stop)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        app = AppTest.from_file(str(APP), default_timeout=120).run()
        app.switch_page("pages/search.py").run()
        assert not app.exception, [e.value for e in app.exception]
        versions = set()
        deadline = time.monotonic() + 120
        queries = 0
        while (len(versions) < 3 or queries < 10) and time.monotonic() < deadline:
            app.text_input[0].input(f"How does the try statement work, example {queries}?")
            app.run()
            queries += 1
            assert not app.exception, [e.value for e in app.exception]
            assert len(app.expander) == 5  # a complete answer every time
            assert all(json.loads(j.value)["source"].startswith("pydoc:") for j in app.json)
            caption = next(c.value for c in app.caption if "Collection" in c.value)
            versions.add(int(re.search(r" v(\d+):", caption)[1]))
            assert f"{CHUNKS} chunks" in caption
            st.cache_data.clear()  # read the current version again, not the cached one
    finally:
        stop.touch()
        out, err = writer.communicate(timeout=120)
    assert writer.returncode == 0, err
    published = int(out.strip())
    assert len(versions) >= 3, f"the app saw versions {sorted(versions)} of {published + 1}"
    current = EmbeddedStore(root).current_version("dagma_docs")
    assert current is not None and current.version == published + 1
    kept = sorted(p.name for p in (root / "dagma_docs").iterdir() if p.name.startswith("v"))
    assert len(kept) <= 3  # old versions were deleted while the app was reading
