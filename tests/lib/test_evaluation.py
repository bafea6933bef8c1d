from __future__ import annotations

import importlib.util
import json
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from pydoc_data.topics import topics
from typing import Any

import pytest
from langchain_core.documents import Document

from dagma.lib.chunking import Chunk
from dagma.lib.evaluation import (
    EvalQuestion,
    QuestionFileError,
    answer_questions,
    citation_numbers,
    citation_precision,
    citation_recall,
    citation_valid,
    content_tokens,
    evaluate_answers,
    evaluate_retrieval,
    faithfulness,
    hit_at_k,
    label_chunks,
    latency_percentiles,
    load_questions,
    normalise,
    reciprocal_rank,
    tokens_per_second,
)
from dagma.lib.rag import assemble_answer

ROOT = Path(__file__).resolve().parents[2]
QUESTIONS = ROOT / "evals" / "questions.jsonl"
LABEL_SCRIPT = ROOT / "scripts" / "label_eval_chunks.py"


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


def test_evaluate_retrieval_scores_chunks_of_labelled_questions() -> None:
    hits = [
        Hit("1", 0.9, {"source": "pydoc:try", "chunk": 0}),
        Hit("2", 0.8, {"source": "pydoc:try", "chunk": 3}),
    ]
    questions = [
        {"id": "a", "question": "q", "sources": ["pydoc:try"], "chunks": ["pydoc:try#3"]},
        {"id": "b", "question": "q", "sources": ["pydoc:try"], "chunks": ["pydoc:try#9"]},
        {"id": "c", "question": "q", "sources": ["pydoc:try"]},  # no chunk labels: not scored
    ]
    res = evaluate_retrieval(questions, lambda q, k: hits, k=5)
    assert res["hit@1"] == res["hit@5"] == res["mrr"] == 1.0
    assert res["chunk_n"] == 2
    assert res["chunk_hit@5"] == pytest.approx(0.5)
    assert res["chunk_mrr"] == pytest.approx(0.25)
    rows = {r["id"]: r for r in res["rows"]}
    assert rows["a"]["retrieved_chunks"] == ["pydoc:try#0", "pydoc:try#3"]
    assert rows["a"]["chunk_rank"] == 2 and rows["b"]["chunk_rank"] is None
    assert "chunk_rr" not in rows["c"]


def test_evaluate_retrieval_edge_cases() -> None:
    res = evaluate_retrieval([], lambda q, k: [], k=5)
    assert res["n"] == 0 and res["hit@1"] == res["hit@5"] == res["mrr"] == 0.0
    assert res["chunk_n"] == 0 and res["chunk_hit@5"] == res["chunk_mrr"] == 0.0
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
        assert set(json.loads(line)) <= {"id", "question", "sources", "evidence", "chunks"}


def _label_script() -> Any:
    spec = importlib.util.spec_from_file_location("label_eval_chunks", LABEL_SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_chunk_labels_match_the_demo_chunking() -> None:
    script = _label_script()
    chunks = {c.key: c for c in script.corpus_chunks()}
    fix = f"chunk labels are stale: run `.venv/bin/python {LABEL_SCRIPT.relative_to(ROOT)}`"
    for q in load_questions(QUESTIONS):
        assert q.chunks, f"{q.id}: no chunk labels; {fix}"
        for key in q.chunks:
            assert key in chunks, f"{q.id}: {key} is not a chunk of the corpus; {fix}"
            assert chunks[key].source in q.sources, f"{q.id}: {key} is not from its sources"
            text = normalise(chunks[key].text)
            assert any(normalise(e) in text for e in q.evidence), f"{q.id}: {key}; {fix}"
        assert q.chunks == label_chunks(q, chunks.values()), f"{q.id}: {fix}"
        # every labelled source keeps at least one labelled chunk
        assert {k.rsplit("#", 1)[0] for k in q.chunks} == set(q.sources), q.id
    assert script.main(["--check"]) == 0


def test_label_chunks() -> None:
    q = EvalQuestion(
        id="x", question="?", sources=("pydoc:a", "pydoc:b"), evidence=("Is  a NULL\noperation",)
    )
    chunks = [
        Chunk("pydoc:a", "a", 0, "nothing here"),
        Chunk("pydoc:a", "a", 1, "pass is a null operation; see"),
        Chunk("pydoc:c", "c", 0, "is a null operation"),  # not a labelled source
        Chunk("pydoc:b", "b", 2, "It IS A null   operation."),
    ]
    assert label_chunks(q, chunks) == ("pydoc:a#1", "pydoc:b#2")
    assert normalise(" A\tb\n c ") == "a b c"


def test_citation_numbers_and_validity() -> None:
    assert citation_numbers("See [2] and [1, 3], again [2] and [9].") == [2, 1, 3, 9]
    assert citation_numbers("no citations, [a] or [] or [1 2]") == []
    assert citation_valid([1, 2], 4)
    assert not citation_valid([], 4)  # citing nothing is not valid
    assert not citation_valid([1, 5], 4)  # out of range
    assert not citation_valid([0], 4)


def test_citation_precision_is_the_share_of_all_cited_passages_that_are_relevant() -> None:
    answers = [(["a#1", "b#0"], {"a#1"}), ([], {"c#0"}), (["c#0"], {"c#0", "c#1"})]
    assert citation_precision(answers) == pytest.approx(2 / 3)
    assert citation_precision([([], {"a"})]) == 0.0
    assert citation_precision([]) == 0.0


def test_content_tokens_and_faithfulness() -> None:
    assert content_tokens("The `finally` clause [1] always runs, isn\u2019t it? [2, 3]") == [
        "finally",
        "clause",
        "always",
        "runs",
    ]
    passages = ["A finally clause runs on the way out.", "Unrelated text."]
    assert faithfulness("The finally clause runs [1].", passages) == 1.0
    assert faithfulness("The finally clause explodes [1].", passages) == pytest.approx(2 / 3)
    assert faithfulness("It is the [1].", passages) == 0.0  # no content tokens
    assert faithfulness("finally", []) == 0.0


def test_latency_percentiles_and_tokens_per_second() -> None:
    assert latency_percentiles([]) == (0.0, 0.0)
    assert latency_percentiles([2.0]) == (2.0, 2.0)
    p50, p95 = latency_percentiles([1.0, 2.0, 3.0, 4.0, 100.0])
    assert p50 == 3.0 and p95 == pytest.approx(80.8)
    assert tokens_per_second([10, 30], [1.0, 3.0]) == 10.0
    assert tokens_per_second([10, None, 0, 5], [1.0, 2.0, 3.0, 0.0]) == 10.0  # unknowns skipped
    assert tokens_per_second([None], [1.0]) == 0.0


PASSAGES = {
    "try": [
        Document("The finally clause always runs.", metadata={"source": "pydoc:try", "chunk": 2}),
        Document("Loops repeat a suite.", metadata={"source": "pydoc:for", "chunk": 0}),
    ],
    "loop": [Document("A while loop repeats.", metadata={"source": "pydoc:while", "chunk": 1})],
}
REPLIES = {
    "try": "The finally clause always runs [1].",
    "loop": "It repeats forever [1][3].",
}


class FakePipeline:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def retrieve(self, question: str) -> list[Document]:
        self.calls.append(question)
        return PASSAGES[question]

    def answer(self, question: str, docs: Any = None) -> Any:
        ans = assemble_answer(question, docs, REPLIES[question])
        return ans.model_copy(update={"generation_s": 5.0, "output_tokens": 100})


def test_evaluate_answers_scores_citations_faithfulness_and_latency() -> None:
    questions = [
        {"id": "a", "question": "try", "sources": ["pydoc:try"], "chunks": ["pydoc:try#2"]},
        {"id": "b", "question": "loop", "sources": ["pydoc:while"], "chunks": ["pydoc:while#0"]},
        {"id": "c", "question": "never asked", "sources": ["pydoc:x"]},
    ]
    traced: list[str] = []

    @contextmanager
    def trace(q: EvalQuestion) -> Any:
        traced.append(q.id)
        yield

    pipeline = FakePipeline()
    res = evaluate_answers(questions, pipeline, limit=2, trace=trace)
    assert pipeline.calls == ["try", "loop"] and traced == ["a", "b"]
    assert res["answered"] == 2
    rows = {r["id"]: r for r in res["rows"]}
    assert rows["a"]["cited"] == ["pydoc:try#2"] and rows["a"]["citation_valid"]
    # [3] is out of range for one passage: the citations are invalid, [1] still counts
    assert rows["b"]["citations"] == [1, 3] and not rows["b"]["citation_valid"]
    assert rows["b"]["cited"] == ["pydoc:while#1"]
    assert res["citation_validity"] == 0.5
    assert res["citation_precision"] == 0.5  # pydoc:while#1 is not the labelled chunk
    assert res["citation_source_precision"] == 1.0
    assert rows["a"]["faithfulness"] == 1.0
    assert rows["b"]["faithfulness"] == pytest.approx(1 / 2)  # "repeats" yes, "forever" no
    assert res["faithfulness"] == pytest.approx(0.75)
    # latency is the wall time measured here; generation time and tokens are the answer's own
    latencies = [r["latency_s"] for r in res["rows"]]
    assert all(0 < s < 5.0 for s in latencies)  # the fake answers at once, not in 5 s
    assert (res["latency_p50_s"], res["latency_p95_s"]) == latency_percentiles(latencies)
    assert [(r["generation_s"], r["output_tokens"]) for r in res["rows"]] == [(5.0, 100)] * 2
    assert res["tokens_per_s"] == 20.0
    assert evaluate_answers(questions, pipeline, limit=0)["answered"] == 0
    with pytest.raises(ValueError, match="limit"):
        evaluate_answers(questions, pipeline, limit=-1)


UNMARKED = {
    "try": "The finally clause always runs. Loops repeat a suite. I hope this helps!",
    "loop": "A while loop repeats. It keeps going until the",
}


class UnmarkedPipeline(FakePipeline):
    """A model that never writes [n], like SmolLM2-135M; the second answer was cut short."""

    def answer(self, question: str, docs: Any = None) -> Any:
        reason = "length" if question == "loop" else "stop"
        return assemble_answer(question, docs, UNMARKED[question], finish_reason=reason)


def test_citations_are_measured_without_a_single_marker() -> None:
    questions = [
        {"id": "a", "question": "try", "sources": ["pydoc:try"], "chunks": ["pydoc:try#2"]},
        {"id": "b", "question": "loop", "sources": ["pydoc:while"], "chunks": ["pydoc:while#0"]},
    ]
    res = evaluate_answers(questions, UnmarkedPipeline(), limit=2)
    rows = {r["id"]: r for r in res["rows"]}
    assert rows["a"]["cited"] == ["pydoc:try#2", "pydoc:for#0"] and rows["a"]["marked"] == []
    assert rows["b"]["cited"] == ["pydoc:while#1"] and rows["b"]["relevant_given"] == []
    assert res["citation_precision"] == pytest.approx(1 / 3)  # was 0 with markers alone
    assert res["marker_citation_precision"] == 0.0
    assert res["citation_recall"] == 1.0  # the one relevant passage given was cited
    assert res["citation_validity"] == 1.0
    assert (rows["a"]["sentences"], rows["a"]["supported"]) == (3, 2)
    assert (rows["b"]["sentences"], rows["b"]["supported"]) == (1, 1)  # after trimming
    assert res["supported_sentences"] == pytest.approx(3 / 4)
    assert res["trimmed"] == 0.5 and rows["b"]["answer"] == "A while loop repeats."


def test_citation_recall_counts_the_relevant_passages_given() -> None:
    answers = [(["a", "b"], ["a", "c"]), ([], ["d"]), (["x"], [])]
    assert citation_recall(answers) == pytest.approx(1 / 3)
    assert citation_recall([(["x"], [])]) == 0.0


class BlockingPipeline(FakePipeline):
    """Answers only once `meet` threads are answering at the same time (or fails)."""

    def __init__(self, meet: threading.Barrier, busy: set[int]) -> None:
        super().__init__()
        self.meet, self.busy = meet, busy

    def answer(self, question: str, docs: Any = None) -> Any:
        assert id(self) not in self.busy, "a pipeline was used by two threads at once"
        self.busy.add(id(self))
        try:
            self.meet.wait(timeout=3)  # BrokenBarrierError unless another answers meanwhile
            return super().answer(question, docs)
        finally:
            self.busy.discard(id(self))


def test_two_pipelines_answer_two_questions_at_once_in_order() -> None:
    meet, busy = threading.Barrier(2), set[int]()
    pipelines = [BlockingPipeline(meet, busy), BlockingPipeline(meet, busy)]
    entered: list[str] = []

    @contextmanager
    def span(name: str) -> Any:
        entered.append(name)
        yield

    asked = ["try", "loop", "try", "loop"]
    spans = [lambda n=n: span(n) for n in ["a", "b", "c", "d"]]
    done = answer_questions(asked, pipelines, spans)
    assert [d.question for d in done] == asked
    assert [d.answer.text for d in done] == [REPLIES[q] for q in asked]
    assert [d.docs for d in done] == [PASSAGES[q] for q in asked]
    assert sorted(entered) == ["a", "b", "c", "d"]
    assert sorted(pipelines[0].calls + pipelines[1].calls) == sorted(asked)
    assert all(d.generation_s == 5.0 and 0 < d.latency_s < 10 for d in done)


def test_one_pipeline_answers_one_question_after_the_other() -> None:
    pipeline = BlockingPipeline(threading.Barrier(2), set())
    with pytest.raises(threading.BrokenBarrierError):  # nobody else answers meanwhile
        answer_questions(["try", "loop"], [pipeline])
    assert pipeline.calls == ["try"]  # the failure stopped the rest


def test_answering_refuses_no_pipeline_and_a_span_count_that_does_not_match() -> None:
    with pytest.raises(ValueError, match="pipelines is empty"):
        answer_questions(["try"], [])
    with pytest.raises(ValueError, match="1 spans for 2 questions"):
        answer_questions(["try", "loop"], FakePipeline(), [contextmanager(lambda: iter([None]))])
