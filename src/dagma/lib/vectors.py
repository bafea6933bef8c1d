"""Versioned vector collections: embedded qdrant-edge by default, a Qdrant server when configured.

Every publish builds a new immutable version and then atomically points the collection at it.
Embedded versions are built with qdrant-edge's WAL off and closed before CURRENT moves: without a
WAL the engine takes no folder lock, and loading a finished version only rewrites identical
metadata via temp file + rename, so reader processes open CURRENT directly while a writer builds.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Self

import numpy as np

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_VERSION = re.compile(r"v(\d{4,})")
_NAMESPACE = uuid.UUID("6f1c3a52-4d0e-5b8a-9c7e-2f4b8d1e0a93")
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


class VectorStoreError(RuntimeError):
    """The store cannot do what was asked; the message names the thing and the fix."""


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

    @abstractmethod
    def search(
        self,
        collection: str,
        vector: np.ndarray,
        k: int = 5,
        *,
        filter: dict[str, Any] | None = None,
    ) -> list[Hit]:
        """The `k` nearest points, optionally only those whose payload matches every `filter` item."""

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


def open_store(*, url: str | None, api_key: str | None, root: Path, keep: int = 3) -> VectorStore:
    """The Qdrant server at `url` when given, else the embedded store under `root`."""
    if url:
        return ServerStore(url, api_key=api_key, keep=keep)
    return EmbeddedStore(root, keep=keep)


def _check_name(collection: str) -> str:
    if not _NAME.fullmatch(collection) or re.search(r"__v\d+$", collection):
        raise ValueError(
            f"collection name {collection!r} is invalid: use 1-64 letters, digits, '_' or '-', "
            "not ending in '__v<digits>'"
        )
    return collection


def _check_batch(
    collection: str,
    ids: Sequence[str],
    vectors: np.ndarray,
    payloads: Sequence[dict[str, Any]],
    batch_size: int,
    metadata: dict[str, Any] | None,
) -> np.ndarray:
    _check_name(collection)
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


def _check_query(collection: str, vector: np.ndarray, dim: int, k: int) -> list[float]:
    query = np.asarray(vector, dtype=np.float64).ravel()
    if query.shape[0] != dim:
        raise ValueError(
            f"query vector has dim {query.shape[0]} but {collection!r} holds dim {dim}; "
            "embed the query with the model that built the collection"
        )
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    return query.tolist()


def _check_filter(filter: dict[str, Any] | None) -> dict[str, Any]:
    for key, value in (filter or {}).items():
        if not isinstance(value, str | int | float):
            raise ValueError(
                f"filter {key}={value!r}: only str, int, float or bool values match exactly"
            )
    return filter or {}


# --------------------------------------------------------------------------- embedded (qdrant-edge)


@dataclass
class _Open:
    name: str
    shard: Any  # qdrant_edge.EdgeShard
    info: CollectionVersion


# Versions are immutable, so one open shard per collection serves every EmbeddedStore in the
# process: short-lived stores (one per Streamlit query) then search without reloading.
_OPEN: dict[Path, _Open] = {}
_OPEN_LOCK = threading.Lock()


def _edge_config(dim: int) -> Any:
    import qdrant_edge as qe

    return qe.EdgeConfig(
        vectors=qe.EdgeVectorParams(size=dim, distance=qe.Distance.Cosine),
        wal_enabled=False,  # written once then closed; also what lets other processes load it
        # m=0 skips the slow HNSW build: search is a full scan over int8 copies kept in RAM,
        # rescored with the float32 originals (recall 1.0 at 50k in our benchmark).
        hnsw_config=qe.HnswIndexConfig(m=0, ef_construct=100, full_scan_threshold=10),
        quantization_config=qe.ScalarQuantizationConfig(
            qe.ScalarType.Int8, memory=qe.Memory.Pinned
        ),
        optimizers=qe.EdgeOptimizersConfig(indexing_threshold=1),
    )


def _edge_search_params() -> Any:
    import qdrant_edge as qe

    return qe.SearchParams(quantization=qe.QuantizationSearchParams(rescore=True, oversampling=2.0))


def _edge_filter(filter: dict[str, Any]) -> Any:
    import qdrant_edge as qe

    if not filter:
        return None
    conditions: list[Any] = []
    for key, value in filter.items():
        if isinstance(value, float):  # MatchValue takes no floats
            conditions.append(qe.FieldCondition(key=key, range=qe.RangeFloat(gte=value, lte=value)))
        else:  # a plain bool would match the integers 0/1; numpy's bool matches booleans
            match: Any = np.bool_(value) if isinstance(value, bool) else value
            conditions.append(qe.FieldCondition(key=key, match=qe.MatchValue(match)))
    return qe.Filter(must=conditions)


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class EmbeddedStore(VectorStore):
    """Collections under `root/<collection>/v<NNNN>`, with `CURRENT` naming the live version."""

    kind = "embedded"

    def __init__(self, root: Path, keep: int = 3) -> None:
        super().__init__(keep)
        self.root = Path(root).expanduser().resolve()
        self.location = str(self.root)
        if self.root.exists() and not self.root.is_dir():
            raise VectorStoreError(
                f"vector store folder {self.root} is a file; set DAGMA_QDRANT_PATH to a folder"
            )
        self.collections()  # a corrupt CURRENT fails here, naming the folder

    # -- reading

    def _current_name(self, collection: str) -> str | None:
        folder = self.root / _check_name(collection)
        try:
            name = (folder / "CURRENT").read_text().strip()
        except FileNotFoundError:
            return None
        if not _VERSION.fullmatch(name) or not (folder / name / "manifest.json").is_file():
            raise VectorStoreError(
                f"{folder}/CURRENT names {name[:40]!r}, which is not a published version there. "
                f"Fix: write the name of an existing v<NNNN> folder into it, or delete {folder} "
                "and publish the collection again."
            )
        return name

    def _manifest(self, collection: str, name: str) -> CollectionVersion:
        path = self.root / collection / name / "manifest.json"
        try:
            data = json.loads(path.read_text())
            return CollectionVersion(
                collection, data["version"], name, data["points"], data["dim"], data["metadata"]
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise VectorStoreError(
                f"{path} is unreadable ({exc}). Fix: delete {path.parent.parent} and publish "
                f"{collection!r} again."
            ) from exc

    def current_version(self, collection: str) -> CollectionVersion | None:
        name = self._current_name(collection)
        return None if name is None else self._manifest(collection, name)

    def collections(self) -> list[CollectionInfo]:
        if not self.root.is_dir():
            return []
        found = (
            self.current_version(p.name)
            for p in sorted(self.root.iterdir())
            if _NAME.fullmatch(p.name) and (p / "CURRENT").is_file()
        )
        return [c for c in found if c is not None]

    def _open_current(self, collection: str) -> _Open:
        """The open current version of `collection`; call with `_OPEN_LOCK` held."""
        import qdrant_edge as qe

        key = self.root / collection
        for _ in range(3):  # a writer may prune a version between reading CURRENT and loading it
            name = self._current_name(collection)
            if name is None:
                raise VectorStoreError(
                    f"collection {collection!r} has not been published in {self.root}; "
                    "run the pipeline that publishes it first"
                )
            cached = _OPEN.get(key)
            if cached and cached.name == name:
                return cached
            info = self._manifest(collection, name)
            try:
                shard = qe.EdgeShard.load(str(key / name))
            except Exception as exc:
                if self._current_name(collection) != name:
                    continue
                raise _edge_error(key / name, exc) from exc
            if cached:
                with contextlib.suppress(Exception):  # its folder may be pruned already
                    cached.shard.close()
            _OPEN[key] = _Open(name, shard, info)
            return _OPEN[key]
        raise VectorStoreError(f"{key} changed version three times while opening it; retry")

    def search(
        self,
        collection: str,
        vector: np.ndarray,
        k: int = 5,
        *,
        filter: dict[str, Any] | None = None,
    ) -> list[Hit]:
        import qdrant_edge as qe

        with _OPEN_LOCK:
            current = self._open_current(collection)
            request = qe.SearchRequest(
                query=qe.Query.Nearest(_check_query(collection, vector, current.info.dim, k)),
                limit=k,
                filter=_edge_filter(_check_filter(filter)),
                params=_edge_search_params(),
                with_payload=True,
            )
            points = current.shard.search(request)
        return [Hit(str(p.id), p.score, p.payload or {}) for p in points]

    def count(self, collection: str) -> int:
        import qdrant_edge as qe

        with _OPEN_LOCK:
            return self._open_current(collection).shard.count(qe.CountRequest(exact=True))

    def close(self) -> None:
        """Nothing to release: open versions are shared per process (see `_OPEN`)."""

    # -- writing

    @contextlib.contextmanager
    def _writer_lock(self, folder: Path) -> Iterator[None]:
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / ".lock", "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.seek(0)
                holder = lock.read().strip() or "unknown"
                raise VectorStoreError(
                    f"{folder} is locked by another writer (pid {holder}) publishing "
                    f"{folder.name!r}. Fix: wait for that publish to finish, or stop it; "
                    "readers are not affected."
                ) from None
            lock.truncate(0)
            lock.write(str(os.getpid()))
            lock.flush()
            yield  # flock is released when the file closes, even if the process dies

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
        vectors = _check_batch(collection, ids, vectors, payloads, batch_size, metadata)
        folder = self.root / collection
        with self._writer_lock(folder):
            for stale in folder.glob(".building-*"):  # left by a killed writer
                shutil.rmtree(stale, ignore_errors=True)
            versions = [int(m[1]) for p in folder.iterdir() if (m := _VERSION.fullmatch(p.name))]
            version = max(versions, default=0) + 1
            name = f"v{version:04d}"
            building, final = folder / f".building-{name}", folder / name
            try:
                points = self._build(building, ids, vectors, payloads, batch_size, progress)
                info = CollectionVersion(
                    collection, version, name, points, vectors.shape[1], metadata or {}
                )
                manifest = {**asdict(info), "created_at": time.time()}
                _write_atomic(building / "manifest.json", json.dumps(manifest))
                building.rename(final)
                _write_atomic(folder / "CURRENT", name + "\n")
            except BaseException:  # CURRENT still names the previous version
                shutil.rmtree(building, ignore_errors=True)
                shutil.rmtree(final, ignore_errors=True)
                raise
            for old in (v for v in versions if v <= version - self.keep):
                shutil.rmtree(folder / f"v{old:04d}", ignore_errors=True)
        return info

    @staticmethod
    def _build(
        folder: Path,
        ids: Sequence[str],
        vectors: np.ndarray,
        payloads: Sequence[dict[str, Any]],
        batch_size: int,
        progress: Progress | None,
    ) -> int:
        import qdrant_edge as qe

        try:
            shard = qe.EdgeShard.create(str(folder), _edge_config(vectors.shape[1]))
        except Exception as exc:
            raise VectorStoreError(
                f"cannot create {folder}: {exc}. Fix: make {folder.parent} writable, with free space."
            ) from exc
        try:
            for start in range(0, len(ids), batch_size):
                stop = min(start + batch_size, len(ids))
                # qdrant-edge's bindings convert float64 rows faster than float32 ones
                rows = np.asarray(vectors[start:stop], dtype=np.float64)
                batch = _points(ids[start:stop], rows, payloads[start:stop])
                shard.update(qe.UpdateOperation.upsert_points(batch))
                if progress:
                    progress(stop)
            shard.optimize()  # seconds, not minutes: builds the int8 copies, no HNSW graph
            points = shard.count(qe.CountRequest(exact=True))
        finally:
            shard.close()
        # The first load settles one-time bookkeeping; do it before any reader can see the folder.
        qe.EdgeShard.load(str(folder)).close()
        return points


def _points(ids: Sequence[str], rows: np.ndarray, payloads: Sequence[dict[str, Any]]) -> list[Any]:
    from qdrant_edge import Point

    try:
        return [Point(i, v, p) for i, v, p in zip(ids, rows, payloads, strict=True)]
    except (TypeError, ValueError):
        for i, v, p in zip(ids, rows, payloads, strict=True):
            try:
                Point(i, v, p)
            except (TypeError, ValueError) as exc:
                reason = str(exc).splitlines()[0]
                raise ValueError(
                    f"point {i!r} is invalid ({reason}); ids must be UUID strings from "
                    "point_id() and payloads JSON values without NaN"
                ) from exc
        raise


def _edge_error(folder: Path, exc: Exception) -> VectorStoreError:
    reason = str(exc)
    if "WouldBlock" in reason:
        return VectorStoreError(
            f"{folder} is locked by another process ({reason}). Fix: stop the other process "
            "that has it open, or wait for it to finish."
        )
    return VectorStoreError(
        f"cannot open {folder}: {reason}. It looks corrupt. Fix: delete {folder.parent} and "
        "publish the collection again."
    )


# --------------------------------------------------------------------------- server (qdrant-client)


class ServerStore(VectorStore):
    """Collections on a Qdrant server: versions `<collection>__v<NNNN>` behind an alias."""

    kind = "server"

    def __init__(
        self, url: str, api_key: str | None = None, keep: int = 3, timeout: int = 10
    ) -> None:
        from qdrant_client import QdrantClient

        super().__init__(keep)
        self.location = url
        self._client = QdrantClient(
            url=url, api_key=api_key, timeout=timeout, check_compatibility=False
        )
        with self._errors():
            self._client.get_collections()

    @contextlib.contextmanager
    def _errors(self, collection: str | None = None) -> Iterator[None]:
        from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

        try:
            yield
        except UnexpectedResponse as exc:
            if exc.status_code in (401, 403):
                raise VectorStoreError(
                    f"Qdrant at {self.location} rejected the API key (HTTP {exc.status_code}). "
                    "Fix: set QDRANT_API_KEY to a key of that server."
                ) from exc
            if exc.status_code == 404 and collection:
                raise VectorStoreError(
                    f"collection {collection!r} has not been published on {self.location}; "
                    "run the pipeline that publishes it first"
                ) from exc
            raise VectorStoreError(f"Qdrant at {self.location} failed: {exc}") from exc
        except (ResponseHandlingException, OSError) as exc:
            raise VectorStoreError(
                f"cannot reach Qdrant at {self.location} ({exc}). Fix: start the server, correct "
                "QDRANT_URL, or unset QDRANT_URL to use the embedded store."
            ) from exc

    def _versions(self, collection: str) -> list[int]:
        pattern = re.compile(re.escape(collection) + r"__v(\d{4,})")
        names = (c.name for c in self._client.get_collections().collections)
        return sorted(int(m[1]) for n in names if (m := pattern.fullmatch(n)))

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
        _check_name(collection)
        with self._errors(collection):
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

    def search(
        self,
        collection: str,
        vector: np.ndarray,
        k: int = 5,
        *,
        filter: dict[str, Any] | None = None,
    ) -> list[Hit]:
        from qdrant_client import models

        _check_name(collection)
        query = np.asarray(vector, dtype=np.float32).ravel().tolist()
        if k < 1:
            raise ValueError(f"k must be positive, got {k}")
        conditions: list[Any] = [
            models.FieldCondition(key=key, range=models.Range(gte=value, lte=value))
            if isinstance(value, float)
            else models.FieldCondition(key=key, match=models.MatchValue(value=value))
            for key, value in _check_filter(filter).items()
        ]
        with self._errors(collection):
            points = self._client.query_points(
                collection,
                query=query,
                limit=k,
                query_filter=models.Filter(must=conditions) if conditions else None,
                with_payload=True,
            ).points
        return [Hit(str(p.id), p.score, p.payload or {}) for p in points]

    def count(self, collection: str) -> int:
        _check_name(collection)
        with self._errors(collection):
            return self._client.count(collection, exact=True).count

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

        vectors = _check_batch(collection, ids, vectors, payloads, batch_size, metadata)
        with self._errors():
            versions = self._versions(collection)
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
                for start in range(0, len(ids), batch_size):
                    stop = min(start + batch_size, len(ids))
                    batch = models.Batch(
                        ids=list(ids[start:stop]),
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
        self._client.close()
