"""Wire the embedder, the vector store and the chat model into one RAG pipeline."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from dagma.lib.embeddings import Embedder

if TYPE_CHECKING:
    from langchain_core.language_models import BaseChatModel

    from dagma.lib.rag import RagPipeline


class SearchFn(Protocol):
    """Text query -> the ``k`` nearest hits whose payload matches every ``filter`` item."""

    def __call__(
        self, query: str, k: int, filter: dict[str, Any] | None = None
    ) -> Sequence[Any]: ...


def make_search(store: Any, collection: str, embedder: Embedder) -> SearchFn:
    """Search function over `collection` of `store`, embedding queries with `embedder`."""

    def search(query: str, k: int, filter: dict[str, Any] | None = None) -> Sequence[Any]:
        return store.search(collection, embedder.embed([query])[0], k=k, filter=filter)

    return search


def make_pipeline(
    search: SearchFn,
    model: BaseChatModel,
    k: int = 4,
    *,
    filter: dict[str, Any] | None = None,
    mmr: bool = False,
    fetch_k: int = 20,
    lambda_mult: float = 0.5,
    embedder: Embedder | None = None,
    structured_method: str | None = "auto",
) -> RagPipeline:
    """RAG pipeline retrieving `k` passages, optionally payload-`filter`ed and MMR-diversified.

    MMR picks `k` of `fetch_k` candidates and needs the `embedder`.
    """
    from dagma.lib.rag import RagPipeline, StoreRetriever

    retriever = StoreRetriever(
        search=search,
        k=k,
        filter=filter,
        mmr=mmr,
        fetch_k=fetch_k,
        lambda_mult=lambda_mult,
        embedder=embedder,
    )
    return RagPipeline(retriever, model, structured_method=structured_method)
