"""Versioned vector collections: embedded qdrant-edge by default, a Qdrant server when configured.

The modules, by job: `contract` (the `VectorStore` API, its types and argument checks), `filters`
(the one translation of a search filter), `embedded` (the qdrant-edge engine: versions, the
CURRENT pointer, the writer lock), `rows` (the embedded engine's row store of ids and payloads)
and `server` (the qdrant-client backend). `open_store` picks one of the two engines.
"""

from __future__ import annotations

from pathlib import Path

from dagma.lib.vectors.contract import (
    CollectionInfo,
    CollectionVersion,
    Hit,
    Progress,
    VectorStore,
    VectorStoreError,
    ids_digest,
    point_id,
)
from dagma.lib.vectors.embedded import EmbeddedStore
from dagma.lib.vectors.server import ServerStore

__all__ = [
    "CollectionInfo",
    "CollectionVersion",
    "EmbeddedStore",
    "Hit",
    "Progress",
    "ServerStore",
    "VectorStore",
    "VectorStoreError",
    "ids_digest",
    "open_store",
    "point_id",
]


def open_store(*, url: str | None, api_key: str | None, root: Path, keep: int = 3) -> VectorStore:
    """The Qdrant server at `url` (with `api_key`, if any) when given, else the embedded store
    under `root`. The one place that chooses between the two."""
    if url:
        return ServerStore(url, api_key=api_key, keep=keep)
    return EmbeddedStore(root, keep=keep)
