"""The server backend: collections on a Qdrant server through qdrant-client.

Each publish creates a new collection `<collection>__v<NNNN>` and then moves the alias
`<collection>` to it in one request, so readers never see a half-written version.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from dagma.lib.vectors.contract import (
    CollectionInfo,
    CollectionVersion,
    Hit,
    Progress,
    VectorStore,
    VectorStoreError,
    canonical_ids,
    check_batch,
    check_name,
    check_query,
)
from dagma.lib.vectors.filters import conditions, is_field, server_filter

if TYPE_CHECKING:
    from qdrant_client import QdrantClient

# Longer strings are passages, not filter keys: a keyword index on them would hold every
# passage a second time in the server's RAM.
_KEYWORD_MAX = 256


def _check_payloads(ids: Sequence[str], payloads: Sequence[dict[str, Any]]) -> None:
    """Refuse, before anything is built, a payload the client would fail on or alter.

    Its REST side stores NaN as null and its local engine keeps it; neither takes numpy
    scalars. qdrant-edge refuses all of these, and so does this, naming the point.
    """
    for point, payload in zip(ids, payloads, strict=True):
        try:
            if not isinstance(payload, dict):
                raise TypeError(f"payload is a {type(payload).__name__}, not a dict")
            json.dumps(payload, allow_nan=False, ensure_ascii=False).encode()
        except (TypeError, ValueError) as exc:  # UnicodeEncodeError: lone surrogates
            raise ValueError(
                f"point {point!r} is invalid ({exc}); payloads must be JSON values without NaN"
            ) from exc


def _index_schemas(payloads: Sequence[dict[str, Any]]) -> dict[str, str]:
    """The payload index type of each top-level key whose values share one scalar kind.

    Short strings get `keyword`, bools `bool`, ints `integer`, and numbers with any float
    `float`; a key holding passages, mixed kinds or containers gets none.
    """
    kinds: dict[str, set[str]] = {}
    for payload in payloads:
        for key, value in payload.items():
            kind = type(value)
            if value is None:
                continue
            if kind is str:
                seen = "keyword" if len(value) <= _KEYWORD_MAX else "passage"
            elif kind is bool:
                seen = "bool"
            elif kind is int:
                seen = "integer"
            elif kind is float:
                seen = "float"
            else:
                seen = "other"
            kinds.setdefault(key, set()).add(seen)
    schemas: dict[str, str] = {}
    for key, found in kinds.items():
        if not is_field(key):
            continue  # qdrant would read dots and brackets in it as a path
        if found <= {"integer", "float"}:
            schemas[key] = "float" if "float" in found else "integer"
        elif found in ({"keyword"}, {"bool"}):
            schemas[key] = found.pop()
    return schemas


class ServerStore(VectorStore):
    """Collections on a Qdrant server: versions `<collection>__v<NNNN>` behind an alias.

    Each version gets a payload index on every key a filter can use (see `_index_schemas`):
    servers in strict mode refuse filtered searches on unindexed keys.
    """

    kind = "server"

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        keep: int = 3,
        timeout: int = 10,
        *,
        client: QdrantClient | None = None,
    ) -> None:
        """Connect to the server at `url`; or use `client`, any open QdrantClient (also its
        local engine), which `url` then only names in messages and `close` leaves open."""
        super().__init__(keep)
        self.location = url
        self._owns_client = client is None
        if client is None:
            from qdrant_client import QdrantClient

            client = QdrantClient(
                url=url, api_key=api_key, timeout=timeout, check_compatibility=False
            )
        self._client = client
        with self._errors():
            self._client.get_collections()

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

        try:
            yield
        except UnexpectedResponse as exc:
            if exc.status_code in (401, 403):
                raise VectorStoreError(
                    f"Qdrant at {self.location} rejected the API key (HTTP {exc.status_code}). "
                    "Fix: set QDRANT_API_KEY to a key of that server."
                ) from exc
            raise VectorStoreError(f"Qdrant at {self.location} failed: {exc}") from exc
        except (ResponseHandlingException, OSError) as exc:
            raise VectorStoreError(
                f"cannot reach Qdrant at {self.location} ({exc}). Fix: start the server, correct "
                "QDRANT_URL, or unset QDRANT_URL to use the embedded store."
            ) from exc

    def _published(self, collection: str) -> str:
        """The version `collection`'s alias points at; an error naming the fix if it has none."""
        name = self._alias_target(collection)
        if name is None:
            raise VectorStoreError(
                f"collection {collection!r} has not been published on {self.location}; "
                "run the pipeline that publishes it first"
            )
        return name

    def _alias_target(self, collection: str) -> str | None:
        aliases = self._client.get_aliases().aliases
        return next((a.collection_name for a in aliases if a.alias_name == collection), None)

    def _info(self, collection: str, name: str) -> CollectionVersion:
        from qdrant_client import models

        info = self._client.get_collection(name)
        params = info.config.params.vectors
        dim = params.size if isinstance(params, models.VectorParams) else 0
        return CollectionVersion(
            collection,
            int(name.rsplit("__v", 1)[1]),
            name,
            info.points_count or 0,
            dim,
            dict(info.config.metadata or {}),
        )

    def current_version(self, collection: str) -> CollectionVersion | None:
        check_name(collection)
        with self._errors():
            name = self._alias_target(collection)
            return None if name is None else self._info(collection, name)

    def collections(self) -> list[CollectionInfo]:
        with self._errors():
            aliases = self._client.get_aliases().aliases
            return sorted(
                (
                    self._info(a.alias_name, a.collection_name)
                    for a in aliases
                    if a.collection_name.startswith(f"{a.alias_name}__v")
                ),
                key=lambda c: c.collection,
            )

    def _search(
        self,
        collection: str,
        vector: np.ndarray,
        k: int,
        *,
        filter: dict[str, Any] | None,
    ) -> list[Hit]:
        check_name(collection)
        query = np.asarray(vector, dtype=np.float32).ravel().tolist()
        if k < 1:
            raise ValueError(f"k must be positive, got {k}")
        query_filter = server_filter(conditions(filter))
        with self._errors():
            try:
                points = self._client.query_points(
                    collection,
                    query=query,
                    limit=k,
                    query_filter=query_filter,
                    with_payload=True,
                ).points
            except Exception:
                # Name the usual causes the same way on a server and in the local engine.
                name = self._published(collection)
                check_query(collection, vector, self._info(collection, name).dim, k)
                raise
        return [Hit(str(p.id), p.score, p.payload or {}) for p in points]

    def count(self, collection: str) -> int:
        check_name(collection)
        with self._errors():
            try:
                return self._client.count(collection, exact=True).count
            except Exception:
                self._published(collection)
                raise

    def publish(
        self,
        collection: str,
        ids: Sequence[str],
        vectors: np.ndarray,
        payloads: Sequence[dict[str, Any]],
        *,
        batch_size: int = 256,
        progress: Progress | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> CollectionVersion:
        from qdrant_client import models

        vectors = check_batch(collection, ids, vectors, payloads, batch_size, metadata)
        # Ids as the server returns them (canonical UUID text, or unsigned ints).
        point_ids: list[Any] = [int(p) if p.isdigit() else p for p in canonical_ids(ids)]
        _check_payloads(ids, payloads)
        with self._errors():
            existing = {c.name for c in self._client.get_collections().collections}
            if collection in existing:
                raise VectorStoreError(
                    f"Qdrant at {self.location} has a collection named {collection!r}, so the "
                    f"alias {collection!r} cannot point at its versions. Fix: delete or rename "
                    "that collection, or publish under another name."
                )
            pattern = re.compile(re.escape(collection) + r"__v(\d{4,})")
            versions = sorted(int(m[1]) for n in existing if (m := pattern.fullmatch(n)))
            version = max(versions, default=0) + 1
            name = f"{collection}__v{version:04d}"
            self._client.create_collection(
                name,
                vectors_config=models.VectorParams(
                    size=vectors.shape[1], distance=models.Distance.COSINE
                ),
                metadata=metadata or None,
            )
            try:
                # Before the points, so the server indexes them as they arrive.
                for key, schema in _index_schemas(payloads).items():
                    self._client.create_payload_index(
                        name, key, field_schema=models.PayloadSchemaType(schema), wait=True
                    )
                for start in range(0, len(ids), batch_size):
                    stop = min(start + batch_size, len(ids))
                    batch = models.Batch(
                        ids=point_ids[start:stop],
                        vectors=np.asarray(vectors[start:stop], dtype=np.float32).tolist(),
                        payloads=list(payloads[start:stop]),
                    )
                    self._client.upsert(name, points=batch, wait=True)
                    if progress:
                        progress(stop)
                current = self._alias_target(collection)
                switch: list[Any] = [
                    models.CreateAliasOperation(
                        create_alias=models.CreateAlias(collection_name=name, alias_name=collection)
                    )
                ]
                if current:  # both operations apply atomically in one request
                    switch.insert(
                        0,
                        models.DeleteAliasOperation(
                            delete_alias=models.DeleteAlias(alias_name=collection)
                        ),
                    )
                self._client.update_collection_aliases(switch)
            except BaseException:
                with contextlib.suppress(Exception):
                    self._client.delete_collection(name)
                raise
            for old in versions[: max(0, len(versions) + 1 - self.keep)]:
                with contextlib.suppress(Exception):  # a leftover old version is harmless
                    self._client.delete_collection(f"{collection}__v{old:04d}")
            return self._info(collection, name)

    def close(self) -> None:
        if self._owns_client:
            self._client.close()
