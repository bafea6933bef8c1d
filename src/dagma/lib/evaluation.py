"""Retrieval evaluation: hit@k, reciprocal rank and a labelled question set.

A question is relevant to a hit when the hit's payload ``source`` is one of the
question's labelled ``sources`` (e.g. ``"pydoc:try"``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = [
    "EvalQuestion",
    "QuestionFileError",
    "evaluate_retrieval",
    "hit_at_k",
    "hit_source",
    "load_questions",
    "reciprocal_rank",
]


class QuestionFileError(ValueError):
    """A questions file is missing or has a malformed line."""


class EvalQuestion(BaseModel):
    """One labelled question; ``evidence`` holds verbatim phrases backing the labels."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    id: str = Field(min_length=1)
    question: str = Field(min_length=1)
    sources: tuple[str, ...] = Field(min_length=1)
    evidence: tuple[str, ...] = ()

    @field_validator("question")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("question must not be blank")
        return v


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")


def hit_at_k(ranked: Sequence[str], relevant: Collection[str], k: int) -> float:
    """1.0 if any of the first ``k`` ranked ids/sources is relevant, else 0.0."""
    _check_k(k)
    rel = set(relevant)
    return 1.0 if any(r in rel for r in ranked[:k]) else 0.0


def reciprocal_rank(
    ranked: Sequence[str], relevant: Collection[str], k: int | None = None
) -> float:
    """1/rank of the first relevant item (rank starts at 1), 0.0 if none in the first ``k``."""
    if k is not None:
        _check_k(k)
        ranked = ranked[:k]
    rel = set(relevant)
    for rank, r in enumerate(ranked, start=1):
        if r in rel:
            return 1.0 / rank
    return 0.0


def hit_source(hit: Any) -> str:
    """The ``source`` of a hit: ``hit.payload["source"]`` or, for mappings, ``hit["payload"]``."""
    payload = hit["payload"] if isinstance(hit, Mapping) else hit.payload
    return str(payload["source"])


def _as_question(q: EvalQuestion | Mapping[str, Any]) -> EvalQuestion:
    return q if isinstance(q, EvalQuestion) else EvalQuestion.model_validate(q)


def evaluate_retrieval(
    questions: Iterable[EvalQuestion | Mapping[str, Any]],
    search_fn: Callable[[str, int], Sequence[Any]],
    k: int = 5,
) -> dict[str, Any]:
    """Run ``search_fn(question, k)`` per question and score hits by their payload source.

    Returns ``{"n", "k", "hit@1", "hit@5", "mrr", "rows"}``; ``hit@5`` uses ``min(5, k)`` and
    ``mrr`` is computed over the top ``k``. Each row has id, question, sources, retrieved
    sources, first relevant rank (or None), hit@1, hit@5 and rr. Empty input gives 0.0 means.
    """
    _check_k(k)
    rows: list[dict[str, Any]] = []
    for raw in questions:
        q = _as_question(raw)
        ranked = [hit_source(h) for h in search_fn(q.question, k)][:k]
        rr = reciprocal_rank(ranked, q.sources)
        rows.append(
            {
                "id": q.id,
                "question": q.question,
                "sources": list(q.sources),
                "retrieved": ranked,
                "rank": round(1 / rr) if rr else None,
                "hit@1": hit_at_k(ranked, q.sources, 1),
                "hit@5": hit_at_k(ranked, q.sources, min(5, k)),
                "rr": rr,
            }
        )
    n = len(rows)

    def mean(key: str) -> float:
        return sum(r[key] for r in rows) / n if n else 0.0

    return {
        "n": n,
        "k": k,
        "hit@1": mean("hit@1"),
        "hit@5": mean("hit@5"),
        "mrr": mean("rr"),
        "rows": rows,
    }


def load_questions(path: str | Path) -> list[EvalQuestion]:
    """Parse a JSONL questions file; blank lines are skipped, ids must be unique."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise QuestionFileError(f"cannot read questions file {path}: {e}") from e
    out: list[EvalQuestion] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as e:
            raise QuestionFileError(f"{where}: invalid JSON ({e.msg})") from e
        if not isinstance(data, dict):
            raise QuestionFileError(f"{where}: expected a JSON object, got {type(data).__name__}")
        try:
            q = EvalQuestion.model_validate(data)
        except ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(map(str, err['loc'])) or 'line'}: {err['msg']}" for err in e.errors()
            )
            raise QuestionFileError(f"{where}: invalid question ({problems})") from e
        if q.id in seen:
            raise QuestionFileError(f"{where}: duplicate id {q.id!r} (first at line {seen[q.id]})")
        seen[q.id] = lineno
        out.append(q)
    return out
