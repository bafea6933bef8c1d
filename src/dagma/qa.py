"""The RAG pipeline wired from settings, for `dagma ask` and the app."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from dagma.lib.vectors import VectorStoreError
from dagma.settings import Settings

if TYPE_CHECKING:
    from dagma.lib.rag import RagPipeline


@contextmanager
def open_pipeline(
    settings: Settings,
    model: Any,
    *,
    k: int = 4,
    source: str | None = None,
    mmr: bool = False,
) -> Iterator[RagPipeline]:
    """A pipeline over the published collection; a missing collection says what to run."""
    from dagma.lib.embeddings import get_embedder
    from dagma.lib.retrieval import make_pipeline, make_search

    collection = settings.dagma_collection
    with settings.open_vector_store() as store:
        if store.current_version(collection) is None:
            raise VectorStoreError(
                f"the collection {collection!r} does not exist yet in {settings.vector_location}; "
                "run `make demo` (or `dagma run doc_vectors`) to build it"
            )
        embedder = get_embedder()
        search = make_search(store, collection, embedder)
        yield make_pipeline(
            search,
            model,
            k=k,
            filter={"source": source} if source else None,
            mmr=mmr,
            embedder=embedder,
        )
