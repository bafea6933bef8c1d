"""Retrieval-augmented answering over a vector store with a LangChain (LCEL) chain.

Answers are plain text, parsed afterwards for citations like ``[2]``. ``with_structured_output``
is not used: with ChatLlamaCpp it yields grammar-valid JSON, but SmolLM2-135M fills it with
wrong answers and invalid citations, and it cannot stream tokens.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.language_models import BaseChatModel
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import Runnable, RunnableLambda, RunnableParallel, RunnablePassthrough
from pydantic import BaseModel, Field

__all__ = [
    "MAX_QUESTION_CHARS",
    "NO_CONTEXT_ANSWER",
    "Answer",
    "Hit",
    "RagPipeline",
    "Source",
    "StoreRetriever",
    "assemble_answer",
    "build_answer_chain",
    "build_rag_chain",
    "cited_numbers",
    "format_context",
    "hit_to_document",
    "validate_question",
]

MAX_QUESTION_CHARS = 1000
# 4 passages x 600 chars (~700 tokens) + a 1000-char question + 200 new tokens fit n_ctx=2048.
MAX_PASSAGES = 4
CONTEXT_CHARS = 600
SNIPPET_CHARS = 200
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

_CITATION = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")


class Hit(Protocol):
    """A search hit from the vector store (duck-typed)."""

    id: Any
    score: float
    payload: Mapping[str, Any]


class StoreRetriever(BaseRetriever):
    """LangChain retriever over a ``search(query, k) -> hits`` callable."""

    search: Callable[[str, int], Sequence[Any]]
    k: int = Field(default=4, ge=1)

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun
    ) -> list[Document]:
        return [hit_to_document(h) for h in list(self.search(query, self.k))[: self.k]]


def hit_to_document(hit: Hit) -> Document:
    """``Document`` with the hit's text as content and payload + id + score as metadata."""
    payload = dict(hit.payload)
    return Document(
        page_content=str(payload.get("text", "")),
        metadata={**payload, "id": str(hit.id), "score": float(hit.score)},
    )


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
    """A generated answer with its retrieved sources in retrieval order."""

    question: str
    text: str
    sources: list[Source]
    confidence: float = Field(ge=0.0, le=1.0)

    @property
    def cited_sources(self) -> list[Source]:
        """Sources the answer cites, or all sources when it cites none."""
        return [s for s in self.sources if s.cited] or list(self.sources)


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


def _collapse(text: str) -> str:
    return " ".join(text.split())


def _truncate(text: str, limit: int) -> str:
    text = _collapse(text)
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0] or text[:limit]
    return cut + "…"


def format_context(
    docs: Sequence[Document], max_chars: int = CONTEXT_CHARS, max_passages: int = MAX_PASSAGES
) -> str:
    """Numbered passages ``[n] (source) text``: the first ``max_passages``, each capped."""
    return "\n\n".join(
        f"[{i}] ({d.metadata.get('source', '?')}) {_truncate(d.page_content, max_chars)}"
        for i, d in enumerate(docs[:max_passages], start=1)
    )


def cited_numbers(text: str, n_docs: int) -> list[int]:
    """Distinct passage numbers cited as ``[n]`` or ``[n, m]``, in order, within 1..n_docs."""
    out: list[int] = []
    for m in _CITATION.finditer(text):
        for part in m.group(1).split(","):
            n = int(part)
            if 1 <= n <= n_docs and n not in out:
                out.append(n)
    return out


def assemble_answer(question: str, docs: Sequence[Document], text: str) -> Answer:
    """Build an :class:`Answer` from retrieved docs and the model's raw text.

    Confidence heuristic: the best retrieval score among cited passages (or among all
    passages if none is cited), clipped to [0, 1]; halved when nothing is cited; 0 without docs.
    """
    cited = set(cited_numbers(text, len(docs)))
    sources = [
        Source(
            id=str(d.metadata.get("id", "")),
            source=str(d.metadata.get("source", "")),
            score=float(d.metadata.get("score", 0.0)),
            snippet=_truncate(d.page_content, SNIPPET_CHARS),
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
    return Answer(question=question, text=text, sources=sources, confidence=confidence)


def build_answer_chain(
    model: BaseChatModel, max_chars: int = CONTEXT_CHARS, max_passages: int = MAX_PASSAGES
) -> Runnable[dict[str, Any], str]:
    """``{"question", "docs"}`` -> prompt -> model -> text."""

    def to_prompt_inputs(x: dict[str, Any]) -> dict[str, str]:
        context = format_context(x["docs"], max_chars, max_passages)
        return {"question": x["question"], "context": context}

    return RunnableLambda(to_prompt_inputs) | RAG_PROMPT | model | StrOutputParser()


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

    ``stream`` yields the raw text chunks; ``answer(q).text`` equals their concatenation.
    With the local model (temperature 0, i.e. greedy) the same question over the same store
    gives the same text. The local model is one shared llama.cpp context: not thread-safe.
    """

    def __init__(
        self,
        retriever: BaseRetriever,
        model: BaseChatModel,
        *,
        max_question_chars: int = MAX_QUESTION_CHARS,
        context_chars: int = CONTEXT_CHARS,
        max_passages: int = MAX_PASSAGES,
    ) -> None:
        self.retriever = retriever
        self.model = model
        self.max_question_chars = max_question_chars
        self.max_passages = max_passages
        self.answer_chain = build_answer_chain(model, context_chars, max_passages)
        self.chain = build_rag_chain(retriever, model, context_chars, max_passages)

    def retrieve(self, question: str) -> list[Document]:
        """Validated question -> the first ``max_passages`` retrieved documents, best first."""
        q = validate_question(question, self.max_question_chars)
        return self.retriever.invoke(q)[: self.max_passages]

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
        with _context_overflow_as_value_error():
            for chunk in self.answer_chain.stream({"question": question, "docs": docs}):
                if chunk:
                    yield chunk

    def answer(self, question: str, docs: Sequence[Document] | None = None) -> Answer:
        """Retrieve, generate and return an :class:`Answer` with sources and confidence."""
        q = validate_question(question, self.max_question_chars)
        docs = self.retrieve(q) if docs is None else list(docs)[: self.max_passages]
        if not docs:
            return assemble_answer(q, docs, NO_CONTEXT_ANSWER)
        with _context_overflow_as_value_error():
            text = self.answer_chain.invoke({"question": q, "docs": docs})
        return assemble_answer(q, docs, text)


@contextmanager
def _context_overflow_as_value_error() -> Iterator[None]:
    # Only pathological text (e.g. 1000 chars of digits) overflows n_ctx with the default caps.
    try:
        yield
    except ValueError as e:
        if "context window" not in str(e):
            raise
        raise ValueError(
            f"the question plus retrieved context does not fit the model's context window ({e}); "
            "shorten the question"
        ) from e
