"""ServerStore over qdrant-client's local engine, and over CI's Qdrant server when named.

The local engine implements the client API the store uses (collections, aliases, query_points,
count, create_payload_index) in-process, so these run in `make test` with no server. With
DAGMA_TEST_QDRANT_URL set (CI's Qdrant service) every test also runs against that server.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from qdrant_client import QdrantClient, models

from dagma.lib.vectors import CollectionVersion, ServerStore, VectorStoreError, point_id

SERVER_URL = os.environ.get("DAGMA_TEST_QDRANT_URL")
DIM = 16
COLORS = ("red", "green", "blue")

pytestmark = pytest.mark.filterwarnings(
    "ignore:Payload indexes have no effect in the local Qdrant:UserWarning"
)


def corpus(n: int = 300, gen: int = 1, seed: int = 0, prefix: str = "doc"):
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, DIM)).astype(np.float32)
    ids = [point_id(prefix, str(i)) for i in range(n)]
    payloads = [
        {"i": i, "gen": gen, "color": COLORS[i % 3], "even": i % 2 == 0, "half": i / 2}
        for i in range(n)
    ]
    return ids, vectors, payloads


class LocalEngine(QdrantClient):
    """The in-process engine, recording the payload indexes asked of it: it accepts them but
    reports none (its `payload_schema` is always empty)."""

    def __init__(self) -> None:
        super().__init__(location=":memory:")
        self.indexes: dict[str, dict[str, Any]] = {}

    def create_payload_index(
        self, collection_name: str, field_name: str, field_schema: Any = None, **kwargs: Any
    ) -> Any:
        result = super().create_payload_index(
            collection_name, field_name, field_schema=field_schema, **kwargs
        )
        self.indexes.setdefault(collection_name, {})[field_name] = field_schema
        return result


@dataclass
class Backend:
    client: QdrantClient
    name: str  # this test's collection; unique, so tests can share a server
    url: str | None  # None: the local engine

    def open(self, keep: int = 3) -> ServerStore:
        if self.url:
            return ServerStore(self.url, keep=keep)
        return ServerStore("qdrant-client :memory:", keep=keep, client=self.client)

    def versions(self) -> list[str]:
        names = (c.name for c in self.client.get_collections().collections)
        return sorted(n for n in names if n == self.name or n.startswith(f"{self.name}__v"))

    def alias(self) -> str | None:
        aliases = self.client.get_aliases().aliases
        return next((a.collection_name for a in aliases if a.alias_name == self.name), None)

    def indexes(self, physical: str) -> dict[str, str]:
        """The payload index types of one version: the server reports them; the local
        engine's calls are recorded (it reports none)."""
        assert physical in self.versions()
        if isinstance(self.client, LocalEngine):
            assert self.client.get_collection(physical).payload_schema == {}
            return {k: str(v.value) for k, v in self.client.indexes.get(physical, {}).items()}
        schema = self.client.get_collection(physical).payload_schema
        return {k: str(getattr(v.data_type, "value", v.data_type)) for k, v in schema.items()}


@pytest.fixture(
    params=[
        "local",
        pytest.param(
            "server",
            marks=[
                pytest.mark.integration,
                pytest.mark.skipif(not SERVER_URL, reason="needs DAGMA_TEST_QDRANT_URL (CI)"),
            ],
        ),
    ]
)
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    name = f"t{uuid.uuid4().hex[:12]}"
    if request.param == "local":
        client: QdrantClient = LocalEngine()
        url = None
    else:
        assert SERVER_URL
        client, url = QdrantClient(url=SERVER_URL, check_compatibility=False), SERVER_URL
    backend = Backend(client, name, url)
    try:
        yield backend
    finally:
        for physical in backend.versions():
            client.delete_collection(physical)
        client.close()


def test_publish_creates_the_first_version_behind_an_alias(backend):
    ids, vectors, payloads = corpus()
    name = backend.name
    with backend.open() as store:
        seen: list[int] = []
        version = store.publish(
            name, ids, vectors, payloads, batch_size=64, progress=seen.append, metadata={"m": 2}
        )
        hits = store.search(name, vectors[42] + 0.01, k=3)

        assert version == CollectionVersion(name, 1, f"{name}__v0001", 300, DIM)
        assert version.metadata == {"m": 2}
        assert seen == [64, 128, 192, 256, 300]
        assert backend.versions() == [f"{name}__v0001"]
        assert backend.alias() == f"{name}__v0001"
        assert hits[0].id == ids[42] and hits[0].payload == payloads[42]
        assert hits[0].score == pytest.approx(1.0, abs=1e-3)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        assert store.count(name) == 300
        assert store.current_version(name) == version
        assert store.current_version(name).metadata == {"m": 2}
        assert [c for c in store.collections() if c.collection == name] == [version]
        assert store.kind == "server"


def test_a_second_publish_moves_the_alias_and_searches_see_only_the_new_points(backend):
    name = backend.name
    store = backend.open()
    ids, vectors, payloads = corpus()
    store.publish(name, ids, vectors, payloads)
    new_ids, new_vectors, new_payloads = corpus(n=120, gen=2, seed=1, prefix="new")
    during: list[int] = []

    def search_meanwhile(_: int) -> None:
        during.extend(h.payload["gen"] for h in store.search(name, new_vectors[0], k=5))

    second = store.publish(
        name, new_ids, new_vectors, new_payloads, batch_size=50, progress=search_meanwhile
    )
    hits = store.search(name, vectors[3], k=20)

    assert during and set(during) == {1}  # the old version served every search while building
    assert second == CollectionVersion(name, 2, f"{name}__v0002", 120, DIM)
    assert backend.alias() == f"{name}__v0002"
    assert backend.versions() == [f"{name}__v0001", f"{name}__v0002"]
    assert len(hits) == 20 and {h.id for h in hits} <= set(new_ids)
    assert {h.payload["gen"] for h in hits} == {2}
    assert store.count(name) == 120
    assert store.current_version(name).version == 2


def test_old_versions_are_pruned_to_keep(backend):
    ids, vectors, payloads = corpus(n=50)
    store = backend.open(keep=2)
    for _ in range(4):
        store.publish(backend.name, ids, vectors, payloads)

    assert backend.versions() == [f"{backend.name}__v0003", f"{backend.name}__v0004"]
    assert store.current_version(backend.name).version == 4
    assert backend.alias() == f"{backend.name}__v0004"


def test_filter_keeps_only_exact_payload_matches(backend):
    ids, vectors, payloads = corpus()
    store = backend.open()
    store.publish(backend.name, ids, vectors, payloads)

    def search(**filter):
        return [h.payload for h in store.search(backend.name, vectors[0], k=20, filter=filter)]

    assert len(search()) == 20
    assert {p["color"] for p in search(color="green")} == {"green"}
    assert len(search(color="green")) == 20
    assert {p["even"] for p in search(even=False)} == {False}
    assert [p["i"] for p in search(i=7)] == [7]
    assert [p["half"] for p in search(half=3.5)] == [3.5]
    assert {(p["color"], p["even"]) for p in search(color="red", even=True)} == {("red", True)}
    assert search(color="purple") == []
    with pytest.raises(ValueError, match="only str, int, float or bool"):
        search(color=["red"])


def test_each_version_gets_a_payload_index_per_filterable_key(backend):
    n = 40
    ids, vectors, _ = corpus(n=n)
    payloads = [
        {
            "source": f"doc{i // 4}.md",
            "title": f"Doc {i // 4}",
            "chunk": i % 4,
            "text": "x" * 300,  # a passage: no index
            "score": i / 3,
            "weight": i if i % 2 else i + 0.5,  # ints and floats: a float index
            "even": i % 2 == 0,
            "kind": "a" if i % 2 else 1,  # mixed: no index
            "tags": ["t"],
            "nested": {"x": i},
            "sometimes": None if i % 2 else "yes",
        }
        for i in range(n)
    ]
    store = backend.open()
    first = store.publish(backend.name, ids, vectors, payloads)
    second = store.publish(backend.name, ids, vectors, payloads)

    expected = {
        "source": "keyword",
        "title": "keyword",
        "chunk": "integer",
        "score": "float",
        "weight": "float",
        "even": "bool",
        "sometimes": "keyword",
    }
    assert backend.indexes(first.name) == expected
    assert backend.indexes(second.name) == expected
    hits = store.search(backend.name, vectors[9], k=3, filter={"source": "doc2.md", "chunk": 1})
    assert [(h.id, h.payload["title"]) for h in hits] == [(ids[9], "Doc 2")]


# CI's server runs without strict mode; this version turns it on, as a production server might.
@pytest.mark.integration
@pytest.mark.skipif(not SERVER_URL, reason="needs DAGMA_TEST_QDRANT_URL (CI)")
@pytest.mark.parametrize("backend", ["server"], indirect=True)
def test_a_strict_server_serves_filters_on_every_indexed_key(backend):
    ids, vectors, payloads = corpus()
    payloads = [{**p, "text": "x" * 300} for p in payloads]
    store = backend.open()
    version = store.publish(backend.name, ids, vectors, payloads)
    backend.client.update_collection(
        version.name,
        strict_mode_config=models.StrictModeConfig(
            enabled=True, unindexed_filtering_retrieve=False
        ),
    )

    for filter in ({"color": "red"}, {"i": 7}, {"half": 3.5}, {"even": True}, {"gen": 1}):
        assert store.search(backend.name, vectors[0], k=3, filter=filter), filter
    with pytest.raises(VectorStoreError, match=r"(?s)400.*text"):  # passages get no index
        store.search(backend.name, vectors[0], k=3, filter={"text": "x" * 300})


def test_a_publish_failing_mid_way_keeps_the_alias_and_deletes_what_it_built(backend):
    name = backend.name
    store = backend.open()
    ids, vectors, payloads = corpus()
    store.publish(name, ids, vectors, payloads)
    written: list[int] = []

    def progress(n: int) -> None:
        written.append(n)
        assert backend.versions() == [f"{name}__v0001", f"{name}__v0002"]
        if n > 64:
            raise RuntimeError("callback failed")

    _, vectors2, payloads2 = corpus(gen=2, seed=1)
    with pytest.raises(RuntimeError, match="callback failed"):
        store.publish(name, ids, vectors2, payloads2, batch_size=64, progress=progress)

    assert written == [64, 128]  # two batches were in the new version when it failed
    assert backend.versions() == [f"{name}__v0001"]
    assert backend.alias() == f"{name}__v0001"
    assert store.current_version(name).version == 1
    assert store.search(name, vectors[3], k=1)[0].payload == payloads[3]
    assert store.publish(name, ids, vectors2, payloads2).version == 2  # the name was freed


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (math.nan, "Out of range float"),
        (np.float32(0.5), "float32 is not JSON serializable"),
        (object(), "object is not JSON serializable"),
        ("\ud800", "surrogates not allowed"),
    ],
    ids=["nan", "numpy-scalar", "object", "lone-surrogate"],
)
def test_a_payload_the_server_cannot_take_is_refused_before_anything_is_built(
    backend, value, reason
):
    name = backend.name
    store = backend.open()
    ids, vectors, payloads = corpus()
    store.publish(name, ids, vectors, payloads)
    _, _, payloads2 = corpus(gen=2)
    payloads2[250] = {**payloads2[250], "bad": value}

    with pytest.raises(ValueError, match=f"point '{ids[250]}' is invalid") as err:
        store.publish(name, ids, vectors, payloads2, batch_size=64)

    assert reason in str(err.value) and "JSON values without NaN" in str(err.value)
    assert backend.versions() == [f"{name}__v0001"]
    assert store.search(name, vectors[250], k=1)[0].payload == payloads[250]


def test_ids_are_checked_first_and_come_back_canonical(backend):
    name = backend.name
    store = backend.open()
    _, vectors, payloads = corpus(n=3)
    with pytest.raises(ValueError, match=r"'nope' is invalid \(not a UUID\)"):
        store.publish(name, [point_id("a"), "nope", point_id("c")], vectors, payloads)
    assert backend.versions() == []

    upper = point_id("a").upper()
    store.publish(name, [upper, 7, point_id("c")], vectors, payloads)
    assert store.search(name, vectors[0], k=1)[0].id == upper.lower()
    assert store.search(name, vectors[1], k=1)[0].id == "7"


def test_an_unpublished_collection_and_a_wrong_query_dim_name_the_fix(backend):
    name = backend.name
    store = backend.open()
    fix = rf"collection '{name}' has not been published on .*run the pipeline that publishes"
    with pytest.raises(VectorStoreError, match=fix):
        store.search(name, np.ones(DIM))
    with pytest.raises(VectorStoreError, match=fix):
        store.count(name)
    assert store.current_version(name) is None
    assert [c for c in store.collections() if c.collection == name] == []

    ids, vectors, payloads = corpus(n=10)
    store.publish(name, ids, vectors, payloads)
    with pytest.raises(ValueError, match=f"dim 3 but '{name}' holds dim 16; embed the query"):
        store.search(name, np.ones(3))


def test_a_plain_collection_under_the_alias_name_is_refused_before_building(backend):
    name = backend.name
    backend.client.create_collection(
        name, vectors_config=models.VectorParams(size=DIM, distance=models.Distance.COSINE)
    )
    ids, vectors, payloads = corpus(n=10)
    with pytest.raises(VectorStoreError, match=f"collection named '{name}'.*delete or rename"):
        backend.open().publish(name, ids, vectors, payloads)
    assert backend.versions() == [name]


def test_closing_a_store_leaves_a_client_it_was_given_open():
    client = QdrantClient(location=":memory:")
    with ServerStore("local", client=client) as store:
        store.publish("docs", *corpus(n=5))
    assert [c.name for c in client.get_collections().collections] == ["docs__v0001"]
    client.close()
    with pytest.raises(RuntimeError, match="closed"):
        client.get_collections()
