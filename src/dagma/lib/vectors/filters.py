"""The one translation of a search filter (`{"source": "doc3", "chunk": 1}`) for every engine.

A filter keeps the points whose payload matches every item, as Qdrant matches: a str an equal
str, a bool an equal bool, an int an equal int (not a float, nor a bool), and a float any equal
number (a range `value <= x <= value`, as Qdrant's exact match takes no floats). `conditions`
checks a filter once and says which of these each item is; the builders below turn that into
qdrant-edge's and qdrant-client's filters, and the embedded row store matches its columns by it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

# A payload key a filter can name as it is: Qdrant reads dots and brackets in a key as a path.
FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

Kind = Literal["text", "bool", "int", "float"]


@dataclass(frozen=True)
class Condition:
    """One filter item: the payload `key` must match `value`, compared as `kind`."""

    key: str
    kind: Kind
    value: str | bool | int | float


def is_field(key: Any) -> bool:
    """Whether `key` is a payload key a filter can name."""
    return type(key) is str and FIELD.fullmatch(key) is not None


def conditions(filter: dict[str, Any] | None) -> list[Condition]:
    """The items of `filter`, each with how it matches; a ValueError names an item that cannot."""
    out = []
    for key, value in (filter or {}).items():
        if isinstance(value, str):
            out.append(Condition(key, "text", value))
        elif isinstance(value, bool):
            out.append(Condition(key, "bool", value))
        elif isinstance(value, int):
            out.append(Condition(key, "int", value))
        elif isinstance(value, float):
            out.append(Condition(key, "float", value))
        else:
            raise ValueError(
                f"filter {key}={value!r}: only str, int, float or bool values match exactly"
            )
    return out


def edge_filter(items: Sequence[Condition], extra: Sequence[Any] = ()) -> Any:
    """A qdrant-edge filter for `items` and any `extra` conditions, or None for no filter."""
    import qdrant_edge as qe

    if not items and not extra:
        return None
    must: list[Any] = list(extra)
    for c in items:
        if c.kind == "float":
            bound = float(c.value)
            must.append(qe.FieldCondition(key=c.key, range=qe.RangeFloat(gte=bound, lte=bound)))
        else:  # a plain bool would match the integers 0/1; numpy's bool matches booleans
            match: Any = np.bool_(c.value) if c.kind == "bool" else c.value
            must.append(qe.FieldCondition(key=c.key, match=qe.MatchValue(match)))
    return qe.Filter(must=must)


def server_filter(items: Sequence[Condition]) -> Any:
    """A qdrant-client filter for `items`, or None for no filter."""
    from qdrant_client import models

    if not items:
        return None
    must: list[Any] = []
    for c in items:
        if c.kind == "float":
            bound = float(c.value)
            must.append(models.FieldCondition(key=c.key, range=models.Range(gte=bound, lte=bound)))
        else:
            match: Any = c.value
            must.append(models.FieldCondition(key=c.key, match=models.MatchValue(value=match)))
    return models.Filter(must=must)
