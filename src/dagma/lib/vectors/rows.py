"""The row store of an embedded version: point ids and scalar payload fields beside its shard.

qdrant-edge 0.9 converts every id and payload value through a chain of failing extractions (bool,
then three number types, each raising a Python error, then str, ...): about 5 us per UUID and 7 us
per string field, more than the vector and the rest of the write together. So the shard numbers
its points 0..n-1, in the order it would have sorted their ids (so equal scores still rank as
before), and holds only the vectors and any payload fields that are not plain scalars;
`payload.json` maps rows back to the point ids, and scalar fields present in every point are
stored as columns. Searches return the same ids and payloads as before, and filters on column
fields match as qdrant's do (see `Rows.matching`) by handing the shard the matching rows. Versions
published before this have no `payload.json` and are read as they were.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import mmap
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dagma.lib.vectors.filters import Condition, is_field

ROWS_FILE = "payload.json"
_ROWS_FORMAT = 1


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


def split_payloads(
    payloads: Sequence[dict[str, Any]],
) -> tuple[dict[str, list[Any]], list[dict[str, Any]] | None]:
    """The fields stored as columns, and the payloads left for the shard (None: nothing left).

    A text column comes back as its values' UTF-8 encodings, the rest as the values.
    """
    if not payloads or not all(type(p) is dict for p in payloads):
        return {}, list(payloads)
    columns: dict[str, list[Any]] = {}
    for key in payloads[0]:
        if not is_field(key):
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


def _id_order(point: str) -> tuple[int, int | str]:
    """qdrant's order of point ids: numbers first, then UUIDs by their bytes (= their text)."""
    return (0, int(point)) if point.isdigit() else (1, point)


def numbering(point_ids: list[str]) -> tuple[list[int], list[int]]:
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


def write_rows(folder: Path, ids: list[str], columns: dict[str, list[Any]], rest: bool) -> None:
    """`payload.json` (ids by row, column names, non-text columns) and a blob per text column."""
    described: list[dict[str, Any]] = []
    for n, (key, values) in enumerate(columns.items()):
        if values and type(values[0]) is bytes:  # a text column (see split_payloads)
            offsets = np.zeros(len(values) + 1, dtype=np.int64)
            np.cumsum([len(b) for b in values], out=offsets[1:])
            _write_durable(folder / f"payload-{n}.utf8", b"".join(values))
            _write_durable(folder / f"payload-{n}.npy", _npy(offsets))
            described.append({"key": key, "kind": "text"})
        else:
            described.append({"key": key, "kind": "json", "values": values})
    header = {"format": _ROWS_FORMAT, "ids": ids, "columns": described, "rest_in_shard": rest}
    _write_durable(folder / ROWS_FILE, json.dumps(header, allow_nan=False).encode())


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


class Rows:
    """The ids and payload columns of one version's row-numbered points, opened with its shard."""

    def __init__(self, folder: Path) -> None:
        header = json.loads((folder / ROWS_FILE).read_text())
        if header.get("format") != _ROWS_FORMAT:
            raise ValueError(f"unknown payload format {header.get('format')!r}")
        self.ids: list[str] = header["ids"]
        self.rest_in_shard: bool = header["rest_in_shard"]
        self.keys: list[str] = []
        self._json: dict[str, list[Any]] = {}
        self._text: dict[str, tuple[bytes | mmap.mmap, list[int]]] = {}
        self._index: dict[str, dict[tuple[str, Any], list[int]]] = {}
        self._conditions: dict[tuple[Condition, ...], Any] = {}
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

    def matching(self, condition: Condition) -> list[int]:
        """Rows whose column matches `condition` as qdrant's filter does (see `filters`)."""
        index = self._index.get(condition.key)
        if index is None:
            index = {}
            for row, x in enumerate(self._values(condition.key)):
                kind = type(x)
                if kind is str:
                    index.setdefault(("text", x), []).append(row)
                elif kind is bool:
                    index.setdefault(("bool", x), []).append(row)
                elif kind is int:
                    index.setdefault(("int", x), []).append(row)
                    index.setdefault(("float", float(x)), []).append(row)
                elif kind is float:
                    index.setdefault(("float", x), []).append(row)
            self._index[condition.key] = index
        value = float(condition.value) if condition.kind == "float" else condition.value
        return index.get((condition.kind, value), [])

    def condition(self, items: Sequence[Condition]) -> Any:
        """A qdrant-edge condition selecting the rows that match every item (column fields
        only), or None when no row does. The last few are kept: converting many ids costs."""
        import qdrant_edge as qe

        key = tuple(items)
        if key not in self._conditions:
            rows: set[int] | None = None
            for item in items:
                found = self.matching(item)
                rows = set(found) if rows is None else rows.intersection(found)
            if len(self._conditions) >= 64:
                self._conditions.pop(next(iter(self._conditions)))
            self._conditions[key] = qe.HasIdCondition(set[Any](rows)) if rows else None
        return self._conditions[key]
