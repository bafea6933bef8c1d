"""Wire the embedder, the vector store and the chat model into one RAG pipeline."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from dagma.lib.embeddings import Embedder

SearchFn = Callable[[str, int], Sequence[Any]]


def make_search(store: Any, collection: str, embedder: Embedder) -> SearchFn:
    """Text query -> the `k` nearest chunks of `collection`."""

    def search(query: str, k: int) -> Sequence[Any]:
        return store.search(collection, embedder.embed([query])[0], k=k)

    return search


def make_pipeline(search: SearchFn, model: Any, k: int = 4) -> Any:
    from dagma.lib.rag import RagPipeline, StoreRetriever

    return RagPipeline(StoreRetriever(search=search, k=k), model)
