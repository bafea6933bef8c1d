"""What a RAG answer is, and how a model's reply becomes one.

:class:`Answer` (with its :class:`Source` passages) is what :class:`dagma.lib.rag.RagPipeline`
returns. A reply is read as a :class:`Draft` when the backend filled one through structured
output or when its text is JSON, else as plain text whose ``[n]`` citations are parsed
(:mod:`dagma.lib.citations`). :func:`assemble_answer` trims an answer the token limit cut to
its last complete sentence (:mod:`dagma.lib.sentences`), attributes each sentence to the passage
that supports it best (:mod:`dagma.lib.attribution`), marks the cited sources and scores the
answer's confidence.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from langchain_core.documents import Document
from langchain_core.messages import AIMessage
from langchain_core.output_parsers import BaseOutputParser
from langchain_core.outputs import Generation
from langchain_core.utils.json import parse_json_markdown
from pydantic import BaseModel, Field, ValidationError, field_validator

from dagma.lib.attribution import SUPPORT_THRESHOLD, Attribution, attribute
from dagma.lib.citations import citation_numbers, draft_citations
from dagma.lib.embeddings import Embedder, get_embedder
from dagma.lib.sentences import split_sentences, trim_to_sentence

__all__ = [
    "SNIPPET_CHARS",
    "Answer",
    "AnswerOutputParser",
    "Attribution",
    "Draft",
    "ModelOutput",
    "Source",
    "answer_lines",
    "assemble_answer",
    "finish_reason",
    "parse_draft",
    "parse_structured_result",
    "truncate",
]

SNIPPET_CHARS = 200


class Source(BaseModel):
    """A retrieved passage; ``rank`` is its [n] label in the prompt."""

    id: str
    source: str
    score: float
    snippet: str
    rank: int = Field(ge=1)
    title: str | None = None
    cited: bool = False


class Answer(BaseModel):
    """A generated answer with its retrieved sources in retrieval order.

    ``parsed`` says how the model output was read: ``structured`` (a :class:`Draft`, through
    structured output or JSON in the text) or ``text``. ``latency_s`` is the wall time of
    :meth:`RagPipeline.answer` (retrieval included), ``generation_s`` the time in the model and
    ``output_tokens`` the tokens it generated (0 when the backend does not say).
    ``confidence`` is the retrieval heuristic of :func:`assemble_answer`, lowered to
    ``model_confidence`` when the model reports a lower one (structured output only).
    ``finish_reason`` is why generation stopped (``stop``, ``length``; ``None`` when unknown).
    ``trimmed`` says the token limit cut the answer and ``text`` ends at its last complete
    sentence (or, when none was complete, with ``…``); ``raw_text`` is the text as generated.
    ``attributions`` hold each sentence of ``text`` with the source (1-based, into
    ``sources``) that supports it best and the score, ``None`` below ``support_threshold``.
    """

    question: str
    text: str
    sources: list[Source]
    confidence: float = Field(ge=0.0, le=1.0)
    model_confidence: float | None = Field(default=None, ge=0.0, le=1.0)
    parsed: Literal["structured", "text"] = "text"
    latency_s: float = Field(default=0.0, ge=0.0)
    generation_s: float = Field(default=0.0, ge=0.0)
    output_tokens: int = Field(default=0, ge=0)
    finish_reason: str | None = None
    trimmed: bool = False
    raw_text: str = ""
    attributions: list[Attribution] = Field(default_factory=list)
    support_threshold: float = SUPPORT_THRESHOLD

    @property
    def cited_sources(self) -> list[Source]:
        """Sources the answer cites, or all sources when it cites none."""
        return [s for s in self.sources if s.cited] or list(self.sources)

    def cited_text(self) -> str:
        """``text`` with each attributed sentence followed by its ``[n]``, unless it cites it."""
        sentences = split_sentences(self.text)
        if len(sentences) != len(self.attributions):
            return self.text
        out, at = [], 0
        for sentence, attribution in zip(sentences, self.attributions, strict=True):
            out.append(self.text[at : sentence.end])
            n = attribution.source
            if n is not None and n not in citation_numbers(sentence.text):
                out.append(f" [{n}]")
            at = sentence.end
        return "".join(out) + self.text[at:]

    @property
    def tokens_per_s(self) -> float | None:
        """Generation speed, when both the tokens and the time are known."""
        if self.output_tokens and self.generation_s > 0:
            return self.output_tokens / self.generation_s
        return None


class Draft(BaseModel):
    """The answer a model fills in through structured output.

    Lenient on purpose: bad citations are dropped and a confidence that is not a number in
    [0, 1] is clipped or dropped, so only a missing answer makes a draft invalid.
    """

    answer: str = Field(description="The answer in one or two sentences, citing passages as [1].")
    citations: list[int] = Field(
        default_factory=list, description="Numbers of the passages the answer uses."
    )
    confidence: float | None = Field(
        default=None, description="How sure you are, from 0 (a guess) to 1 (certain)."
    )

    @field_validator("citations", mode="before")
    @classmethod
    def _int_citations(cls, value: Any) -> list[int]:
        return draft_citations(value)

    @field_validator("confidence", mode="before")
    @classmethod
    def _unit_confidence(cls, value: Any) -> float | None:
        try:
            return min(1.0, max(0.0, float(value)))
        except (TypeError, ValueError):
            return None


class ModelOutput(BaseModel):
    """One model reply, parsed: the answer text, its draft fields, and the raw text."""

    text: str
    parsed: Literal["structured", "text"]
    citations: list[int] = Field(default_factory=list)
    confidence: float | None = None
    raw_text: str = ""
    output_tokens: int | None = None
    finish_reason: str | None = None


def parse_draft(text: str) -> Draft | None:
    """A :class:`Draft` from JSON with an ``answer`` (or ``text``) key, else ``None``.

    The JSON may be the whole text, fenced in ```` ```json ````, embedded in prose, or cut short
    by the token limit.
    """
    start, end = text.find("{"), text.rfind("}")
    candidates = [text] if start < 0 else [text, text[start : end + 1], text[start:]]
    for candidate in candidates:
        try:
            obj = parse_json_markdown(candidate)
        except ValueError:
            continue
        if not isinstance(obj, dict):
            continue
        if "answer" not in obj and "text" in obj:
            obj = {**obj, "answer": obj["text"]}
        try:
            return Draft.model_validate(obj)
        except ValidationError:
            continue
    return None


def _from_draft(draft: Draft, raw_text: str) -> ModelOutput:
    return ModelOutput(
        text=draft.answer,
        parsed="structured",
        citations=draft.citations,
        confidence=draft.confidence,
        raw_text=raw_text,
    )


class AnswerOutputParser(BaseOutputParser[ModelOutput]):
    """Model reply -> :class:`ModelOutput`: a JSON :class:`Draft` if there is one, else the text.

    Keeps the reply's ``usage_metadata`` output token count when the backend reports one.
    """

    def parse(self, text: str) -> ModelOutput:
        draft = parse_draft(text)
        if draft is None:
            return ModelOutput(text=text, parsed="text", raw_text=text)
        return _from_draft(draft, text)

    def parse_result(self, result: list[Generation], *, partial: bool = False) -> ModelOutput:
        out = self.parse(result[0].text)
        message = getattr(result[0], "message", None)
        out.output_tokens = _output_tokens(message)
        out.finish_reason = finish_reason(message)
        return out

    @property
    def _type(self) -> str:
        return "dagma_answer"


def parse_structured_result(result: Mapping[str, Any] | BaseModel) -> ModelOutput:
    """``with_structured_output(Draft, include_raw=True)`` result -> :class:`ModelOutput`.

    A tool call whose arguments are not valid JSON, as when the token limit cut a schema-bound
    call short, is read as a draft if its ``answer`` had begun (see :func:`parse_draft`). When
    the model ignored the schema, the raw reply is parsed like plain text: its content, or else
    the ``answer`` argument of its tool call.
    """
    if isinstance(result, BaseModel):  # without include_raw
        result = {"parsed": result}
    raw = result.get("raw")
    message = raw if isinstance(raw, AIMessage) else AIMessage(content="")
    content = str(message.text)
    args = message.tool_calls[0]["args"] if message.tool_calls else {}
    cut = "" if content or args else _invalid_call_args(message)
    raw_text = content or (json.dumps(args) if args else cut)
    draft = result.get("parsed")
    if not isinstance(draft, Draft) and cut:
        draft = parse_draft(cut)
    if isinstance(draft, Draft):
        out = _from_draft(draft, raw_text)
    else:
        answer = args.get("answer")
        out = AnswerOutputParser().parse(content or (answer if isinstance(answer, str) else ""))
        out.raw_text = raw_text
    out.output_tokens = _output_tokens(message)
    out.finish_reason = finish_reason(message)
    return out


def finish_reason(message: Any) -> str | None:
    """Why a reply stopped, as its backend reports it: ``stop``, ``length``...; else ``None``.

    llama.cpp and OpenAI-compatible servers say ``finish_reason``, Ollama ``done_reason``.
    """
    metadata = getattr(message, "response_metadata", None) or {}
    reason = metadata.get("finish_reason") or metadata.get("done_reason")
    return str(reason) if reason else None


def _invalid_call_args(message: AIMessage) -> str:
    calls = message.invalid_tool_calls
    args = calls[0].get("args") if calls else None
    return args if isinstance(args, str) else ""


def _output_tokens(message: Any) -> int | None:
    usage = getattr(message, "usage_metadata", None)
    return int(usage["output_tokens"]) if usage else None


def _collapse(text: str) -> str:
    return " ".join(text.split())


def truncate(text: str, limit: int) -> str:
    """``text`` on one line, cut at a word before ``limit`` characters with an ellipsis."""
    text = _collapse(text)
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0] or text[:limit]
    return cut + "…"


def answer_lines(answer: Answer) -> list[str]:
    """``answer`` in plain lines: the question, each sentence with its ``[n]`` and score, the
    sources.

    A sentence attributed to no passage is marked ``[?]``; a trimmed answer says so. A cited
    source shows the best score of the sentences attributed to it.
    """
    lines = [f"Q: {answer.question}", "A:"]
    for a in answer.attributions:
        mark = f"[{a.source}]" if a.source is not None else "[?]"
        lines.append(f"  {_collapse(a.sentence)} {mark} ({a.score:.2f})")
    if not answer.attributions:
        lines.append(f"  {_collapse(answer.text)}")
    if answer.trimmed:
        lines.append(
            "  (trimmed: the model reached its token limit; its unfinished last sentence is "
            "left out)"
        )
    support: dict[int, float] = {}
    for a in answer.attributions:
        if a.source is not None:
            support[a.source] = max(support.get(a.source, 0.0), a.score)
    lines.append("Sources:")
    for s in answer.sources:
        cited = f", cited, support {support[s.rank]:.2f}" if s.rank in support else ""
        cited = cited or (", cited" if s.cited else "")
        lines.append(f"  [{s.rank}] {s.source} (retrieval {s.score:.3f}{cited})")
    return lines


def assemble_answer(
    question: str,
    docs: Sequence[Document],
    text: str,
    *,
    citations: Sequence[int] = (),
    model_confidence: float | None = None,
    finish_reason: str | None = None,
    embedder: Embedder | None = None,
    threshold: float = SUPPORT_THRESHOLD,
) -> Answer:
    """Build an :class:`Answer` from retrieved docs, the answer text and the draft's fields.

    When ``finish_reason`` is ``length`` the text is trimmed to its last complete sentence
    (:func:`dagma.lib.sentences.trim_to_sentence`); an unknown reason trims nothing.
    Each sentence is attributed to a passage (:func:`dagma.lib.attribution.attribute`) with
    ``embedder``, by default the lab's offline model2vec embedder.
    Cited passages: ``[n]`` in the text, ``citations``, and the passages sentences are
    attributed to, within 1..len(docs).
    Confidence heuristic: the best retrieval score among cited passages (or among all
    passages if none is cited), clipped to [0, 1]; halved when nothing is cited; 0 without docs.
    A model's own ``model_confidence`` can only lower it (the minimum of the two is kept); both
    are reported.
    """
    raw_text = text
    trimmed = False
    if finish_reason == "length":
        text, trimmed = trim_to_sentence(text)
    attributions: list[Attribution] = []
    if docs:
        embedder = embedder or get_embedder("model2vec")
        attributions = attribute(text, [d.page_content for d in docs], embedder, threshold)
    cited = set(citation_numbers(text, len(docs))) | {c for c in citations if 1 <= c <= len(docs)}
    cited |= {a.source for a in attributions if a.source is not None}
    sources = [
        Source(
            id=str(d.metadata.get("id", "")),
            source=str(d.metadata.get("source", "")),
            score=float(d.metadata.get("score", 0.0)),
            snippet=truncate(d.page_content, SNIPPET_CHARS),
            rank=i,
            title=d.metadata.get("title"),
            cited=i in cited,
        )
        for i, d in enumerate(docs, start=1)
    ]
    if not sources:
        confidence = 0.0
    else:
        pool = [s for s in sources if s.cited] or sources
        confidence = min(1.0, max(0.0, max(s.score for s in pool)))
        if not cited:
            confidence *= 0.5
    if model_confidence is not None:
        confidence = min(confidence, model_confidence)
    return Answer(
        question=question,
        text=text,
        sources=sources,
        confidence=confidence,
        model_confidence=model_confidence,
        finish_reason=finish_reason,
        trimmed=trimmed,
        raw_text=raw_text,
        attributions=attributions,
        support_threshold=threshold,
    )
