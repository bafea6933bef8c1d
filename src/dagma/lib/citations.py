"""The one reader of passage citations: ``[n]`` and ``[n, m]`` markers, and a model's list of them.

The RAG chain marks the passages an answer cites with it and the evaluation scores them with it,
so both read an answer the same way.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Any

__all__ = ["citation_numbers", "citation_valid", "draft_citations", "strip_citations"]

_CITATION = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")


def citation_numbers(text: str, n_passages: int | None = None) -> list[int]:
    """Every distinct number cited as ``[n]`` or ``[n, m]`` in ``text``, in order.

    With ``n_passages``, only the numbers in 1..n_passages; without, in range or not.
    """
    out: list[int] = []
    for m in _CITATION.finditer(text):
        for part in m.group(1).split(","):
            n = int(part)
            if n not in out and (n_passages is None or 1 <= n <= n_passages):
                out.append(n)
    return out


def citation_valid(numbers: Collection[int], n_passages: int) -> bool:
    """An answer's citations are valid when there is at least one and all are in 1..n_passages."""
    return bool(numbers) and all(1 <= n <= n_passages for n in numbers)


def strip_citations(text: str, replacement: str = " ") -> str:
    """``text`` with every ``[n]`` and ``[n, m]`` marker replaced by ``replacement``."""
    return _CITATION.sub(replacement, text)


def draft_citations(value: Any) -> list[int]:
    """The passage numbers of a model's ``citations`` field, in order, repeats kept.

    Each item may be a number, its text or a marker (``2``, ``"2"``, ``"[2]"``, ``"[2, 3]"``);
    anything else is dropped, and a single item counts as a list of one.
    """
    out: list[int] = []
    for item in value if isinstance(value, list) else [value]:
        text = str(item).strip()
        if text.isdecimal():
            out.append(int(text))
        elif (m := _CITATION.fullmatch(text)) is not None:
            out += [int(part) for part in m.group(1).split(",")]
    return out
