"""Vector search over the current version of the lab's collection, for `GET /v1/search` and ask.

The store is opened once, read-only, and every search reads the collection's current version,
so a newly published version is searched without a restart.
"""

from __future__ import annotations

import threading
from typing import Any

from langchain_core.documents import Document
from pydantic import BaseModel

from dagma.api.errors import ApiError, unavailable
from dagma.lib.embeddings import Embedder
from dagma.settings import Settings

BUILD = "Build it: `dagma run doc_vectors` (or `make demo`)."


class SearchHit(BaseModel):
    """One retrieved chunk: its rank, similarity, source, title, text and the rest of its payload."""

    rank: int
    id: str
    score: float
    source: str
    title: str
    text: str
    payload: dict[str, Any]


class SearchResult(BaseModel):
    """The hits of one search, and the collection version they came from."""

    collection: str
    version: int
    query: str
    mmr: bool
    hits: list[SearchHit]


class Collection:
    """The lab's vector store (opened lazily, read-only) and its embedder."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.name = settings.dagma_collection
        self._store: Any = None
        self._embedder: Embedder | None = None
        self._guard = threading.Lock()

    @property
    def where(self) -> str:
        return self.settings.vector_location

    def _fix(self) -> str:
        if self.settings.qdrant_url:
            return (
                f"Start the Qdrant server at QDRANT_URL={self.settings.qdrant_url} "
                "(`dagma services up`), or unset QDRANT_URL for the embedded store."
            )
        return f"Check DAGMA_QDRANT_PATH (now {self.settings.qdrant_path}). {BUILD}"

    def store(self) -> Any:
        with self._guard:
            if self._store is None:
                if not self.settings.qdrant_url and not self.settings.qdrant_path.is_dir():
                    raise ApiError(
                        503, f"no vector store at {self.settings.qdrant_path} yet", BUILD
                    )
                try:
                    self._store = self.settings.open_vector_store(read_only=True)
                except Exception as exc:
                    raise unavailable("the vector store", exc, self._fix()) from exc
            return self._store

    def embedder(self) -> Embedder:
        with self._guard:
            if self._embedder is None:
                from dagma.lib.embeddings import get_embedder

                self._embedder = get_embedder()
            return self._embedder

    def version(self) -> Any:
        """The current `CollectionVersion`; 503 when there is none or the store does not answer."""
        store = self.store()
        try:
            current = store.current_version(self.name)
        except Exception as exc:
            raise unavailable(f"collection {self.name!r}", exc, self._fix()) from exc
        if current is None:
            raise ApiError(
                503,
                f"the collection {self.name!r} does not exist yet in {self.where}",
                BUILD,
                headers={"Retry-After": "30"},
            )
        return current

    def search_fn(self) -> Any:
        from dagma.lib.retrieval import make_search

        return make_search(self.store(), self.name, self.embedder())

    def retriever(self, k: int, source: str | None, mmr: bool) -> Any:
        from dagma.lib.rag import StoreRetriever

        return StoreRetriever(
            search=self.search_fn(),
            k=k,
            filter={"source": source} if source else None,
            mmr=mmr,
            fetch_k=max(20, 2 * k),
            embedder=self.embedder(),
        )

    def search(self, query: str, k: int, source: str | None, mmr: bool) -> SearchResult:
        version = self.version()
        try:
            docs = self.retriever(k, source, mmr).invoke(query)
        except ApiError:
            raise
        except Exception as exc:
            if self.settings.qdrant_url:
                raise unavailable(f"collection {self.name!r}", exc, self._fix()) from exc
            raise
        return SearchResult(
            collection=self.name,
            version=int(version.version),
            query=query,
            mmr=mmr,
            hits=[_hit(rank, doc) for rank, doc in enumerate(docs, start=1)],
        )

    def close(self) -> None:
        with self._guard:
            if self._store is not None:
                self._store.close()
                self._store = None


def _hit(rank: int, doc: Document) -> SearchHit:
    meta = dict(doc.metadata)
    return SearchHit(
        rank=rank,
        id=str(meta.pop("id", "")),
        score=float(meta.pop("score", 0.0)),
        source=str(meta.get("source", "")),
        title=str(meta.get("title") or ""),
        text=doc.page_content,
        payload={key: value for key, value in meta.items() if key != "text"},
    )
