from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest
from langchain_core.documents import Document
from langchain_core.language_models import FakeListChatModel
from langchain_core.messages import AIMessage
from langchain_core.runnables import RunnableLambda
from pydantic import Field

from dagma.lib.citations import citation_numbers
from dagma.lib.llm import LLMError, LLMSettings, chat_model
from dagma.lib.rag import (
    NO_CONTEXT_ANSWER,
    Answer,
    AnswerOutputParser,
    Draft,
    RagPipeline,
    StoreRetriever,
    assemble_answer,
    build_rag_chain,
    format_context,
    parse_draft,
    parse_structured_result,
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


def test_citation_numbers_within_the_passages() -> None:
    assert citation_numbers("see [2] and [1, 3], again [2]; [9] [0] [x]", 3) == [2, 1, 3]
    assert citation_numbers("no citations", 3) == []
    assert citation_numbers("[1]", 0) == []


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
    assert ans.question == QUESTION and ans.text.strip()
    assert ans.sources and {s.id for s in ans.sources} <= set(CORPUS)
    assert ans.sources[0].id == "c5"  # retrieval order is kept
    assert [s.score for s in ans.sources] == sorted((s.score for s in ans.sources), reverse=True)
    # the retrieval heuristic: the best score among cited passages, else half the best score
    cited = [s.score for s in ans.sources if s.cited]
    best = max(cited) if cited else max(s.score for s in ans.sources) / 2
    assert ans.confidence == pytest.approx(best)
    assert ans.parsed == "text" and ans.model_confidence is None
    assert ans.output_tokens == MAX_TOKENS  # SmolLM2 rambles up to the limit
    assert 0 < ans.generation_s <= ans.latency_s
    assert ans.tokens_per_s == pytest.approx(ans.output_tokens / ans.generation_s)
    assert Answer.model_validate_json(ans.model_dump_json()) == ans


def test_stream_matches_answer(pipeline: RagPipeline, first: Answer) -> None:
    chunks = list(pipeline.stream(QUESTION))
    assert len(chunks) >= 2 and all(chunks)  # no empty chunk is passed on
    assert "".join(chunks) == first.raw_text  # as generated; first.text may be trimmed
    docs = pipeline.retrieve(QUESTION)
    assert "".join(pipeline.stream(QUESTION, docs=docs)) == "".join(chunks)
    streamed = pipeline.assemble(QUESTION, docs, "".join(chunks))
    assert (streamed.text, streamed.trimmed, streamed.attributions) == (
        first.text,
        first.trimmed,
        first.attributions,
    )


def test_lcel_chain_matches_pipeline(pipeline: RagPipeline, first: Answer) -> None:
    chain = build_rag_chain(pipeline.retriever, pipeline.model)
    assert chain.invoke(QUESTION) == first.raw_text


TIMINGS = {"latency_s", "generation_s"}


def test_deterministic_in_process(pipeline: RagPipeline, first: Answer) -> None:
    pipeline.answer("What does the pass statement do?")  # replaces llama.cpp's cached prompt
    again = pipeline.answer(QUESTION)
    assert again.model_dump(exclude=TIMINGS) == first.model_dump(exclude=TIMINGS)


def test_local_generation_is_serialised_across_threads(
    pipeline: RagPipeline, first: Answer
) -> None:
    # one llama.cpp context: without the lock, concurrent calls corrupt each other's output
    with ThreadPoolExecutor(max_workers=3) as pool:
        answers = list(pool.map(lambda _: pipeline.answer(QUESTION).text, range(2)))
        streamed = pool.submit(lambda: "".join(pipeline.stream(QUESTION)))
        assert answers == [first.text] * 2 and streamed.result() == first.raw_text


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
    assert (ans.output_tokens, ans.generation_s, ans.parsed) == (0, 0.0, "text")
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


# --- draft parsing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "answer", "citations", "confidence"),
    [
        (
            '{"answer": "NameError [1]", "citations": [1], "confidence": 0.9}',
            "NameError [1]",
            [1],
            0.9,
        ),
        ('```json\n{"answer": "fenced", "citations": ["2", "x"]}\n```', "fenced", [2], None),
        # Markers as the text writes them, read by the same parser; other items are dropped.
        (
            '{"answer": "marked", "citations": ["[3]", "[1, 2]", true, 2.5, "-1"]}',
            "marked",
            [3, 1, 2],
            None,
        ),
        ('```\n{"answer": "bare fence"}\n```', "bare fence", [], None),
        (
            'Sure! Here it is: {"answer": "embedded", "confidence": 3.4} Hope it helps.',
            "embedded",
            [],
            1.0,
        ),
        ('{"text": "text key", "citations": 1, "confidence": "high"}', "text key", [1], None),
        ('{"answer": "cut short by the token li', "cut short by the token li", [], None),
    ],
)
def test_parse_draft_json(
    text: str, answer: str, citations: list[int], confidence: float | None
) -> None:
    draft = parse_draft(text)
    assert draft == Draft(answer=answer, citations=citations, confidence=confidence)
    out = AnswerOutputParser().parse(text)
    assert (out.text, out.parsed, out.citations, out.raw_text) == (
        answer,
        "structured",
        citations,
        text,
    )


@pytest.mark.parametrize(
    "text",
    [
        "NameError is raised [1].",
        "[1] (pydoc:del) Deleting a name removes its binding.",
        '{"citations": [1]}',  # no answer
        "d = {'a': 1}",
        "[1, 2]",
        "",
        "}{",
    ],
)
def test_parse_draft_garbage_falls_back_to_text(text: str) -> None:
    assert parse_draft(text) is None
    out = AnswerOutputParser().parse(text)
    assert (out.text, out.parsed, out.citations, out.confidence) == (text, "text", [], None)


def test_answer_parser_reads_usage_from_the_message() -> None:
    message = AIMessage(
        content="Plain [1].",
        usage_metadata={"input_tokens": 10, "output_tokens": 4, "total_tokens": 14},
    )
    out = AnswerOutputParser().invoke(message)
    assert (out.text, out.parsed, out.output_tokens) == ("Plain [1].", "text", 4)
    assert AnswerOutputParser().invoke(AIMessage(content="x")).output_tokens is None


def test_parse_structured_result() -> None:
    usage = {"input_tokens": 1, "output_tokens": 7, "total_tokens": 8}
    call = {"name": "Draft", "args": {"answer": "From the tool [2]", "confidence": [1]}, "id": "1"}
    raw = AIMessage(content="", tool_calls=[call], usage_metadata=usage)  # type: ignore[arg-type]
    ok = parse_structured_result(
        {"raw": raw, "parsed": Draft(answer="A", citations=[1]), "parsing_error": None}
    )
    assert (ok.text, ok.parsed, ok.citations, ok.output_tokens) == ("A", "structured", [1], 7)
    # the schema was not honoured: the tool call's answer, or the content, read as text
    failed = parse_structured_result({"raw": raw, "parsed": None, "parsing_error": ValueError()})
    assert (failed.text, failed.parsed, failed.output_tokens) == ("From the tool [2]", "text", 7)
    content = AIMessage(content='```json\n{"answer": "In content"}\n```')
    assert parse_structured_result({"raw": content, "parsed": None}).parsed == "structured"
    plain = parse_structured_result({"raw": AIMessage(content="Just text"), "parsed": None})
    assert (plain.text, plain.parsed, plain.output_tokens) == ("Just text", "text", None)
    assert parse_structured_result(Draft(answer="no raw")).text == "no raw"


@pytest.mark.parametrize(
    ("args", "text", "parsed"),
    [
        ('{ "answer": "NameError [1]", "citations": [1', "NameError [1]", "structured"),
        ('{ "answer": "Deleting an unbound na', "Deleting an unbound na", "structured"),
        ('{ "answer":', "", "text"),  # nothing usable: answer() asks again for plain text
    ],
)
def test_parse_structured_result_reads_a_call_cut_by_the_token_limit(
    args: str, text: str, parsed: str
) -> None:
    # what langchain-openai makes of llama.cpp's schema-bound tool call stopped by max_tokens
    call = {"name": "Draft", "args": args, "id": "1", "error": None, "type": "invalid_tool_call"}
    raw = AIMessage(content="", invalid_tool_calls=[call])  # type: ignore[list-item]
    out = parse_structured_result({"raw": raw, "parsed": None, "parsing_error": None})
    assert (out.text, out.parsed, out.raw_text) == (text, parsed, args)
    assert out.citations == ([1] if "citations" in args else [])


def test_assemble_answer_with_draft_fields() -> None:
    docs = [_doc("a", 0.8), _doc("b", 0.6), _doc("c", 0.9)]
    ans = assemble_answer("q", docs, "It is A.", citations=[1, 7], model_confidence=0.3)
    assert [s.cited for s in ans.sources] == [True, False, False]
    assert ans.model_confidence == 0.3 and ans.confidence == pytest.approx(0.3)  # min of the two
    sure = assemble_answer("q", docs, "It is B [2].", citations=[3], model_confidence=1.0)
    assert [s.cited for s in sure.sources] == [False, True, True]
    assert sure.confidence == pytest.approx(0.9)  # the model cannot raise it


# --- pipeline with stand-in models --------------------------------------------------------------


def fake_pipeline(model: Any, **kwargs: Any) -> RagPipeline:
    return RagPipeline(StoreRetriever(search=keyword_search, k=3), model, **kwargs)


def test_plain_text_model_answers_json_or_text() -> None:
    reply = '{"answer": "NameError [1]", "citations": [1], "confidence": 0.4}'
    ans = fake_pipeline(FakeListChatModel(responses=[reply])).answer(QUESTION)
    assert (ans.text, ans.parsed, ans.model_confidence) == ("NameError [1]", "structured", 0.4)
    assert ans.sources[0].cited and ans.confidence == pytest.approx(0.4)
    assert ans.output_tokens == 0  # unknown for this model
    text = fake_pipeline(FakeListChatModel(responses=["It is NameError [1]."])).answer(QUESTION)
    assert (text.text, text.parsed, text.sources[0].cited) == ("It is NameError [1].", "text", True)


class StructuredFake(FakeListChatModel):
    """Plain replies from ``responses``; structured output returns ``draft`` as raw + parsed."""

    draft: dict[str, Any] = Field(default_factory=dict)
    methods: list[str] = Field(default_factory=list)

    def with_structured_output(
        self, schema: Any, *, include_raw: bool = False, **kwargs: Any
    ) -> Any:
        self.methods.append(kwargs["method"])
        return RunnableLambda(lambda _: self.draft)


def test_structured_output_and_its_fallbacks() -> None:
    usage = {"input_tokens": 1, "output_tokens": 5, "total_tokens": 6}
    good = {
        "raw": AIMessage(content="", usage_metadata=usage),  # type: ignore[arg-type]
        "parsed": Draft(answer="NameError", citations=[1], confidence=0.8),
    }
    model = StructuredFake(responses=["streamed"], draft=good)
    pipeline = fake_pipeline(model, structured_method="json_schema")
    ans = pipeline.answer(QUESTION)
    assert model.methods == ["json_schema"]
    assert (ans.text, ans.parsed, ans.output_tokens) == ("NameError", "structured", 5)
    assert ans.sources[0].cited and ans.model_confidence == 0.8
    assert "".join(pipeline.stream(QUESTION)) == "streamed"  # streaming stays plain text
    # an empty draft: the answer is generated again as plain text
    empty = StructuredFake(
        responses=["Plain [2]."], draft={"raw": AIMessage(content=""), "parsed": None}
    )
    ans = fake_pipeline(empty, structured_method="json_schema").answer(QUESTION)
    assert (ans.text, ans.parsed) == ("Plain [2].", "text")
    assert fake_pipeline(empty).structured_method is None  # "auto": no native method known


def test_unreachable_backend_is_a_clear_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        "DAGMA_LLM": "openai",
        "OPENAI_BASE_URL": f"http://127.0.0.1:{port}/v1",
        "DAGMA_LLM_MODEL": "m",
    }
    pipeline = fake_pipeline(chat_model(LLMSettings.from_env(env)))
    assert pipeline.structured_method == "function_calling"
    match = rf"DAGMA_LLM=openai: cannot reach OPENAI_BASE_URL=http://127.0.0.1:{port}/v1 \(connection refused\)"
    with pytest.raises(LLMError, match=match):
        pipeline.answer(QUESTION)
    with pytest.raises(LLMError, match=match):
        list(pipeline.stream(QUESTION))


def test_an_answer_is_traced_and_measured_by_stage(monkeypatch) -> None:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from prometheus_client import REGISTRY

    from dagma.lib.telemetry import metrics, tracing

    monkeypatch.setenv(metrics.PUSH_ENV, "http://127.0.0.1:9")  # metrics on, as when pushing
    exporter = InMemorySpanExporter()
    tracing.configure(exporter)

    def count(stage: str) -> float:
        name = "dagma_rag_duration_seconds_count"
        return REGISTRY.get_sample_value(name, {"stage": stage}) or 0.0

    before = {stage: count(stage) for stage in ("retrieve", "generate", "parse", "total")}
    try:
        reply = "It is NameError [1]."
        fake_pipeline(FakeListChatModel(responses=[reply])).answer(QUESTION)
    finally:
        tracing.shutdown()
    assert {stage: count(stage) - n for stage, n in before.items()} == dict.fromkeys(before, 1.0)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    root = spans["rag.answer"]
    for stage in ("rag.retrieve", "rag.generate", "rag.parse"):
        assert spans[stage].parent.span_id == root.context.span_id, stage
    assert spans["rag.retrieve"].attributes["dagma.rag.passages"] >= 1
