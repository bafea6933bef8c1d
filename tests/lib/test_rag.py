from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from langchain_core.documents import Document

from dagma.lib.llm import LLMSettings, chat_model
from dagma.lib.rag import (
    NO_CONTEXT_ANSWER,
    Answer,
    RagPipeline,
    StoreRetriever,
    assemble_answer,
    build_rag_chain,
    cited_numbers,
    format_context,
    validate_question,
)

MAX_TOKENS = 24  # keeps each generation well under a second

CORPUS: dict[str, tuple[str, str]] = {
    "c1": (
        "pydoc:pass",
        "pass is a null operation: nothing happens when it executes. "
        "It is a placeholder where a statement is required syntactically.",
    ),
    "c2": (
        "pydoc:lambda",
        "Lambda expressions create anonymous functions. Functions created "
        "with lambda expressions cannot contain statements or annotations.",
    ),
    "c3": (
        "pydoc:break",
        "break terminates the nearest enclosing loop. If a for loop is "
        "terminated by break, the loop control target keeps its current value.",
    ),
    "c4": (
        "pydoc:assert",
        "When optimization is requested with the -O option, the code "
        "generator emits no code for an assert statement.",
    ),
    "c5": (
        "pydoc:del",
        "Deleting a name removes its binding from the namespace. If the name "
        "is unbound, a NameError exception is raised.",
    ),
    "c6": (
        "pydoc:nonlocal",
        "The nonlocal statement makes names refer to previously bound "
        "variables in the nearest enclosing scope excluding globals.",
    ),
}
STOP = {"a", "an", "the", "is", "of", "in", "to", "it", "what", "does", "do", "when", "with"}


@dataclass(frozen=True)
class Hit:
    id: str
    score: float
    payload: dict[str, Any] = field(default_factory=dict)


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z_]+", text.lower())) - STOP


def keyword_search(query: str, k: int) -> list[Hit]:
    """Score = fraction of query words found in the chunk; ties broken by id."""
    qw = _words(query)
    scored = sorted(
        ((len(qw & _words(text)) / max(1, len(qw)), cid) for cid, (_, text) in CORPUS.items()),
        key=lambda x: (-x[0], x[1]),
    )
    return [
        Hit(cid, s, {"text": CORPUS[cid][1], "source": CORPUS[cid][0], "chunk": 0})
        for s, cid in scored[:k]
        if s > 0
    ]


def make_pipeline() -> RagPipeline:
    model = chat_model(LLMSettings(max_tokens=MAX_TOKENS))
    return RagPipeline(StoreRetriever(search=keyword_search, k=3), model)


@pytest.fixture(scope="module")
def pipeline() -> RagPipeline:
    return make_pipeline()


QUESTION = "What error is raised when you delete a name that is unbound?"


@pytest.fixture(scope="module")
def first(pipeline: RagPipeline) -> Answer:
    """The first answer to QUESTION; later calls must reproduce it exactly."""
    return pipeline.answer(QUESTION)


# --- pure parts -------------------------------------------------------------------------------


def test_store_retriever_maps_hits_to_documents() -> None:
    calls: list[tuple[str, int]] = []

    def search(q: str, k: int) -> Sequence[Hit]:
        calls.append((q, k))
        return keyword_search(q, 10)  # more than k: the retriever truncates

    query = "lambda functions statement nearest loop"
    docs = StoreRetriever(search=search, k=2).invoke(query)
    assert calls == [(query, 2)]
    assert [d.metadata["id"] for d in docs] == ["c2", "c3"]
    d = docs[0]
    assert isinstance(d, Document) and d.page_content == CORPUS["c2"][1]
    assert d.metadata["source"] == "pydoc:lambda" and d.metadata["text"] == d.page_content
    assert d.metadata["score"] == pytest.approx(0.4) and d.metadata["chunk"] == 0


@pytest.mark.parametrize(
    ("question", "match"),
    [
        ("", "question is empty"),
        ("   \n\t", "question is empty"),
        ("x" * 1001, "too long: 1001 characters, the limit is 1000"),
    ],
)
def test_validate_question_errors(question: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        validate_question(question)


def test_validate_question_ok_and_custom_limit() -> None:
    assert validate_question("  why?  ") == "why?"
    assert validate_question("x" * 1000) == "x" * 1000
    with pytest.raises(ValueError, match="limit is 5"):
        validate_question("abcdef", max_chars=5)
    with pytest.raises(ValueError, match="must be text"):
        validate_question(None)  # type: ignore[arg-type]


def test_cited_numbers() -> None:
    assert cited_numbers("see [2] and [1, 3], again [2]; [9] [0] [x]", 3) == [2, 1, 3]
    assert cited_numbers("no citations", 3) == []
    assert cited_numbers("[1]", 0) == []


def _doc(i: str, score: float, text: str = "t") -> Document:
    return Document(page_content=text, metadata={"id": i, "source": f"s{i}", "score": score})


def test_assemble_answer_confidence_and_citations() -> None:
    docs = [_doc("a", 0.8, "word " * 100), _doc("b", 0.6), _doc("c", 1.7)]
    cited = assemble_answer("q", docs, "It is B [2].")
    assert [s.id for s in cited.sources] == ["a", "b", "c"]
    assert [s.rank for s in cited.sources] == [1, 2, 3]
    assert [s.cited for s in cited.sources] == [False, True, False]
    assert [s.id for s in cited.cited_sources] == ["b"]
    assert cited.confidence == pytest.approx(0.6)
    uncited = assemble_answer("q", docs, "It is B.")
    assert uncited.confidence == pytest.approx(0.5)  # clipped to 1, halved
    assert len(uncited.cited_sources) == 3
    assert len(cited.sources[0].snippet) <= 201
    assert assemble_answer("q", [], NO_CONTEXT_ANSWER).confidence == 0.0
    neg = assemble_answer("q", [_doc("a", -0.3)], "x [1]")
    assert neg.confidence == 0.0


def test_format_context_caps_passages() -> None:
    text = format_context([_doc("a", 1, "alpha " * 200), _doc("b", 1, "beta")], max_chars=50)
    first, second = text.split("\n\n")
    assert first.startswith("[1] (sa) alpha") and len(first) < 70
    assert second == "[2] (sb) beta"


# --- real model -------------------------------------------------------------------------------


def test_answer(first: Answer) -> None:
    ans = first
    assert isinstance(ans, Answer)
    assert ans.question == QUESTION and ans.text.strip()
    assert ans.sources and {s.id for s in ans.sources} <= set(CORPUS)
    assert ans.sources[0].id == "c5"  # retrieval order is kept
    assert [s.score for s in ans.sources] == sorted((s.score for s in ans.sources), reverse=True)
    assert 0.0 <= ans.confidence <= 1.0
    assert Answer.model_validate_json(ans.model_dump_json()) == ans


def test_stream_matches_answer(pipeline: RagPipeline, first: Answer) -> None:
    chunks = list(pipeline.stream(QUESTION))
    assert len(chunks) >= 2 and all(isinstance(c, str) for c in chunks)
    assert "".join(chunks) == first.text
    docs = pipeline.retrieve(QUESTION)
    assert "".join(pipeline.stream(QUESTION, docs=docs)) == "".join(chunks)


def test_lcel_chain_matches_pipeline(pipeline: RagPipeline, first: Answer) -> None:
    chain = build_rag_chain(pipeline.retriever, pipeline.model)
    assert chain.invoke(QUESTION) == first.text


def test_deterministic_in_process(pipeline: RagPipeline, first: Answer) -> None:
    pipeline.answer("What does the pass statement do?")  # replaces llama.cpp's cached prompt
    assert pipeline.answer(QUESTION) == first


def test_deterministic_across_processes(first: Answer) -> None:
    code = (
        "import importlib.util, json, sys\n"
        f"spec = importlib.util.spec_from_file_location('rag_test_mod', {__file__!r})\n"
        "mod = importlib.util.module_from_spec(spec); sys.modules[spec.name] = mod\n"
        "spec.loader.exec_module(mod)\n"
        f"print(json.dumps(mod.make_pipeline().answer({QUESTION!r}).text))\n"
    )
    out = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == first.text


def test_no_hits_skips_model(pipeline: RagPipeline) -> None:
    ans = pipeline.answer("zzz qqq")
    assert ans.text == NO_CONTEXT_ANSWER and ans.sources == [] and ans.confidence == 0.0
    assert list(pipeline.stream("zzz qqq")) == [NO_CONTEXT_ANSWER]


def test_invalid_question_is_rejected(pipeline: RagPipeline) -> None:
    with pytest.raises(ValueError, match="question is empty"):
        pipeline.answer("  ")
    with pytest.raises(ValueError, match="too long"):
        list(pipeline.stream("x" * 2000))


def test_passages_are_capped(pipeline: RagPipeline) -> None:
    docs = [_doc(str(i), 1.0, f"passage {i}") for i in range(6)]
    assert format_context(docs, max_passages=4).count("\n\n") == 3
    wide = RagPipeline(StoreRetriever(search=keyword_search, k=6), pipeline.model, max_passages=2)
    assert len(wide.retrieve("nearest enclosing loop scope name statement")) == 2


def test_context_overflow_is_a_clear_error(pipeline: RagPipeline) -> None:
    # digits tokenize ~1 token per char, so this cannot fit n_ctx=2048
    docs = [_doc(str(i), 1.0, "7" * 600) for i in range(4)]
    with pytest.raises(ValueError, match="does not fit the model's context window"):
        pipeline.answer("9" * 1000, docs=docs)
