"""Retrieval-augmented answering over a vector store with a LangChain (LCEL) chain.

``retriever -> prompt -> model -> parser``. :meth:`RagPipeline.stream` yields plain text;
:meth:`RagPipeline.answer` asks backends with native structured output (OpenAI-compatible,
Ollama) for a :class:`Draft` and falls back to the raw text. The local SmolLM2-135M answers in
plain text: forced into JSON it fills the schema with wrong answers and invalid citations. Its
text is still read as a draft if it happens to be JSON, else citations like ``[2]`` are parsed.
What an answer is and how a reply is read live in :mod:`dagma.lib.answers` (re-exported here);
this module is the retriever, the prompt, the chains and the pipeline.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.exceptions import ContextOverflowError
from langchain_core.language_models import BaseChatModel
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import Runnable, RunnableLambda, RunnableParallel, RunnablePassthrough
from langchain_core.vectorstores.utils import maximal_marginal_relevance
from pydantic import Field, SkipValidation, model_validator

from dagma.lib.answers import (
    Answer,
    AnswerOutputParser,
    Draft,
    ModelOutput,
    Source,
    assemble_answer,
    parse_draft,
    parse_structured_result,
    truncate,
)
from dagma.lib.embeddings import Embedder
from dagma.lib.llm import backend_errors, count_output_tokens, model_lock, structured_output_method
from dagma.lib.telemetry import metrics
from dagma.lib.telemetry.timing import timed

__all__ = [
    "MAX_QUESTION_CHARS",
    "NO_CONTEXT_ANSWER",
    "Answer",
    "AnswerOutputParser",
    "Draft",
    "Hit",
    "ModelOutput",
    "RagPipeline",
    "Source",
    "StoreRetriever",
    "assemble_answer",
    "build_answer_chain",
    "build_draft_chain",
    "build_rag_chain",
    "format_context",
    "hit_to_document",
    "parse_draft",
    "parse_structured_result",
    "validate_question",
]

MAX_QUESTION_CHARS = 1000
# 4 passages x 600 chars (~700 tokens) + a 1000-char question + 200 new tokens fit n_ctx=2048.
MAX_PASSAGES = 4
CONTEXT_CHARS = 600
NO_CONTEXT_ANSWER = "I don't know: no relevant passages were found."

# SmolLM2-135M stays closer to the passages when they sit in the user turn, not the system one.
SYSTEM_PROMPT = (
    "Answer the question using only the numbered context. "
    "Cite the passages you use like [1]. If the context lacks the answer, say you don't know. "
    "Be brief."
)
RAG_PROMPT = ChatPromptTemplate.from_messages(
    [("system", SYSTEM_PROMPT), ("human", "Context:\n{context}\n\nQuestion: {question}")]
)


class Hit(Protocol):
    """A search hit from the vector store (duck-typed)."""

    id: Any
    score: float
    payload: Mapping[str, Any]


class StoreRetriever(BaseRetriever):
    """LangChain retriever over a ``search(query, k[, filter=...]) -> hits`` callable.

    ``filter`` (payload key -> value, e.g. ``{"source": "pydoc:try"}``) is passed to ``search``
    when set. With ``mmr`` it fetches ``fetch_k`` candidates and keeps ``k`` by maximal marginal
    relevance (``lambda_mult``: 1 = relevance only, 0 = diversity only), comparing texts
    re-embedded with ``embedder`` (cheap with the static default embedder, and store-agnostic).
    """

    search: Callable[..., Sequence[Any]]
    k: int = Field(default=4, ge=1)
    filter: dict[str, Any] | None = None
    mmr: bool = False
    fetch_k: int = Field(default=20, ge=1)
    lambda_mult: float = Field(default=0.5, ge=0.0, le=1.0)
    embedder: SkipValidation[Embedder | None] = None

    @model_validator(mode="after")
    def _mmr_needs_embedder(self) -> StoreRetriever:
        if self.mmr and self.embedder is None:
            raise ValueError("mmr=True needs an embedder to compare the candidate passages")
        return self

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun
    ) -> list[Document]:
        n = max(self.k, self.fetch_k) if self.mmr else self.k
        args = {} if self.filter is None else {"filter": self.filter}
        hits = list(self.search(query, n, **args))[:n]
        if self.mmr and len(hits) > self.k:
            hits = [hits[i] for i in self._mmr(query, hits)]
        return [hit_to_document(h) for h in hits[: self.k]]

    def _mmr(self, query: str, hits: list[Any]) -> list[int]:
        if self.embedder is None:
            raise ValueError("MMR needs an embedder: pass embedder= to the retriever")
        texts = [str(h.payload.get("text", "")) for h in hits]
        vectors = self.embedder.embed([query, *texts])
        return maximal_marginal_relevance(
            vectors[0], vectors[1:].tolist(), lambda_mult=self.lambda_mult, k=self.k
        )


def hit_to_document(hit: Hit) -> Document:
    """``Document`` with the hit's text as content and payload + id + score as metadata."""
    payload = dict(hit.payload)
    return Document(
        page_content=str(payload.get("text", "")),
        metadata={**payload, "id": str(hit.id), "score": float(hit.score)},
    )


def validate_question(question: str, max_chars: int = MAX_QUESTION_CHARS) -> str:
    """Return the stripped question or raise ``ValueError`` saying what is wrong."""
    if not isinstance(question, str):
        raise ValueError(f"question must be text, got {type(question).__name__}")
    q = question.strip()
    if not q:
        raise ValueError(f"question is empty: type a question of at most {max_chars} characters")
    if len(q) > max_chars:
        raise ValueError(
            f"question is too long: {len(q)} characters, the limit is {max_chars}; shorten it"
        )
    return q


def format_context(
    docs: Sequence[Document], max_chars: int = CONTEXT_CHARS, max_passages: int = MAX_PASSAGES
) -> str:
    """Numbered passages ``[n] (source) text``: the first ``max_passages``, each capped."""
    return "\n\n".join(
        f"[{i}] ({d.metadata.get('source', '?')}) {truncate(d.page_content, max_chars)}"
        for i, d in enumerate(docs[:max_passages], start=1)
    )


def _prompt_inputs(max_chars: int, max_passages: int) -> Runnable[dict[str, Any], dict[str, str]]:
    def to_prompt_inputs(x: dict[str, Any]) -> dict[str, str]:
        context = format_context(x["docs"], max_chars, max_passages)
        return {"question": x["question"], "context": context}

    return RunnableLambda(to_prompt_inputs)


def build_answer_chain(
    model: BaseChatModel, max_chars: int = CONTEXT_CHARS, max_passages: int = MAX_PASSAGES
) -> Runnable[dict[str, Any], str]:
    """``{"question", "docs"}`` -> prompt -> model -> text."""
    return _prompt_inputs(max_chars, max_passages) | RAG_PROMPT | model | StrOutputParser()


def build_draft_chain(
    model: BaseChatModel,
    method: str | None = None,
    max_chars: int = CONTEXT_CHARS,
    max_passages: int = MAX_PASSAGES,
) -> Runnable[dict[str, Any], ModelOutput]:
    """``{"question", "docs"}`` -> prompt -> model -> :class:`ModelOutput`.

    With a ``method`` the model fills a :class:`Draft` through ``with_structured_output``
    (falling back to its raw reply); without, its text goes through :class:`AnswerOutputParser`.
    """
    head = _prompt_inputs(max_chars, max_passages) | RAG_PROMPT
    if method is None:
        return head | model | AnswerOutputParser()
    structured = model.with_structured_output(Draft, method=method, include_raw=True)
    return head | structured | RunnableLambda(parse_structured_result)


def build_rag_chain(
    retriever: BaseRetriever,
    model: BaseChatModel,
    max_chars: int = CONTEXT_CHARS,
    max_passages: int = MAX_PASSAGES,
) -> Runnable[str, str]:
    """LCEL chain: question -> retriever -> prompt -> model -> ``StrOutputParser``."""
    inputs = RunnableParallel(docs=retriever, question=RunnablePassthrough())
    return inputs | build_answer_chain(model, max_chars, max_passages)


class RagPipeline:
    """Question answering over a retriever with a chat model.

    ``stream`` yields the raw text chunks. ``answer`` returns an :class:`Answer`; with
    ``structured_method="auto"`` it uses the backend's native structured output (see
    :func:`dagma.lib.llm.structured_output_method`), ``None`` forces plain text, or name a
    ``with_structured_output`` method. In plain text, ``answer(q).raw_text`` equals the streamed
    text unless the reply is JSON, and ``answer(q).text`` is the same text trimmed to its last
    complete sentence when the token limit cut it; :meth:`assemble` makes the same
    :class:`Answer` from a streamed text. ``embedder`` attributes sentences to passages
    (default: the lab's model2vec embedder). With the local model (temperature 0, i.e. greedy) the same
    question over the same store gives the same text; generation on one llama.cpp context is
    serialised across threads by :func:`dagma.lib.llm.model_lock`. Unreachable remote backends
    raise :class:`dagma.lib.llm.LLMError` naming the setting to fix.
    """

    def __init__(
        self,
        retriever: BaseRetriever,
        model: BaseChatModel,
        *,
        structured_method: str | None = "auto",
        max_question_chars: int = MAX_QUESTION_CHARS,
        context_chars: int = CONTEXT_CHARS,
        max_passages: int = MAX_PASSAGES,
        embedder: Embedder | None = None,
    ) -> None:
        self.retriever = retriever
        self.model = model
        self.embedder = embedder
        self.max_question_chars = max_question_chars
        self.max_passages = max_passages
        if structured_method == "auto":
            structured_method = structured_output_method(model)
        self.structured_method = structured_method
        self.answer_chain = build_answer_chain(model, context_chars, max_passages)
        self.text_draft_chain = build_draft_chain(model, None, context_chars, max_passages)
        self.draft_chain = build_draft_chain(model, structured_method, context_chars, max_passages)
        self.chain = build_rag_chain(retriever, model, context_chars, max_passages)

    def retrieve(self, question: str) -> list[Document]:
        """Validated question -> the first ``max_passages`` retrieved documents, best first."""
        q = validate_question(question, self.max_question_chars)
        with timed("rag.retrieve", "dagma_rag_duration_seconds", stage="retrieve") as span:
            docs = self.retriever.invoke(q)[: self.max_passages]
            if span is not None:
                span.set_attribute("dagma.rag.passages", len(docs))
        return docs

    def stream(self, question: str, docs: Sequence[Document] | None = None) -> Iterator[str]:
        """Yield answer text chunks; pass ``docs`` (from :meth:`retrieve`) to skip retrieval.

        The question is validated and retrieval runs before the first chunk is requested.
        """
        q = validate_question(question, self.max_question_chars)
        docs = self.retrieve(q) if docs is None else list(docs)[: self.max_passages]
        return self._stream(q, docs)

    def _stream(self, question: str, docs: list[Document]) -> Iterator[str]:
        if not docs:
            yield NO_CONTEXT_ANSWER
            return
        started = time.perf_counter()
        with self._generating():
            for chunk in self.answer_chain.stream({"question": question, "docs": docs}):
                if chunk:
                    yield chunk
        # No span here: a generator's span would outlive the context of the caller that resumes it.
        metrics.record(
            "dagma_rag_duration_seconds", time.perf_counter() - started, stage="generate"
        )

    def answer(self, question: str, docs: Sequence[Document] | None = None) -> Answer:
        """Retrieve, generate and return an :class:`Answer` with sources, confidence, timings."""
        with timed("rag.answer", "dagma_rag_duration_seconds", stage="total") as span:
            answer = self._answer(question, docs)
            if span is not None:
                span.set_attribute("dagma.rag.output_tokens", answer.output_tokens or 0)
                span.set_attribute("dagma.rag.finish_reason", answer.finish_reason or "")
        return answer

    def _answer(self, question: str, docs: Sequence[Document] | None) -> Answer:
        start = time.perf_counter()
        q = validate_question(question, self.max_question_chars)
        docs = self.retrieve(q) if docs is None else list(docs)[: self.max_passages]
        if not docs:
            ans = assemble_answer(q, docs, NO_CONTEXT_ANSWER)
            return ans.model_copy(update={"latency_s": time.perf_counter() - start})
        inputs = {"question": q, "docs": docs}
        generating = timed("rag.generate", "dagma_rag_duration_seconds", stage="generate")
        with self._generating(), generating:
            generation_start = time.perf_counter()
            out = self.draft_chain.invoke(inputs)
            tokens = _count(self.model, out)
            if not out.text.strip() and self.structured_method is not None:
                out = self.text_draft_chain.invoke(inputs)  # nothing usable in the draft
                tokens += _count(self.model, out)
            generation_s = time.perf_counter() - generation_start
        metrics.record("dagma_rag_tokens", tokens, kind="completion")
        with timed("rag.parse", "dagma_rag_duration_seconds", stage="parse"):
            ans = assemble_answer(
                q,
                docs,
                out.text,
                citations=out.citations,
                model_confidence=out.confidence,
                finish_reason=out.finish_reason or self._limit_reached(tokens),
                embedder=self.embedder,
            )
        return ans.model_copy(
            update={
                "parsed": out.parsed,
                "latency_s": time.perf_counter() - start,
                "generation_s": generation_s,
                "output_tokens": tokens,
            }
        )

    def assemble(self, question: str, docs: Sequence[Document], text: str) -> Answer:
        """The :class:`Answer` for ``text`` streamed by :meth:`stream` over ``docs``.

        The stream does not say why it stopped; with the local model the tokens are counted,
        and reaching ``max_tokens`` trims the answer to its last complete sentence.
        """
        reason = None
        tokens = count_output_tokens(self.model, text) if docs else None
        if tokens is not None:
            reason = self._limit_reached(tokens) or "stop"
            metrics.record("dagma_rag_tokens", tokens, kind="completion")
        with timed("rag.parse", "dagma_rag_duration_seconds", stage="parse"):
            return assemble_answer(
                question, docs, text, finish_reason=reason, embedder=self.embedder
            ).model_copy(update={"output_tokens": tokens or 0})

    def _limit_reached(self, tokens: int) -> str | None:
        limit = _max_tokens(self.model)
        return "length" if limit is not None and tokens >= limit else None

    @contextmanager
    def _generating(self) -> Iterator[None]:
        with model_lock(self.model), backend_errors(self.model), _context_overflow_as_value_error():
            yield


def _max_tokens(model: BaseChatModel) -> int | None:
    """The model's token limit per reply, as each backend's LangChain class names it."""
    for name in ("max_tokens", "num_predict"):
        value = getattr(model, name, None)
        if isinstance(value, int) and value > 0:
            return value
    extra = getattr(model, "extra_body", None) or {}
    value = extra.get("max_tokens") if isinstance(extra, dict) else None
    return value if isinstance(value, int) and value > 0 else None


def _count(model: BaseChatModel, out: ModelOutput) -> int:
    if out.output_tokens is not None:
        return out.output_tokens
    return count_output_tokens(model, out.raw_text) or 0


@contextmanager
def _context_overflow_as_value_error() -> Iterator[None]:
    # Only pathological text (e.g. 1000 chars of digits) overflows n_ctx with the default caps.
    try:
        yield
    except (ValueError, ContextOverflowError) as e:
        if isinstance(e, ValueError) and "context window" not in str(e):
            raise
        raise ValueError(
            f"the question plus retrieved context does not fit the model's context window ({e}); "
            "shorten the question"
        ) from e
