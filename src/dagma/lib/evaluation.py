"""RAG evaluation over a labelled question set: retrieval, citations, faithfulness, latency.

A hit is relevant by source when its payload ``source`` is one of the question's ``sources``
(e.g. ``"pydoc:try"``), and by chunk when its key ``source#chunk`` is one of the question's
``chunks`` (e.g. ``"pydoc:try#3"``): the chunks of those sources that quote an evidence phrase.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dagma.errors import DagmaError
from dagma.lib.answering import Answered, AnsweringPipeline, answer_questions
from dagma.lib.attribution import STOPWORDS, content_tokens
from dagma.lib.citations import citation_numbers, citation_valid

__all__ = [
    "STOPWORDS",
    "Answered",
    "AnsweringPipeline",
    "EvalQuestion",
    "QuestionFileError",
    "answer_questions",
    "citation_numbers",
    "citation_precision",
    "citation_recall",
    "citation_valid",
    "content_tokens",
    "evaluate_answers",
    "evaluate_retrieval",
    "faithfulness",
    "hit_at_k",
    "hit_chunk",
    "hit_source",
    "label_chunks",
    "latency_percentiles",
    "load_questions",
    "normalise",
    "reciprocal_rank",
    "score_answer",
    "score_answers",
    "tokens_per_second",
]


class QuestionFileError(DagmaError, ValueError):
    """A questions file is missing or has a malformed line."""


class EvalQuestion(BaseModel):
    """One labelled question; ``evidence`` holds verbatim phrases backing the labels.

    ``chunks`` are the keys (``source#index``) of the chunks that answer it, written by
    ``scripts/label_eval_chunks.py``.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    id: str = Field(min_length=1)
    question: str = Field(min_length=1)
    sources: tuple[str, ...] = Field(min_length=1)
    evidence: tuple[str, ...] = ()
    chunks: tuple[str, ...] = ()

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


def _payload(hit: Any) -> Mapping[str, Any]:
    return hit["payload"] if isinstance(hit, Mapping) else hit.payload


def hit_source(hit: Any) -> str:
    """The ``source`` of a hit: ``hit.payload["source"]`` or, for mappings, ``hit["payload"]``."""
    return str(_payload(hit)["source"])


def hit_chunk(hit: Any) -> str:
    """The chunk key ``source#chunk`` of a hit, as :attr:`dagma.lib.chunking.Chunk.key`."""
    payload = _payload(hit)
    return f"{payload['source']}#{payload.get('chunk', '?')}"


def normalise(text: str) -> str:
    """Whitespace collapsed and lowercased, for matching evidence phrases."""
    return " ".join(text.split()).lower()


class _ChunkLike(Protocol):
    @property
    def source(self) -> str: ...
    @property
    def text(self) -> str: ...
    @property
    def key(self) -> str: ...


def label_chunks(question: EvalQuestion, chunks: Iterable[_ChunkLike]) -> tuple[str, ...]:
    """Keys of the chunks of the question's sources that contain one of its evidence phrases."""
    sources = set(question.sources)
    phrases = [normalise(e) for e in question.evidence]
    return tuple(
        c.key
        for c in chunks
        if c.source in sources and any(p in normalise(c.text) for p in phrases)
    )


def _as_question(q: EvalQuestion | Mapping[str, Any]) -> EvalQuestion:
    return q if isinstance(q, EvalQuestion) else EvalQuestion.model_validate(q)


def evaluate_retrieval(
    questions: Iterable[EvalQuestion | Mapping[str, Any]],
    search_fn: Callable[[str, int], Sequence[Any]],
    k: int = 5,
) -> dict[str, Any]:
    """Run ``search_fn(question, k)`` per question and score the hits by source and by chunk.

    Returns ``{"n", "k", "hit@1", "hit@5", "mrr", "chunk_n", "chunk_hit@5", "chunk_mrr",
    "rows"}``; ``hit@5`` uses ``min(5, k)`` and ``mrr`` is computed over the top ``k``. The
    chunk measures average over the ``chunk_n`` questions that have chunk labels. Each row has
    id, question, sources, retrieved sources, first relevant rank (or None), hit@1, hit@5, rr
    and, by chunk, chunks, retrieved_chunks, chunk_rank, chunk_hit@5, chunk_rr.
    Empty input gives 0.0 means.
    """
    _check_k(k)
    rows: list[dict[str, Any]] = []
    for raw in questions:
        q = _as_question(raw)
        hits = list(search_fn(q.question, k))[:k]
        ranked = [hit_source(h) for h in hits]
        rr = reciprocal_rank(ranked, q.sources)
        row: dict[str, Any] = {
            "id": q.id,
            "question": q.question,
            "sources": list(q.sources),
            "retrieved": ranked,
            "rank": round(1 / rr) if rr else None,
            "hit@1": hit_at_k(ranked, q.sources, 1),
            "hit@5": hit_at_k(ranked, q.sources, min(5, k)),
            "rr": rr,
            "chunks": list(q.chunks),
        }
        if q.chunks:
            keys = [hit_chunk(h) for h in hits]
            chunk_rr = reciprocal_rank(keys, q.chunks)
            row |= {
                "retrieved_chunks": keys,
                "chunk_rank": round(1 / chunk_rr) if chunk_rr else None,
                "chunk_hit@5": hit_at_k(keys, q.chunks, min(5, k)),
                "chunk_rr": chunk_rr,
            }
        rows.append(row)
    labelled = [r for r in rows if r["chunks"]]
    return {
        "n": len(rows),
        "k": k,
        "hit@1": _mean(r["hit@1"] for r in rows),
        "hit@5": _mean(r["hit@5"] for r in rows),
        "mrr": _mean(r["rr"] for r in rows),
        "chunk_n": len(labelled),
        "chunk_hit@5": _mean(r["chunk_hit@5"] for r in labelled),
        "chunk_mrr": _mean(r["chunk_rr"] for r in labelled),
        "rows": rows,
    }


def _ratio(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def _mean(values: Iterable[float]) -> float:
    vals = list(values)
    return sum(vals) / len(vals) if vals else 0.0


def citation_precision(answers: Iterable[tuple[Sequence[str], Collection[str]]]) -> float:
    """Share of all cited passages, over all answers, that are labelled relevant.

    ``answers`` holds one ``(cited, relevant)`` pair per answer: the keys (chunk or source) of
    the passages it cites and the question's relevant keys. 0.0 when nothing is cited at all.
    """
    cited = relevant = 0
    for keys, rel in answers:
        cited += len(keys)
        relevant += sum(k in rel for k in keys)
    return relevant / cited if cited else 0.0


def citation_recall(answers: Iterable[tuple[Sequence[str], Collection[str]]]) -> float:
    """Share of the relevant passages an answer was given that it cites, over all answers.

    ``answers`` holds one ``(cited, relevant_given)`` pair per answer: the keys of the passages
    it cites and the keys of the labelled relevant passages among those it was given. 0.0 when
    no answer was given a relevant passage.
    """
    given = found = 0
    for keys, rel in answers:
        given += len(rel)
        found += sum(k in keys for k in rel)
    return found / given if given else 0.0


def faithfulness(answer: str, passages: Iterable[str]) -> float:
    """Share of the answer's content tokens that occur in ``passages``; 0.0 for none."""
    tokens = content_tokens(answer)
    if not tokens:
        return 0.0
    vocabulary = {w for p in passages for w in content_tokens(p)}
    return sum(w in vocabulary for w in tokens) / len(tokens)


def latency_percentiles(seconds: Sequence[float]) -> tuple[float, float]:
    """(p50, p95) of ``seconds`` with numpy's linear interpolation; (0.0, 0.0) when empty."""
    if not seconds:
        return 0.0, 0.0
    p50, p95 = np.percentile(np.asarray(seconds, dtype=float), [50, 95])
    return float(p50), float(p95)


def tokens_per_second(tokens: Sequence[int | None], seconds: Sequence[float | None]) -> float:
    """Sum of output tokens over the sum of generation seconds, on answers where both are known.

    Unknown is None or 0: backends that do not report tokens leave ``output_tokens`` at 0.
    """
    pairs = [(t, s) for t, s in zip(tokens, seconds, strict=True) if t and s]
    total = sum(s for _, s in pairs)
    return sum(t for t, _ in pairs) / total if total else 0.0


def _doc_key(doc: Any) -> str:
    return hit_chunk({"payload": doc.metadata})


def score_answer(q: EvalQuestion, docs: Sequence[Any], answer: Any) -> dict[str, Any]:
    """Citation and faithfulness measures of one answer over the passages it was given.

    Cited passages are the sources flagged ``cited`` (the model's citations and the passages
    its sentences are attributed to) plus in-range ``[n]`` markers; citations outside
    1..len(docs) make the answer's citations invalid. A cited chunk is relevant when it is one
    of the question's ``chunks``, so questions without chunk labels have none.
    ``marked`` are the passages the model cited itself with ``[n]``.
    """
    numbers = citation_numbers(answer.text)
    numbers += [s.rank for s in answer.sources if s.cited and s.rank not in numbers]
    cited = [docs[n - 1] for n in sorted(numbers) if 1 <= n <= len(docs)]
    cited_keys = [_doc_key(d) for d in cited]
    cited_sources = [str(d.metadata.get("source")) for d in cited]
    retrieved = [_doc_key(d) for d in docs]
    attributions = list(getattr(answer, "attributions", []) or [])
    marked = citation_numbers(answer.text, len(docs))
    return {
        "id": q.id,
        "question": q.question,
        "answer": answer.text,
        "parsed": getattr(answer, "parsed", None),
        "confidence": answer.confidence,
        "retrieved": retrieved,
        "sources": list(q.sources),
        "relevant": list(q.chunks),
        "relevant_given": [k for k in q.chunks if k in retrieved],
        "citations": numbers,
        "marked": [retrieved[n - 1] for n in marked],
        "cited": cited_keys,
        "cited_sources": cited_sources,
        "citation_valid": citation_valid(numbers, len(docs)),
        "cited_relevant": sum(k in q.chunks for k in cited_keys),
        "cited_relevant_source": sum(s in q.sources for s in cited_sources),
        "faithfulness": faithfulness(answer.text, [d.page_content for d in cited or docs]),
        "sentences": len(attributions),
        "supported": sum(a.source is not None for a in attributions),
        "trimmed": bool(getattr(answer, "trimmed", False)),
    }


def score_answers(
    questions: Sequence[EvalQuestion | Mapping[str, Any]], answered: Sequence[Answered]
) -> dict[str, Any]:
    """Score ``answered[i]``, the answer to ``questions[i]``: ``answered``,
    ``citation_precision`` (cited passages whose chunk is labelled relevant),
    ``citation_source_precision`` (same, by source), ``citation_recall`` (labelled relevant
    passages given to the model that the answer cites), ``marker_citation_precision`` (the
    precision of the model's own ``[n]`` alone), ``citation_validity`` (share of answers with
    valid citations), ``supported_sentences`` (share of answer sentences attributed to a
    passage), ``trimmed`` (share of answers cut by the token limit), mean ``faithfulness``, ``latency_p50_s``/``latency_p95_s`` (wall
    time of retrieval plus answer), ``tokens_per_s`` and the per-question ``rows``."""
    if len(questions) != len(answered):
        raise ValueError(f"{len(answered)} answers for {len(questions)} questions: give one each")
    rows = [
        score_answer(_as_question(raw), done.docs, done.answer)
        | {
            "latency_s": done.latency_s,
            "generation_s": done.generation_s,
            "output_tokens": getattr(done.answer, "output_tokens", None),
        }
        for raw, done in zip(questions, answered, strict=True)
    ]
    p50, p95 = latency_percentiles([r["latency_s"] for r in rows])
    return {
        "answered": len(rows),
        "citation_precision": citation_precision((r["cited"], r["relevant"]) for r in rows),
        "citation_source_precision": citation_precision(
            (r["cited_sources"], r["sources"]) for r in rows
        ),
        "citation_recall": citation_recall((r["cited"], r["relevant_given"]) for r in rows),
        "marker_citation_precision": citation_precision((r["marked"], r["relevant"]) for r in rows),
        "citation_validity": _mean(float(r["citation_valid"]) for r in rows),
        "supported_sentences": _ratio(
            sum(r["supported"] for r in rows), sum(r["sentences"] for r in rows)
        ),
        "trimmed": _mean(float(r["trimmed"]) for r in rows),
        "faithfulness": _mean(r["faithfulness"] for r in rows),
        "latency_p50_s": p50,
        "latency_p95_s": p95,
        "tokens_per_s": tokens_per_second(
            [r["output_tokens"] for r in rows], [r["generation_s"] for r in rows]
        ),
        "rows": rows,
    }


def evaluate_answers(
    questions: Iterable[EvalQuestion | Mapping[str, Any]],
    pipeline: AnsweringPipeline | Sequence[AnsweringPipeline],
    limit: int,
    trace: Callable[[EvalQuestion], AbstractContextManager[Any]] | None = None,
) -> dict[str, Any]:
    """Answer the first ``limit`` questions (:func:`answer_questions`), each inside
    ``trace(question)`` when given (e.g. an MLflow span), and score them (:func:`score_answers`).
    """
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    chosen = [_as_question(raw) for raw in list(questions)[:limit]]
    spans = None if trace is None else [partial(trace, q) for q in chosen]
    return score_answers(chosen, answer_questions([q.question for q in chosen], pipeline, spans))


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
