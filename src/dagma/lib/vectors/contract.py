"""What every vector store promises: its API, its types and the checks both engines apply."""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

import numpy as np

from dagma.errors import DagmaError
from dagma.lib.telemetry.timing import timed

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_NAMESPACE = uuid.UUID("6f1c3a52-4d0e-5b8a-9c7e-2f4b8d1e0a93")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
Progress = Callable[[int], None]


@dataclass(frozen=True)
class Hit:
    id: str
    score: float
    payload: dict[str, Any]


@dataclass(frozen=True)
class CollectionVersion:
    collection: str
    version: int
    name: str  # embedded: version folder; server: physical collection
    points: int
    dim: int
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)


CollectionInfo = CollectionVersion


class VectorStoreError(DagmaError, RuntimeError):
    """The store cannot do what was asked; the message names the thing and the fix."""

    exit_code = 2


def point_id(*parts: str) -> str:
    """Deterministic point id (uuid5 over the parts), so re-publishing never duplicates."""
    return str(uuid.uuid5(_NAMESPACE, "\x1f".join(parts)))


def ids_digest(ids: Sequence[str]) -> str:
    """Short fingerprint of a set of point ids: equal digests mean the same points."""
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:16]


class VectorStore(ABC):
    """Named collections of cosine vectors, each published as a whole new version."""

    kind: str
    location: str

    def __init__(self, keep: int) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1 (the current version), got {keep}")
        self.keep = keep

    @abstractmethod
    def publish(
        self,
        collection: str,
        ids: Sequence[str],
        vectors: np.ndarray,
        payloads: Sequence[dict[str, Any]],
        *,
        batch_size: int = 2048,
        progress: Progress | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> CollectionVersion:
        """Build a new version of `collection` from scratch and make it current.

        `progress` gets the number of points written so far after each batch. A publish that
        raises leaves the previous version current and removes what it built.
        """

    def search(
        self,
        collection: str,
        vector: np.ndarray,
        k: int = 5,
        *,
        filter: dict[str, Any] | None = None,
    ) -> list[Hit]:
        """The `k` nearest points, optionally only those whose payload matches every `filter` item."""
        attributes = {"dagma.collection": collection, "dagma.k": k}
        metric = "dagma_vector_search_duration_seconds"
        with timed("vectors.search", metric, attributes, backend=self.kind):
            return self._search(collection, vector, k, filter=filter)

    @abstractmethod
    def _search(
        self,
        collection: str,
        vector: np.ndarray,
        k: int,
        *,
        filter: dict[str, Any] | None,
    ) -> list[Hit]: ...

    @abstractmethod
    def count(self, collection: str) -> int: ...

    @abstractmethod
    def current_version(self, collection: str) -> CollectionVersion | None: ...

    @abstractmethod
    def collections(self) -> list[CollectionInfo]: ...

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_name(collection: str) -> str:
    """`collection`, or a ValueError when it cannot name a collection."""
    if not NAME.fullmatch(collection) or re.search(r"__v\d+$", collection):
        raise ValueError(
            f"collection name {collection!r} is invalid: use 1-64 letters, digits, '_' or '-', "
            "not ending in '__v<digits>'"
        )
    return collection


def check_batch(
    collection: str,
    ids: Sequence[str],
    vectors: np.ndarray,
    payloads: Sequence[dict[str, Any]],
    batch_size: int,
    metadata: dict[str, Any] | None,
) -> np.ndarray:
    """The vectors of a publish as an array, once its arguments are known to be usable."""
    check_name(collection)
    if len(ids) == 0:
        raise ValueError(
            f"{collection!r}: nothing to publish (0 points), so the current version stays. "
            "The corpus or its chunking produced no text: check the documents it reads."
        )
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or vectors.shape[1] == 0:
        raise ValueError(
            f"vectors for {collection!r} must be a 2-D (points, dim) array, got shape {vectors.shape}"
        )
    if not len(ids) == len(vectors) == len(payloads):
        raise ValueError(
            f"{collection!r}: {len(ids)} ids, {len(vectors)} vectors and {len(payloads)} payloads; "
            "pass one of each per point"
        )
    if len(set(ids)) != len(ids):
        dup = next(i for i, n in Counter(ids).items() if n > 1)
        raise ValueError(f"{collection!r}: id {dup!r} appears twice; derive ids with point_id()")
    if not np.isfinite(vectors).all():
        raise ValueError(
            f"{collection!r}: vectors contain NaN or infinity; fix the embedder output"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    json.dumps(metadata or {})  # fail before building, not after
    return vectors


def check_query(collection: str, vector: np.ndarray, dim: int, k: int) -> list[float]:
    """The query vector as floats, once it fits a collection of `dim` and `k` is positive."""
    query = np.asarray(vector, dtype=np.float64).ravel()
    if query.shape[0] != dim:
        raise ValueError(
            f"query vector has dim {query.shape[0]} but {collection!r} holds dim {dim}; "
            "embed the query with the model that built the collection"
        )
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    return query.tolist()


def _canonical_id(point: Any) -> str:
    """The id as a search returns it: a UUID's canonical text (or an unsigned int's digits)."""
    if isinstance(point, int) and not isinstance(point, bool) and 0 <= point < 2**64:
        return str(point)
    try:
        return str(point if isinstance(point, uuid.UUID) else uuid.UUID(point))
    except (TypeError, ValueError, AttributeError) as exc:
        raise ValueError(
            f"point {point!r} is invalid (not a UUID); ids must be UUID strings from point_id()"
        ) from exc


def canonical_ids(ids: Sequence[Any]) -> list[str]:
    """The ids as a search returns them; a ValueError names one that is no UUID or repeats."""
    out = [p if type(p) is str and _UUID.fullmatch(p) else _canonical_id(p) for p in ids]
    if len(set(out)) != len(out):  # two spellings of one UUID
        dup = next(i for i, n in Counter(out).items() if n > 1)
        raise ValueError(f"id {dup!r} appears twice; derive ids with point_id()")
    return out
