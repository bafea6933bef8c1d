import contextlib
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from dagma.lib.vectors import (
    CollectionVersion,
    EmbeddedStore,
    ServerStore,
    VectorStoreError,
    ids_digest,
    open_store,
    point_id,
)

DIM = 16
COLORS = ("red", "green", "blue")


def corpus(n: int = 300, gen: int = 1, seed: int = 0):
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, DIM)).astype(np.float32)
    ids = [point_id("doc", str(i)) for i in range(n)]
    payloads = [
        {"i": i, "gen": gen, "color": COLORS[i % 3], "even": i % 2 == 0, "half": i / 2}
        for i in range(n)
    ]
    return ids, vectors, payloads


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def wait_for(check, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_point_id_is_a_deterministic_uuid():
    assert point_id("doc", "1") == point_id("doc", "1")
    ids = {point_id("doc", "1"), point_id("doc", "2"), point_id("1", "doc"), point_id("doc1")}
    assert len(ids) == 4
    assert uuid.UUID(point_id("a")).version == 5
    assert ids_digest(["b", "a"]) == ids_digest(["a", "b"]) != ids_digest(["a", "c"])


def test_publish_then_search_returns_the_nearest_neighbour_with_its_payload(tmp_path):
    ids, vectors, payloads = corpus()
    with EmbeddedStore(tmp_path) as store:
        seen: list[int] = []
        version = store.publish(
            "docs",
            ids,
            vectors,
            payloads,
            batch_size=64,
            progress=seen.append,
            metadata={"model": "m2v"},
        )
        hits = store.search("docs", vectors[42] + 0.01, k=3)

        assert version == CollectionVersion("docs", 1, "v0001", 300, DIM)
        assert seen == [64, 128, 192, 256, 300]
        assert hits[0].id == ids[42] and hits[0].payload == payloads[42]
        assert hits[0].score == pytest.approx(1.0, abs=1e-3)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        assert store.count("docs") == 300
        assert store.current_version("docs") == version
        assert store.current_version("docs").metadata == {"model": "m2v"}
        assert store.collections() == [version]
        assert (store.kind, store.location) == ("embedded", str(tmp_path.resolve()))


def test_republishing_the_same_ids_replaces_rather_than_duplicates(tmp_path):
    ids, vectors, payloads = corpus()
    store = EmbeddedStore(tmp_path)
    store.publish("docs", ids, vectors, payloads)
    second = store.publish("docs", ids, vectors, corpus(gen=2)[2])

    assert second.version == 2 and store.count("docs") == 300
    assert store.search("docs", vectors[7], k=1)[0].payload["gen"] == 2


def test_old_versions_are_pruned_to_keep(tmp_path):
    ids, vectors, payloads = corpus(n=50)
    store = EmbeddedStore(tmp_path, keep=2)
    for _ in range(4):
        store.publish("docs", ids, vectors, payloads)

    assert files(tmp_path / "docs") == [".lock", "CURRENT", "v0003", "v0004"]
    assert store.current_version("docs").version == 4


def fail_in_progress(n: int) -> None:
    if n > 64:
        raise RuntimeError("callback failed")


@pytest.mark.parametrize(
    ("payload_50", "progress", "error"),
    [(None, fail_in_progress, RuntimeError), ({"bad": object()}, None, ValueError)],
    ids=["progress-raises", "bad-payload-mid-way"],
)
def test_a_failed_publish_keeps_the_previous_version_and_no_partial_folder(
    tmp_path, payload_50, progress, error
):
    ids, vectors, payloads = corpus()
    store = EmbeddedStore(tmp_path)
    store.publish("docs", ids, vectors, payloads)
    _, vectors2, payloads2 = corpus(gen=2, seed=1)
    if payload_50:
        payloads2[250] = payload_50

    with pytest.raises(error):
        store.publish("docs", ids, vectors2, payloads2, batch_size=64, progress=progress)

    assert files(tmp_path / "docs") == [".lock", "CURRENT", "v0001"]
    assert store.current_version("docs").version == 1
    assert store.search("docs", vectors[3], k=1)[0].payload == payloads[3]


def test_bad_input_is_refused_before_anything_is_built(tmp_path):
    ids, vectors, payloads = corpus(n=10)
    store = EmbeddedStore(tmp_path)
    with pytest.raises(ValueError, match="appears twice"):
        store.publish("docs", [ids[0], *ids[1:-1], ids[0]], vectors, payloads)
    with pytest.raises(ValueError, match="2-D"):
        store.publish("docs", ids, vectors[0], payloads)
    with pytest.raises(ValueError, match="inhomogeneous"):
        store.publish("docs", ids[:2], [vectors[0], vectors[1][:5]], payloads[:2])
    with pytest.raises(ValueError, match="invalid"):
        store.publish("bad name", ids, vectors, payloads)
    assert store.collections() == []
    store.publish("docs", ids, vectors, payloads)
    with pytest.raises(ValueError, match=r"'docs': nothing to publish \(0 points\), so the cur"):
        store.publish("docs", [], [], [])
    assert store.current_version("docs").version == 1
    assert [p.name for p in (tmp_path / "docs").glob("v*")] == ["v0001"]


def test_filter_keeps_only_exact_payload_matches(tmp_path):
    ids, vectors, payloads = corpus()
    store = EmbeddedStore(tmp_path)
    store.publish("docs", ids, vectors, payloads)

    def search(**filter):
        return [h.payload for h in store.search("docs", vectors[0], k=20, filter=filter)]

    assert {p["color"] for p in search(color="green")} == {"green"}
    # bools must match booleans, not the integers 0/1 (a qdrant-edge binding quirk)
    assert {p["even"] for p in search(even=False)} == {False}
    assert [p["i"] for p in search(i=7)] == [7]
    assert [p["half"] for p in search(half=3.5)] == [3.5]
    assert {(p["color"], p["even"]) for p in search(color="red", even=True)} == {("red", True)}
    assert search(color="purple") == []
    with pytest.raises(ValueError, match="only str, int, float or bool"):
        search(color=["red"])


def test_unpublished_collection_and_wrong_query_dim_are_explained(tmp_path):
    store = EmbeddedStore(tmp_path)
    with pytest.raises(VectorStoreError, match="has not been published"):
        store.search("docs", np.ones(DIM))
    assert store.current_version("docs") is None
    ids, vectors, payloads = corpus(n=10)
    store.publish("docs", ids, vectors, payloads)
    with pytest.raises(ValueError, match="dim 3 but 'docs' holds dim 16"):
        store.search("docs", np.ones(3))


def test_a_corrupt_current_pointer_names_the_folder_and_the_fix(tmp_path):
    ids, vectors, payloads = corpus(n=10)
    EmbeddedStore(tmp_path).publish("docs", ids, vectors, payloads)
    (tmp_path / "docs" / "CURRENT").write_text("garbage")

    with pytest.raises(VectorStoreError, match="publish the collection again") as err:
        EmbeddedStore(tmp_path)
    assert str(tmp_path / "docs") in str(err.value)


def test_corrupt_version_files_name_the_folder_and_the_fix(tmp_path):
    ids, vectors, payloads = corpus(n=10)
    store = EmbeddedStore(tmp_path)
    store.publish("docs", ids, vectors, payloads)
    (tmp_path / "docs" / "v0001" / "edge_config.json").write_text("{not json")

    with pytest.raises(VectorStoreError, match="looks corrupt") as err:
        store.search("docs", vectors[0])
    assert str(tmp_path / "docs" / "v0001") in str(err.value)


def test_a_file_in_place_of_the_store_folder_is_refused(tmp_path):
    (tmp_path / "store").write_text("")
    with pytest.raises(VectorStoreError, match="DAGMA_QDRANT_PATH"):
        EmbeddedStore(tmp_path / "store")


def run_child(code: str, *args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


READER = """
import json, sys, time
from pathlib import Path
import numpy as np
from dagma.lib.vectors import EmbeddedStore

root, stop, seen = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
store, gens, times, errors = EmbeddedStore(root), [], [], []
while not stop.exists():
    try:
        gen = store.search("docs", np.ones(16), k=3)[0].payload["gen"]
        times.append(time.time())
        if gen not in gens:
            gens.append(gen)
            tmp = seen.with_suffix(".tmp")  # replaced whole: the test never reads half a file
            tmp.write_text(json.dumps(gens))
            tmp.replace(seen)
    except Exception as exc:
        errors.append(repr(exc))
    time.sleep(0.002)
print(json.dumps({"gens": gens, "times": times, "errors": errors[:3]}))
"""


def test_a_reader_process_searches_while_this_process_publishes(tmp_path):
    ids, vectors, payloads = corpus()
    store = EmbeddedStore(tmp_path, keep=1)  # keep=1: the version a reader has open gets deleted
    store.publish("docs", ids, vectors, payloads)
    stop, seen = tmp_path / "stop", tmp_path / "seen.json"
    reader = run_child(READER, tmp_path, stop, seen)
    try:
        wait_for(seen.exists, "the reader's first search")
        windows = []
        for gen in (2, 3):
            start = time.time()
            store.publish(
                "docs",
                ids,
                vectors,
                corpus(gen=gen)[2],
                batch_size=50,
                progress=lambda n: time.sleep(0.03),
            )
            windows.append((start, time.time()))
            wait_for(lambda g=gen: g in json.loads(seen.read_text()), f"the reader to see v{gen}")
    finally:
        stop.touch()
        out, err = reader.communicate(timeout=15)
    result = json.loads(out) if out else {"errors": [err]}

    assert result["errors"] == []
    assert result["gens"] == [1, 2, 3]
    for start, end in windows:
        assert any(start <= t <= end for t in result["times"]), "no search overlapped a publish"


WRITER = """
import sys, time
from pathlib import Path
import numpy as np
from dagma.lib.vectors import EmbeddedStore, point_id

root, started, go = map(Path, sys.argv[1:4])
def hold(n):
    started.touch()
    while not go.exists():
        time.sleep(0.01)
ids = [point_id(str(i)) for i in range(10)]
EmbeddedStore(root).publish("docs", ids, np.ones((10, 16)), [{}] * 10, progress=hold)
"""


def test_a_second_writer_gets_a_locked_error_naming_the_folder(tmp_path):
    ids, vectors, payloads = corpus(n=10)
    store = EmbeddedStore(tmp_path)
    store.publish("docs", ids, vectors, payloads)
    started, go = tmp_path / "started", tmp_path / "go"
    writer = run_child(WRITER, tmp_path, started, go)
    try:
        wait_for(started.exists, "the other writer to start")
        with pytest.raises(VectorStoreError, match="locked by another writer") as err:
            store.publish("docs", ids, vectors, payloads)
        assert str(tmp_path / "docs") in str(err.value)
        assert store.search("docs", vectors[0], k=1)[0].id == ids[0]  # readers unaffected
    finally:
        go.touch()
        _, stderr = writer.communicate(timeout=15)
    assert writer.returncode == 0, stderr
    assert store.current_version("docs").version == 2


def test_an_unreachable_server_fails_fast_naming_qdrant_url(tmp_path):
    start = time.monotonic()
    with pytest.raises(VectorStoreError, match="QDRANT_URL"):
        open_store(url="http://127.0.0.1:1", api_key=None, root=tmp_path)
    with pytest.raises(VectorStoreError, match=r"cannot reach Qdrant at http://127\.0\.0\.1:1"):
        ServerStore("http://127.0.0.1:1", timeout=2)
    assert time.monotonic() - start < 5


@contextlib.contextmanager
def refusing_server(seen: list[str | None]):
    """The URL of an endpoint that answers as Qdrant does to a wrong `api-key` header (401
    with a JSON status), which is all the client sees; `seen` gets each key it was sent.
    No Qdrant server runs offline here."""
    import http.server
    import threading

    class Refuse(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.headers.get("api-key"))
            body = (
                b'{"status":{"error":"Must provide an API key or an Authorization bearer token"}}'
            )
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()


def test_a_refused_api_key_names_qdrant_api_key(tmp_path):
    seen: list[str | None] = []
    with (
        refusing_server(seen) as url,
        pytest.raises(
            VectorStoreError, match=r"rejected the API key \(HTTP 401\)\. Fix: set QDRANT_API_KEY"
        ),
    ):
        open_store(url=url, api_key="wrong", root=tmp_path)  # pragma: allowlist secret
    assert seen and seen[0] == "wrong"
    assert not any(tmp_path.iterdir())  # nothing embedded was created instead


def test_settings_open_the_store_they_name_with_the_key_for_the_job(tmp_path, monkeypatch):
    from dagma.settings import Settings

    monkeypatch.delenv("QDRANT_URL", raising=False)
    monkeypatch.setenv("DAGMA_QDRANT_PATH", str(tmp_path / "vectors"))
    monkeypatch.setenv("QDRANT_API_KEY", "writer")  # pragma: allowlist secret
    monkeypatch.setenv("QDRANT_READ_ONLY_API_KEY", "reader")  # pragma: allowlist secret
    with Settings().open_vector_store(keep=2) as store:
        assert isinstance(store, EmbeddedStore) and store.keep == 2
        assert store.root == (tmp_path / "vectors").resolve()
    seen: list[str | None] = []
    with refusing_server(seen) as url:
        monkeypatch.setenv("QDRANT_URL", url)
        for read_only in (False, True):
            with pytest.raises(VectorStoreError, match="rejected the API key"):
                Settings().open_vector_store(read_only=read_only)
    assert seen[0] == "writer" and seen[-1] == "reader"


def test_open_store_without_url_is_embedded(tmp_path):
    with open_store(url=None, api_key=None, root=tmp_path, keep=2) as store:
        assert isinstance(store, EmbeddedStore) and store.keep == 2
    with pytest.raises(ValueError, match="keep"):
        EmbeddedStore(tmp_path, keep=0)


def chunk_payloads(n: int) -> list[dict]:
    return [
        {"source": f"doc{i // 4}", "title": f"Doc {i // 4}", "chunk": i % 4, "text": "é" * (i % 9)}
        for i in range(n)
    ]


def mixed_payloads(n: int) -> list[dict]:
    values = (1, 1.0, 2.5, True, False, "1", "a", None, -3, 0)
    return [
        {
            "a": values[i % len(values)],
            "b": values[(i * 7) % len(values)],
            "nested": {"x": i % 3},
            "tags": [i % 4, "t"],
            **({"sometimes": "yes"} if i % 3 else {}),
        }
        for i in range(n)
    ]


FILTERS = [
    None,
    {"a": 1},
    {"a": 1.0},
    {"a": True},
    {"a": False},
    {"a": "1"},
    {"a": 0},
    {"a": -3.0},
    {"a": 1, "b": 1},
    {"b": "a"},
    {"nested.x": 1},
    {"tags": 2},
    {"tags": "t", "a": "a"},
    {"sometimes": "yes"},
    {"missing": 1},
    {"source": "doc3"},
    {"chunk": 2},
    {"chunk": 2.0},
    {"source": "doc3", "chunk": 1},
    {"text": "éé"},
    {"title": "Doc 9", "chunk": 3},
]


@pytest.mark.parametrize(
    "payloads", [chunk_payloads(400), mixed_payloads(400)], ids=["chunks", "mixed"]
)
def test_payload_columns_give_the_same_hits_as_payloads_in_the_shard(tmp_path, payloads):
    ids, vectors_, _ = corpus(n=len(payloads))
    columns = EmbeddedStore(tmp_path / "columns")
    columns.publish("docs", ids, vectors_, payloads, batch_size=128)
    header = json.loads((tmp_path / "columns" / "docs" / "v0001" / "payload.json").read_text())
    assert {c["key"] for c in header["columns"]} >= {"a", "b"} & set(payloads[0])
    assert header["columns"] and header["ids"] == sorted(ids)  # rows in qdrant's id order
    # Every payload field in the shard, filtered by qdrant.
    shard_only = EmbeddedStore(tmp_path / "shard", payload_columns=False)
    shard_only.publish("docs", ids, vectors_, payloads, batch_size=128)
    header = json.loads((tmp_path / "shard" / "docs" / "v0001" / "payload.json").read_text())
    assert header["columns"] == [] and header["rest_in_shard"]

    rng = np.random.default_rng(3)
    for filter in FILTERS:
        for query in rng.standard_normal((3, DIM)):
            expected = shard_only.search("docs", query, k=8, filter=filter and dict(filter))
            got = columns.search("docs", query, k=8, filter=filter)
            assert [(h.id, h.score, h.payload) for h in got] == [
                (h.id, h.score, h.payload) for h in expected
            ], filter
    unchanged = {"source": "doc3", "chunk": 1}
    columns.search("docs", vectors_[0], filter=unchanged)
    assert unchanged == {"source": "doc3", "chunk": 1}  # the caller's filter is not consumed


def legacy_version(root: Path, ids, vectors_, payloads) -> None:
    """A version as published before row numbers: UUID points with payloads, no payload.json."""
    import qdrant_edge as qe

    from dagma.lib.vectors.embedded import edge_config

    folder = root / "docs" / "v0001"
    shard = qe.EdgeShard.create(str(folder), edge_config(DIM))
    points = [qe.Point(i, v.tolist(), p) for i, v, p in zip(ids, vectors_, payloads, strict=True)]
    shard.update(qe.UpdateOperation.upsert_points(points))
    shard.optimize()
    shard.close()
    qe.EdgeShard.load(str(folder)).close()
    manifest = {"collection": "docs", "version": 1, "name": "v0001", "points": len(ids)}
    (folder / "manifest.json").write_text(json.dumps({**manifest, "dim": DIM, "metadata": {}}))
    (root / "docs" / "CURRENT").write_text("v0001\n")


def test_versions_published_before_row_numbers_still_search_and_filter(tmp_path):
    ids, vectors_, _ = corpus(n=200)
    vectors_ = vectors_[np.arange(200) % 40]  # exact duplicates: ties must rank as they did
    payloads = mixed_payloads(200)
    legacy_version(tmp_path / "old", ids, vectors_, payloads)
    old = EmbeddedStore(tmp_path / "old")
    new = EmbeddedStore(tmp_path / "new")
    new.publish("docs", ids, vectors_, payloads)
    # unfiltered, and filtered on fields that stay in the shard: the same hits, ties included
    for filter in (None, {"nested.x": 1}, {"tags": 2}, {"sometimes": "yes"}):
        for query in np.random.default_rng(4).standard_normal((3, DIM)):
            expected = old.search("docs", query, k=6, filter=filter)
            got = new.search("docs", query, k=6, filter=filter)
            assert [(h.id, h.score, h.payload) for h in got] == [
                (h.id, h.score, h.payload) for h in expected
            ], filter
    old.publish("docs", ids, vectors_, payloads)  # and the next version is a current one
    assert old.current_version("docs").version == 2 and old.count("docs") == 200
    assert old.search("docs", vectors_[9], k=1)[0].id in {ids[j] for j in range(9, 200, 40)}


def test_filtered_ties_rank_by_id_the_same_in_every_process(tmp_path):
    ids, vectors_, _ = corpus(n=200)
    vectors_ = vectors_[np.arange(200) % 40]  # points i and i + 40 tie
    payloads = [{"even": i % 2 == 0, "color": COLORS[i % 3]} for i in range(200)]
    store = EmbeddedStore(tmp_path)
    store.publish("docs", ids, vectors_, payloads)
    unit = vectors_ / np.linalg.norm(vectors_, axis=1, keepdims=True)
    for query in np.random.default_rng(5).standard_normal((4, DIM)):
        scores = unit @ (query / np.linalg.norm(query))
        even = [i for i in range(200) if i % 2 == 0]
        best = sorted(even, key=lambda i: (-round(float(scores[i]), 5), ids[i]))[:7]
        hits = store.search("docs", query, k=7, filter={"even": True})
        assert [h.id for h in hits] == [ids[i] for i in best]


def test_ids_are_checked_and_returned_as_qdrant_spells_them(tmp_path):
    ids, vectors_, payloads = corpus(n=4)
    store = EmbeddedStore(tmp_path)
    spelled = [ids[0].upper(), uuid.UUID(ids[1]), 7, "{" + ids[3] + "}"]
    store.publish("docs", spelled, vectors_, payloads)
    found = {h.id for h in store.search("docs", vectors_[0], k=4)}
    assert found == {ids[0], ids[1], "7", ids[3]}
    for bad in (["not-a-uuid", *ids[1:]], [-1, *ids[1:]], [ids[0].upper(), *ids[:3]]):
        with pytest.raises(ValueError, match=r"is invalid|appears twice"):
            store.publish("docs", bad, vectors_, payloads)
    assert store.current_version("docs").version == 1


def test_payload_columns_keep_key_order_and_refuse_what_qdrant_refuses(tmp_path):
    ids, vectors_, _ = corpus(n=20)
    store = EmbeddedStore(tmp_path)
    payloads = chunk_payloads(20)
    store.publish("docs", ids, vectors_, payloads)
    hit = store.search("docs", vectors_[5], k=1)[0]
    assert list(hit.payload.items()) == list(payloads[5].items())
    for bad in ({"text": "\ud800"}, {"x": float("nan")}):
        broken = [dict(p) for p in payloads]
        broken[11].update(bad)
        with pytest.raises(ValueError, match="is invalid"):
            store.publish("docs", ids, vectors_, broken)
    assert store.current_version("docs").version == 1
    store.publish("docs", ids, vectors_, [{"empty": "", "none": None}] * 20)  # an empty blob
    assert store.search("docs", vectors_[4], k=1)[0].payload == {"empty": "", "none": None}
    # qdrant-edge stores integers beyond 64 bits as floats; outside a column they still are
    store.publish("docs", ids, vectors_, [{"n": 2**64 if i == 3 else i} for i in range(20)])
    assert store.search("docs", vectors_[3], k=1)[0].payload == {"n": float(2**64)}


def test_corrupt_payload_columns_name_the_folder_and_the_fix(tmp_path):
    ids, vectors_, payloads = corpus(n=10)
    store = EmbeddedStore(tmp_path)
    store.publish("docs", ids, vectors_, payloads)
    (tmp_path / "docs" / "v0001" / "payload.json").write_text("{not json")

    with pytest.raises(VectorStoreError, match="looks corrupt") as err:
        store.search("docs", vectors_[0])
    assert str(tmp_path / "docs" / "v0001") in str(err.value)


@pytest.mark.filterwarnings("ignore:Payload indexes have no effect")  # qdrant-client's local engine
@pytest.mark.parametrize(
    "payloads", [chunk_payloads(120), mixed_payloads(120)], ids=["chunks", "mixed"]
)
def test_one_filter_selects_the_same_points_in_every_engine(tmp_path, payloads):
    """The filter translation feeds the shard, the row store and qdrant-client alike."""
    from qdrant_client import QdrantClient

    ids, vectors_, _ = corpus(n=len(payloads))
    stores = [
        EmbeddedStore(tmp_path / "columns"),
        EmbeddedStore(tmp_path / "shard", payload_columns=False),
        ServerStore("local", client=QdrantClient(":memory:")),
    ]
    for store in stores:
        store.publish("docs", ids, vectors_, payloads)
    for filter in FILTERS:
        found = [
            {h.id for h in store.search("docs", vectors_[0], k=len(ids), filter=filter)}
            for store in stores
        ]
        expected = {i for i, p in zip(ids, payloads, strict=True) if matches(p, filter or {})}
        assert found == [expected] * 3, filter


def matches(payload: dict, filter: dict) -> bool:
    """Qdrant's exact match, written out: equal str, bool, int (not bool), or any equal number
    for a float; a dotted key reads a nested field and a list matches any of its items."""

    def one(value, wanted) -> bool:
        if isinstance(value, list):
            return any(one(v, wanted) for v in value)
        if isinstance(wanted, bool) or isinstance(value, bool):
            return type(value) is type(wanted) and value == wanted
        if isinstance(wanted, float):
            return isinstance(value, int | float) and value == wanted
        return type(value) is type(wanted) and value == wanted

    for key, wanted in filter.items():
        value: object = payload
        for part in key.split("."):
            if not isinstance(value, dict) or part not in value:
                return False
            value = value[part]
        if not one(value, wanted):
            return False
    return True
