"""Versioned vector collections: embedded qdrant-edge by default, a Qdrant server when configured.

Every publish builds a new immutable version and then atomically points the collection at it.
Embedded versions are built with qdrant-edge's WAL off and closed before CURRENT moves: without a
WAL the engine takes no folder lock, and loading a finished version only rewrites identical
metadata via temp file + rename, so reader processes open CURRENT directly while a writer builds.
Inside a version, points are numbered by row; their ids and scalar payload fields are stored
beside the shard (see `_Rows`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import itertools
import json
import math
import mmap
import os
import re
import shutil
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import numpy as np

from dagma.lib.atomic import write_atomic

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


# What the points of a version stand for, beside its shard. qdrant-edge 0.9 converts every id and
# payload value through a chain of failing extractions (bool, then three number types, each raising
# a Python error, then str, ...): about 5 us per UUID and 7 us per string field, more than the
# vector and the rest of the write together. So the shard numbers its points 0..n-1, in the order
# it would have sorted their ids (so equal scores still rank as before), and holds only the
# vectors and any payload fields that are not plain scalars; `payload.json` maps rows back to the
# point ids, and scalar fields present in every point are stored as columns. Searches return the
# same ids and payloads as before, and filters on column fields match as qdrant's do (see
# `_Rows.matching`) by handing the shard the matching rows. Versions published before this have
# no `payload.json` and are read as they were.
_ROWS = "payload.json"
_ROWS_FORMAT = 1
_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _scalar(value: Any) -> bool:
    kind = type(value)
    if kind is str:
        try:
            value.encode()
        except UnicodeEncodeError:  # lone surrogates: qdrant refuses them, so let it say so
            return False
        return True
    if kind is bool or value is None:
        return True
    if kind is int:
        return -(2**63) <= value < 2**64
    return kind is float and math.isfinite(value)


def _encoded(column: list[Any]) -> list[bytes] | None:
    """A column of str as UTF-8, or None when it holds anything else (or lone surrogates)."""
    if not all(type(v) is str for v in column):
        return None
    try:
        return [v.encode() for v in column]
    except UnicodeEncodeError:
        return None


def _split_payloads(
    payloads: Sequence[dict[str, Any]],
) -> tuple[dict[str, list[Any]], list[dict[str, Any]] | None]:
    """The fields stored as columns, and the payloads left for the shard (None: nothing left).

    A text column comes back as its values' UTF-8 encodings, the rest as the values.
    """
    if not payloads or not all(type(p) is dict for p in payloads):
        return {}, list(payloads)
    columns: dict[str, list[Any]] = {}
    for key in payloads[0]:
        if not (type(key) is str and _FIELD.fullmatch(key)):
            continue
        try:
            column = [p[key] for p in payloads]
        except KeyError:
            continue
        encoded = _encoded(column)
        if encoded is not None:
            columns[key] = encoded
        elif all(map(_scalar, column)):
            columns[key] = column
    if all(len(p) == len(columns) for p in payloads):
        return columns, None
    return columns, [{k: v for k, v in p.items() if k not in columns} for p in payloads]


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


def _canonical_ids(ids: Sequence[Any]) -> list[str]:
    out = [p if type(p) is str and _UUID.fullmatch(p) else _canonical_id(p) for p in ids]
    if len(set(out)) != len(out):  # two spellings of one UUID
        dup = next(i for i, n in Counter(out).items() if n > 1)
        raise ValueError(f"id {dup!r} appears twice; derive ids with point_id()")
    return out


def _id_order(point: str) -> tuple[int, int | str]:
    """qdrant's order of point ids: numbers first, then UUIDs by their bytes (= their text)."""
    return (0, int(point)) if point.isdigit() else (1, point)


def _numbering(point_ids: list[str]) -> tuple[list[int], list[int]]:
    """Row numbers in qdrant's order of the ids, so the shard ranks tied scores (duplicate
    vectors) as it did when it held the ids themselves; and the input position of each row."""
    if any(p.isdigit() for p in point_ids):
        order = sorted(range(len(point_ids)), key=lambda i: _id_order(point_ids[i]))
    else:  # all UUIDs, the usual case: their text sorts as their bytes
        order = sorted(range(len(point_ids)), key=point_ids.__getitem__)
    number = [0] * len(order)
    for row, i in enumerate(order):
        number[i] = row
    return number, order


def _write_rows(folder: Path, ids: list[str], columns: dict[str, list[Any]], rest: bool) -> None:
    """`payload.json` (ids by row, column names, non-text columns) and a blob per text column."""
    described: list[dict[str, Any]] = []
    for n, (key, values) in enumerate(columns.items()):
        if values and type(values[0]) is bytes:  # a text column (see _split_payloads)
            offsets = np.zeros(len(values) + 1, dtype=np.int64)
            np.cumsum([len(b) for b in values], out=offsets[1:])
            _write_durable(folder / f"payload-{n}.utf8", b"".join(values))
            _write_durable(folder / f"payload-{n}.npy", _npy(offsets))
            described.append({"key": key, "kind": "text"})
        else:
            described.append({"key": key, "kind": "json", "values": values})
    header = {"format": _ROWS_FORMAT, "ids": ids, "columns": described, "rest_in_shard": rest}
    _write_durable(folder / _ROWS, json.dumps(header, allow_nan=False).encode())


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _write_durable(path: Path, data: bytes) -> None:
    """Written and synced, like the shard's own files once it is closed."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _map(path: Path) -> bytes | mmap.mmap:
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return b""
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # stays valid if pruned


class _Rows:
    """The ids and payload columns of one version's row-numbered points, opened with its shard."""

    def __init__(self, folder: Path) -> None:
        header = json.loads((folder / _ROWS).read_text())
        if header.get("format") != _ROWS_FORMAT:
            raise ValueError(f"unknown payload format {header.get('format')!r}")
        self.ids: list[str] = header["ids"]
        self.rest_in_shard: bool = header["rest_in_shard"]
        self.keys: list[str] = []
        self._json: dict[str, list[Any]] = {}
        self._text: dict[str, tuple[bytes | mmap.mmap, list[int]]] = {}
        self._index: dict[str, dict[tuple[str, Any], list[int]]] = {}
        self._conditions: dict[tuple[tuple[str, str, Any], ...], Any] = {}
        for n, column in enumerate(header["columns"]):
            key = column["key"]
            self.keys.append(key)
            if column["kind"] == "json":
                self._json[key] = column["values"]
            else:
                offsets = np.load(folder / f"payload-{n}.npy").tolist()
                self._text[key] = (_map(folder / f"payload-{n}.utf8"), offsets)

    def payload(self, row: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in self.keys:
            if key in self._json:
                out[key] = self._json[key][row]
            else:
                blob, offsets = self._text[key]
                out[key] = blob[offsets[row] : offsets[row + 1]].decode()
        return out

    def _values(self, key: str) -> list[Any]:
        if key in self._json:
            return self._json[key]
        blob, offsets = self._text[key]
        return [blob[a:b].decode() for a, b in itertools.pairwise(offsets)]

    def matching(self, key: str, value: str | int | float) -> list[int]:
        """Rows whose `key` matches `value` as qdrant's filter does.

        A str matches an equal str; a bool an equal bool; an int an equal int (not a float, nor
        a bool); a float any equal number, int or float (it is a range `value <= x <= value`).
        """
        index = self._index.get(key)
        if index is None:
            index = {}
            for row, x in enumerate(self._values(key)):
                kind = type(x)
                if kind is str:
                    index.setdefault(("s", x), []).append(row)
                elif kind is bool:
                    index.setdefault(("b", x), []).append(row)
                elif kind is int:
                    index.setdefault(("i", x), []).append(row)
                    index.setdefault(("f", float(x)), []).append(row)
                elif kind is float:
                    index.setdefault(("f", x), []).append(row)
            self._index[key] = index
        if isinstance(value, str):
            return index.get(("s", value), [])
        if isinstance(value, bool | np.bool_):
            return index.get(("b", bool(value)), [])
        if isinstance(value, int):
            return index.get(("i", value), [])
        return index.get(("f", float(value)), [])

    def condition(self, filter: dict[str, Any]) -> Any:
        """A qdrant-edge condition selecting the rows that match every item (column fields
        only), or None when no row does. The last few are kept: converting many ids costs."""
        import qdrant_edge as qe

        key = tuple((k, type(v).__name__, v) for k, v in filter.items())
        if key not in self._conditions:
            rows: set[int] | None = None
            for field_, value in filter.items():
                found = self.matching(field_, value)
                rows = set(found) if rows is None else rows.intersection(found)
            if len(self._conditions) >= 64:
                self._conditions.pop(next(iter(self._conditions)))
            self._conditions[key] = qe.HasIdCondition(set[Any](rows)) if rows else None
        return self._conditions[key]


@dataclass
class _Open:
    name: str
    shard: Any  # qdrant_edge.EdgeShard
    info: CollectionVersion
    rows: _Rows | None = None  # None: a version from before rows, ids and payloads in the shard


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


def _edge_filter(filter: dict[str, Any], extra: Sequence[Any] = ()) -> Any:
    import qdrant_edge as qe

    if not filter and not extra:
        return None
    conditions: list[Any] = list(extra)
    for key, value in filter.items():
        if isinstance(value, float):  # MatchValue takes no floats
            conditions.append(qe.FieldCondition(key=key, range=qe.RangeFloat(gte=value, lte=value)))
        else:  # a plain bool would match the integers 0/1; numpy's bool matches booleans
            match: Any = np.bool_(value) if isinstance(value, bool) else value
            conditions.append(qe.FieldCondition(key=key, match=qe.MatchValue(match)))
    return qe.Filter(must=conditions)


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
            try:
                rows = _Rows(key / name) if (key / name / _ROWS).exists() else None
            except (OSError, ValueError, KeyError, TypeError) as exc:
                shard.close()
                if self._current_name(collection) != name:
                    continue
                raise _edge_error(key / name, exc) from exc
            if cached:
                with contextlib.suppress(Exception):  # its folder may be pruned already
                    cached.shard.close()
            _OPEN[key] = _Open(name, shard, info, rows)
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

        filter = _check_filter(filter)
        with _OPEN_LOCK:
            current = self._open_current(collection)
            query = _check_query(collection, vector, current.info.dim, k)
            rows = current.rows
            extra: list[Any] = []
            if rows is not None and any(key in rows.keys for key in filter):
                own = {k: v for k, v in filter.items() if k in rows.keys}
                filter = {k: v for k, v in filter.items() if k not in own}
                condition = rows.condition(own)
                if condition is None:
                    return []
                extra.append(condition)
            edge_filter = _edge_filter(filter, extra)

            def search(limit: int) -> list[Any]:
                request = qe.SearchRequest(
                    query=qe.Query.Nearest(query),
                    limit=limit,
                    filter=edge_filter,
                    params=_edge_search_params(),
                    with_payload=rows is None or rows.rest_in_shard,
                )
                return list(current.shard.search(request))

            if not extra:
                points = search(k)
            else:
                # The shard visits a set of ids in no fixed order, which would rank equal scores
                # (duplicate vectors) differently from run to run. Fetch every point tied with
                # the k-th, then rank ties by row (qdrant's id order).
                fetch = k + 1
                while (
                    len(points := search(fetch)) == fetch
                    and points[-1].score == points[k - 1].score
                ):
                    fetch *= 2
                points = sorted(points, key=lambda p: (-p.score, p.id))[:k]
        if rows is None:
            return [Hit(str(p.id), p.score, p.payload or {}) for p in points]
        hits = []
        for p in points:
            payload = rows.payload(p.id)
            if rows.rest_in_shard and p.payload:
                payload.update(p.payload)
            hits.append(Hit(rows.ids[p.id], p.score, payload))
        return hits

    def count(self, collection: str) -> int:
        import qdrant_edge as qe

        with _OPEN_LOCK:
            return self._open_current(collection).shard.count(qe.CountRequest(exact=True))

    def close(self) -> None:
        """Nothing to release: open versions are shared per process (see `_OPEN`)."""

    # -- writing

    @contextlib.contextmanager
    def held(self, collection: str) -> Iterator[Path]:
        """Hold `collection`'s writer lock, so no publish moves or prunes its versions meanwhile."""
        folder = self.root / collection
        with self._writer_lock(folder):
            yield folder

    def discard_dead_builds(self) -> list[Path]:
        """Remove the half-built versions of writers that died; a live writer's are kept.

        A dead writer's lock is free (the kernel released it when it died), so a folder whose
        lock can be taken has no build in progress.
        """
        removed = []
        for folder in sorted(p for p in self.root.glob("*") if p.is_dir()):
            building = list(folder.glob(".building-*"))
            if not building:
                continue
            with contextlib.suppress(VectorStoreError), self._writer_lock(folder):
                for stale in building:
                    shutil.rmtree(stale, ignore_errors=True)
                    removed.append(stale)
        return removed

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
                write_atomic(building / "manifest.json", json.dumps(manifest))
                building.rename(final)
                write_atomic(folder / "CURRENT", name + "\n")
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

        point_ids = _canonical_ids(ids)
        number, order = _numbering(point_ids)
        columns, rest = _split_payloads(payloads)
        try:
            shard = qe.EdgeShard.create(str(folder), _edge_config(vectors.shape[1]))
        except Exception as exc:
            raise VectorStoreError(
                f"cannot create {folder}: {exc}. Fix: make {folder.parent} writable, with free space."
            ) from exc
        try:
            for start in range(0, len(ids), batch_size):
                stop = min(start + batch_size, len(ids))
                part = None if rest is None else rest[start:stop]
                batch = _points(ids[start:stop], number[start:stop], vectors[start:stop], part)
                shard.update(qe.UpdateOperation.upsert_points(batch))
                if progress:
                    progress(stop)
            shard.optimize()  # seconds, not minutes: builds the int8 copies, no HNSW graph
            points = shard.count(qe.CountRequest(exact=True))
        finally:
            shard.close()
        by_row = {key: [values[i] for i in order] for key, values in columns.items()}
        _write_rows(folder, [point_ids[i] for i in order], by_row, rest is not None)
        # The first load settles one-time bookkeeping; do it before any reader can see the folder.
        qe.EdgeShard.load(str(folder)).close()
        return points


def _points(
    ids: Sequence[str],
    numbers: Sequence[int],
    rows: np.ndarray,
    payloads: Sequence[dict[str, Any]] | None,
) -> list[Any]:
    """qdrant-edge points with these row `numbers` (`ids` only name them in errors)."""
    import qdrant_edge

    Point: Any = qdrant_edge.Point
    # The bindings read a vector item by item. From a memoryview the items are plain floats;
    # from a numpy row they are numpy scalars, which made the conversion 2-3x slower.
    rows = np.asarray(rows)
    if rows.dtype != np.float32 and rows.dtype != np.float64:
        rows = rows.astype(np.float64)
    rows = np.ascontiguousarray(rows)
    try:
        if payloads is None:
            return [Point(i, memoryview(v)) for i, v in zip(numbers, rows, strict=True)]
        return [Point(i, memoryview(v), p) for i, v, p in zip(numbers, rows, payloads, strict=True)]
    except (TypeError, ValueError):
        for i, v, p, point in zip(
            numbers, rows, payloads or itertools.repeat(None), ids, strict=False
        ):
            try:
                Point(i, memoryview(v), p)
            except (TypeError, ValueError) as exc:
                reason = str(exc).splitlines()[0]
                raise ValueError(
                    f"point {point!r} is invalid ({reason}); payloads must be JSON values "
                    "without NaN"
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
        if not (isinstance(key, str) and _FIELD.fullmatch(key)):
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
        _check_name(collection)
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
        with self._errors():
            try:
                points = self._client.query_points(
                    collection,
                    query=query,
                    limit=k,
                    query_filter=models.Filter(must=conditions) if conditions else None,
                    with_payload=True,
                ).points
            except Exception:
                # Name the usual causes the same way on a server and in the local engine.
                name = self._published(collection)
                _check_query(collection, vector, self._info(collection, name).dim, k)
                raise
        return [Hit(str(p.id), p.score, p.payload or {}) for p in points]

    def count(self, collection: str) -> int:
        _check_name(collection)
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

        vectors = _check_batch(collection, ids, vectors, payloads, batch_size, metadata)
        # Ids as the server returns them (canonical UUID text, or unsigned ints).
        point_ids: list[Any] = [int(p) if p.isdigit() else p for p in _canonical_ids(ids)]
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
