"""The embedded engine: qdrant-edge shards in versioned folders, a pointer and a writer lock.

Every publish builds a new immutable version and then atomically points the collection at it.
Versions are built with qdrant-edge's WAL off and closed before CURRENT moves: without a WAL the
engine takes no folder lock, and loading a finished version only rewrites identical metadata via
temp file + rename, so reader processes open CURRENT directly while a writer builds. Inside a
version, points are numbered by row; their ids and scalar payload fields are stored beside the
shard (see `rows`). A reader that may not write a version searches a copy (see `private_copy`).
Longer than 450 lines because one lock guards opening, publishing, searching and restoring a
version; split across modules, that lock's invariants would be too.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dagma.lib.atomic import atomic_file
from dagma.lib.vectors.contract import (
    NAME,
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
from dagma.lib.vectors.filters import conditions, edge_filter
from dagma.lib.vectors.private_copy import private_copy
from dagma.lib.vectors.rows import ROWS_FILE, Rows, numbering, split_payloads, write_rows

_VERSION = re.compile(r"v(\d{4,})")


@dataclass
class _Open:
    name: str
    shard: Any  # qdrant_edge.EdgeShard
    info: CollectionVersion
    rows: Rows | None = None  # None: a version from before rows, ids and payloads in the shard
    copy: Path | None = None  # the private copy the shard was loaded from, if any

    def close(self) -> None:
        with contextlib.suppress(Exception):  # its folder may be pruned already
            self.shard.close()
        if self.copy is not None:
            shutil.rmtree(self.copy, ignore_errors=True)


# Versions are immutable, so one open shard per collection serves every EmbeddedStore in the
# process: short-lived stores (one per Streamlit query) then search without reloading.
_OPEN: dict[Path, _Open] = {}
_OPEN_LOCK = threading.Lock()


def edge_config(dim: int) -> Any:
    """How a version's shard is built: cosine vectors, no WAL, int8 copies, no HNSW graph."""
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


class EmbeddedStore(VectorStore):
    """Collections under `root/<collection>/v<NNNN>`, with `CURRENT` naming the live version.

    `payload_columns=False` publishes every payload field into the shard, as versions were
    published before the row store; searches return the same hits either way.
    """

    kind = "embedded"

    def __init__(self, root: Path, keep: int = 3, *, payload_columns: bool = True) -> None:
        super().__init__(keep)
        self.root = Path(root).expanduser().resolve()
        self.payload_columns = payload_columns
        self.location = str(self.root)
        if self.root.exists() and not self.root.is_dir():
            raise VectorStoreError(
                f"vector store folder {self.root} is a file; set DAGMA_QDRANT_PATH to a folder"
            )
        self.collections()  # a corrupt CURRENT fails here, naming the folder

    # -- reading

    def _current_name(self, collection: str) -> str | None:
        folder = self.root / check_name(collection)
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
            if NAME.fullmatch(p.name) and (p / "CURRENT").is_file()
        )
        return [c for c in found if c is not None]

    def _open_current(self, collection: str) -> _Open:
        """The open current version of `collection`; call with `_OPEN_LOCK` held."""

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
                shard, copy = _load_shard(key / name)
            except Exception as exc:
                if self._current_name(collection) != name:
                    continue
                raise _edge_error(key / name, exc) from exc
            try:
                rows = Rows(key / name) if (key / name / ROWS_FILE).exists() else None
            except (OSError, ValueError, KeyError, TypeError) as exc:
                _Open(name, shard, info, None, copy).close()
                if self._current_name(collection) != name:
                    continue
                raise _edge_error(key / name, exc) from exc
            if cached:
                cached.close()
            _OPEN[key] = _Open(name, shard, info, rows, copy)
            return _OPEN[key]
        raise VectorStoreError(f"{key} changed version three times while opening it; retry")

    def _search(
        self,
        collection: str,
        vector: np.ndarray,
        k: int,
        *,
        filter: dict[str, Any] | None,
    ) -> list[Hit]:
        import qdrant_edge as qe

        items = conditions(filter)
        with _OPEN_LOCK:
            current = self._open_current(collection)
            query = check_query(collection, vector, current.info.dim, k)
            rows = current.rows
            extra: list[Any] = []
            if rows is not None and any(c.key in rows.keys for c in items):
                condition = rows.condition([c for c in items if c.key in rows.keys])
                if condition is None:
                    return []
                extra.append(condition)
                items = [c for c in items if c.key not in rows.keys]
            shard_filter = edge_filter(items, extra)

            def search(limit: int) -> list[Any]:
                request = qe.SearchRequest(
                    query=qe.Query.Nearest(query),
                    limit=limit,
                    filter=shard_filter,
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
        vectors = check_batch(collection, ids, vectors, payloads, batch_size, metadata)
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
                _write_shared(building / "manifest.json", json.dumps(manifest))
                building.rename(final)
                _write_shared(folder / "CURRENT", name + "\n")
            except BaseException:  # CURRENT still names the previous version
                shutil.rmtree(building, ignore_errors=True)
                shutil.rmtree(final, ignore_errors=True)
                raise
            for old in (v for v in versions if v <= version - self.keep):
                shutil.rmtree(folder / f"v{old:04d}", ignore_errors=True)
        return info

    def _build(
        self,
        folder: Path,
        ids: Sequence[str],
        vectors: np.ndarray,
        payloads: Sequence[dict[str, Any]],
        batch_size: int,
        progress: Progress | None,
    ) -> int:
        import qdrant_edge as qe

        point_ids = canonical_ids(ids)
        number, order = numbering(point_ids)
        columns, rest = split_payloads(payloads) if self.payload_columns else ({}, list(payloads))
        try:
            shard = qe.EdgeShard.create(str(folder), edge_config(vectors.shape[1]))
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
        write_rows(folder, [point_ids[i] for i in order], by_row, rest is not None)
        # The first load settles one-time bookkeeping; do it before any reader can see the folder.
        qe.EdgeShard.load(str(folder)).close()
        return points


def _write_shared(path: Path, text: str) -> None:
    """Write `path` whole, with its folder's read bits (a temp file alone is 0600), as the umask
    gives the engine's own files: whoever may list a collection may read it."""
    with atomic_file(path) as f:
        os.fchmod(f.fileno(), path.parent.stat().st_mode & 0o644)
        f.write(text.encode())


def _load_shard(folder: Path) -> tuple[Any, Path | None]:
    """Load a published version, from a private copy when this process may not write it
    (qdrant-edge opens its files read-write). Returns the shard and the copy, if any."""
    import qdrant_edge as qe

    if os.access(folder, os.W_OK):
        try:
            return qe.EdgeShard.load(str(folder)), None
        except Exception as exc:
            if not any(s in str(exc) for s in ("os error 13", "os error 30")):  # EACCES, EROFS
                raise
    copy = private_copy(folder)
    try:
        return qe.EdgeShard.load(str(copy)), copy
    except BaseException:
        shutil.rmtree(copy, ignore_errors=True)
        raise


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
