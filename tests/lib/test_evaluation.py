from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from pydoc_data.topics import topics
from typing import Any

import pytest

from dagma.lib.evaluation import (
    EvalQuestion,
    QuestionFileError,
    evaluate_retrieval,
    hit_at_k,
    load_questions,
    reciprocal_rank,
)

QUESTIONS = Path(__file__).resolve().parents[2] / "evals" / "questions.jsonl"


@dataclass
class Hit:
    id: str
    score: float
    payload: dict[str, Any] = field(default_factory=dict)


def test_hit_at_k() -> None:
    ranked = ["a", "b", "c"]
    assert hit_at_k(ranked, {"a"}, 1) == 1.0
    assert hit_at_k(ranked, {"c"}, 2) == 0.0
    assert hit_at_k(ranked, {"c"}, 3) == 1.0
    assert hit_at_k(ranked, {"c"}, 10) == 1.0  # k beyond the list is fine
    assert hit_at_k([], {"a"}, 5) == 0.0
    assert hit_at_k(ranked, set(), 5) == 0.0
    with pytest.raises(ValueError, match="k must be >= 1"):
        hit_at_k(ranked, {"a"}, 0)


def test_reciprocal_rank() -> None:
    assert reciprocal_rank(["a", "b", "c"], ["b"]) == 0.5
    assert reciprocal_rank(["a", "b", "c"], ["c", "b"]) == 0.5  # first relevant wins
    assert reciprocal_rank(["a", "b", "c"], ["z"]) == 0.0
    assert reciprocal_rank(["a", "b", "c"], ["c"], k=2) == 0.0
    assert reciprocal_rank([], ["a"]) == 0.0
    # duplicates (several chunks of one source) keep the first position
    assert reciprocal_rank(["x", "a", "a"], ["a"]) == 0.5


def test_evaluate_retrieval() -> None:
    index = {
        "q1": [Hit("1", 0.9, {"source": "pydoc:try"}), Hit("2", 0.5, {"source": "pydoc:with"})],
        "q2": [Hit("3", 0.9, {"source": "pydoc:for"}), Hit("4", 0.8, {"source": "pydoc:while"})],
        "q3": [Hit("5", 0.9, {"source": "pydoc:del"})],
    }
    questions = [
        {"id": "a", "question": "q1", "sources": ["pydoc:try"]},
        EvalQuestion(id="b", question="q2", sources=("pydoc:while",)),
        {"id": "c", "question": "q3", "sources": ["pydoc:lambda"]},
    ]
    calls: list[tuple[str, int]] = []

    def search(text: str, k: int) -> list[Hit]:
        calls.append((text, k))
        return index[text]

    res = evaluate_retrieval(questions, search, k=5)
    assert calls == [("q1", 5), ("q2", 5), ("q3", 5)]
    assert res["n"] == 3
    assert res["hit@1"] == pytest.approx(1 / 3)
    assert res["hit@5"] == pytest.approx(2 / 3)
    assert res["mrr"] == pytest.approx((1 + 0.5 + 0) / 3)
    rows = {r["id"]: r for r in res["rows"]}
    assert rows["b"]["rank"] == 2
    assert rows["b"]["retrieved"] == ["pydoc:for", "pydoc:while"]
    assert rows["c"]["rank"] is None and rows["c"]["rr"] == 0.0


def test_evaluate_retrieval_edge_cases() -> None:
    res = evaluate_retrieval([], lambda q, k: [], k=5)
    assert res["n"] == 0 and res["hit@1"] == res["hit@5"] == res["mrr"] == 0.0
    # a search returning more than k hits is truncated to k
    hits = [Hit(str(i), 1.0, {"source": f"s{i}"}) for i in range(10)]
    res = evaluate_retrieval(
        [{"id": "x", "question": "q", "sources": ["s3"]}], lambda q, k: hits, k=2
    )
    assert res["rows"][0]["retrieved"] == ["s0", "s1"] and res["mrr"] == 0.0
    with pytest.raises(ValueError):
        evaluate_retrieval([], lambda q, k: [], k=0)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (
            '{"id": "q1", "question": "ok?", "sources": ["a"]}\n{not json\n',
            r"bad\.jsonl:2: invalid JSON",
        ),
        ('["q1"]\n', r"bad\.jsonl:1: expected a JSON object"),
        ('{"id": "q1", "question": "ok?"}\n', r"bad\.jsonl:1: invalid question \(sources"),
        ('{"id": "q1", "question": "  ", "sources": ["a"]}\n', r":1: invalid question \(question"),
        ('{"id": "q1", "question": "ok?", "sources": []}\n', r":1: invalid question \(sources"),
        (
            '{"id": "q1", "question": "a?", "sources": ["a"]}\n\n'
            '{"id": "q1", "question": "b?", "sources": ["b"]}\n',
            r":3: duplicate id 'q1' \(first at line 1\)",
        ),
    ],
)
def test_load_questions_errors(tmp_path: Path, content: str, match: str) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text(content, encoding="utf-8")
    with pytest.raises(QuestionFileError, match=match):
        load_questions(p)


def test_load_questions_missing_file(tmp_path: Path) -> None:
    with pytest.raises(QuestionFileError, match="cannot read questions file"):
        load_questions(tmp_path / "nope.jsonl")


def _norm(s: str) -> str:
    return re.sub(r"\s+", " ", s)


def test_questions_file_is_valid_and_labels_match_pydoc_topics() -> None:
    qs = load_questions(QUESTIONS)
    assert len(qs) >= 40
    assert len({q.id for q in qs}) == len(qs)
    assert len({q.question for q in qs}) == len(qs)
    normed = {f"pydoc:{k}": _norm(v) for k, v in topics.items()}
    covered: set[str] = set()
    for q in qs:
        assert q.sources, q.id
        assert q.evidence, f"{q.id}: no evidence phrases"
        for s in q.sources:
            assert s in normed, f"{q.id}: unknown topic {s}"
            assert any(_norm(e) in normed[s] for e in q.evidence), f"{q.id}: no evidence in {s}"
        # labels are complete: every topic quoting the evidence is listed as relevant
        quoting = {s for s, t in normed.items() for e in q.evidence if _norm(e) in t}
        assert quoting == set(q.sources), q.id
        # paraphrased: the question does not copy an evidence phrase
        for e in q.evidence:
            assert _norm(e).lower() not in q.question.lower(), q.id
        covered.update(q.sources)
    assert len(covered) >= 30  # varied topics


def test_questions_file_lines_are_plain_json() -> None:
    for line in QUESTIONS.read_text(encoding="utf-8").splitlines():
        assert set(json.loads(line)) <= {"id", "question", "sources", "evidence"}
