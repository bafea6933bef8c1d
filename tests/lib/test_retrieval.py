from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from langchain_core.language_models import FakeListChatModel

from dagma.lib.embeddings import Embedder, get_embedder
from dagma.lib.rag import StoreRetriever
from dagma.lib.retrieval import make_pipeline, make_search
from dagma.lib.vectors import EmbeddedStore, point_id

CATCH = "The try statement catches an exception raised in its suite with an except clause."
PASSAGES: list[tuple[str, str]] = [
    ("pydoc:try", CATCH),
    ("pydoc:compound", CATCH),  # the same text published twice, as in the real docs
    ("pydoc:errors", CATCH.replace("The try", "A try")),
    ("pydoc:try", "A finally clause always runs clean-up code, raised exception or not."),
    ("pydoc:break", "break terminates the nearest enclosing loop."),
    ("pydoc:lambda", "Lambda expressions create anonymous functions."),
]
QUERY = "How do I catch an exception with try?"


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return get_embedder()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, embedder: Embedder) -> Iterator[Any]:
    root: Path = tmp_path_factory.mktemp("store")
    with EmbeddedStore(root) as store:
        texts = [text for _, text in PASSAGES]
        store.publish(
            "docs",
            [point_id("doc", str(i)) for i in range(len(PASSAGES))],
            embedder.embed(texts),
            [
                {"source": source, "title": source.split(":")[1], "chunk": i, "text": text}
                for i, (source, text) in enumerate(PASSAGES)
            ],
        )
        yield store


def test_make_search_passes_the_filter_to_the_store(store: Any, embedder: Embedder) -> None:
    search = make_search(store, "docs", embedder)
    assert len(search(QUERY, 6)) == 6
    hits = search(QUERY, 6, filter={"source": "pydoc:try"})
    assert [h.payload["source"] for h in hits] == ["pydoc:try", "pydoc:try"]
    assert search(QUERY, 3, filter={"source": "pydoc:none"}) == []


def test_pipeline_filter_restricts_sources(store: Any, embedder: Embedder) -> None:
    search = make_search(store, "docs", embedder)
    pipeline = make_pipeline(
        search, FakeListChatModel(responses=["x"]), k=4, filter={"source": "pydoc:break"}
    )
    docs = pipeline.retrieve(QUERY)
    assert [d.metadata["source"] for d in docs] == ["pydoc:break"]
    assert pipeline.structured_method is None


def test_mmr_returns_diverse_passages(store: Any, embedder: Embedder) -> None:
    search = make_search(store, "docs", embedder)
    model = FakeListChatModel(responses=["x"])
    plain = make_pipeline(search, model, k=3).retrieve(QUERY)
    mmr = make_pipeline(search, model, k=3, mmr=True, embedder=embedder).retrieve(QUERY)
    plain_texts = [d.page_content for d in plain]
    mmr_texts = [d.page_content for d in mmr]
    assert plain_texts.count(CATCH) == 2  # top-k repeats the duplicated passage
    assert len(mmr) == 3 and len(set(mmr_texts)) == 3
    assert mmr[0].metadata["id"] == plain[0].metadata["id"]  # the best hit stays first
    assert mmr_texts != plain_texts
    balanced = make_pipeline(search, model, k=3, mmr=True, lambda_mult=0.7, embedder=embedder)
    assert PASSAGES[3][1] in [d.page_content for d in balanced.retrieve(QUERY)[:2]]
    only_try = make_pipeline(
        search, model, k=3, mmr=True, embedder=embedder, filter={"source": "pydoc:try"}
    ).retrieve(QUERY)
    assert {d.metadata["source"] for d in only_try} == {"pydoc:try"} and len(only_try) == 2


# --- StoreRetriever on crafted vectors ----------------------------------------------------------


@dataclass(frozen=True)
class FakeHit:
    id: str
    score: float
    payload: dict[str, Any]


class TableEmbedder:
    """Embeds known texts to fixed vectors."""

    name = "table"
    dim = 2

    def __init__(self, table: dict[str, Sequence[float]]) -> None:
        self.table = table

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return np.array([self.table[t] for t in texts], dtype=np.float32)


TABLE = {"q": (1.0, 0.0), "a": (1.0, 0.3), "a2": (1.0, 0.31), "b": (1.0, -0.5), "c": (0.0, 1.0)}


def table_search(query: str, k: int, filter: dict[str, Any] | None = None) -> list[FakeHit]:
    q = np.array(TABLE[query])
    hits = [
        FakeHit(t, float(np.dot(q, v) / np.linalg.norm(v)), {"text": t, "source": f"s:{t}"})
        for t, v in ((t, np.array(v)) for t, v in TABLE.items() if t != "q")
        if not filter or filter.get("source") == f"s:{t}"
    ]
    return sorted(hits, key=lambda h: -h.score)[:k]


def test_mmr_on_crafted_vectors() -> None:
    emb = TableEmbedder(TABLE)
    plain = StoreRetriever(search=table_search, k=2).invoke("q")
    assert [d.page_content for d in plain] == ["a", "a2"]
    mmr = StoreRetriever(search=table_search, k=2, mmr=True, embedder=emb).invoke("q")
    assert [d.page_content for d in mmr] == ["a", "b"]
    relevance_only = StoreRetriever(
        search=table_search, k=2, mmr=True, lambda_mult=1.0, embedder=emb
    ).invoke("q")
    assert [d.page_content for d in relevance_only] == ["a", "a2"]
    few = StoreRetriever(search=table_search, k=2, mmr=True, fetch_k=2, embedder=emb).invoke("q")
    assert [d.page_content for d in few] == ["a", "a2"]  # nothing to choose from
    assert [d.metadata["score"] for d in mmr] == [
        plain[0].metadata["score"],
        pytest.approx(0.894, abs=1e-3),
    ]


def test_retriever_filter_and_two_argument_search() -> None:
    docs = StoreRetriever(search=table_search, k=3, filter={"source": "s:c"}).invoke("q")
    assert [d.page_content for d in docs] == ["c"]
    calls: list[tuple[Any, ...]] = []

    def search(query: str, k: int) -> list[FakeHit]:  # no filter parameter: still usable
        calls.append((query, k))
        return table_search(query, k)

    assert len(StoreRetriever(search=search, k=2).invoke("q")) == 2
    assert calls == [("q", 2)]


def test_mmr_needs_an_embedder() -> None:
    with pytest.raises(ValueError, match="mmr=True needs an embedder"):
        StoreRetriever(search=table_search, mmr=True)
    with pytest.raises(ValueError, match="mmr=True needs an embedder"):
        make_pipeline(table_search, FakeListChatModel(responses=["x"]), mmr=True)
