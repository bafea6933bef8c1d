"""Answering questions with a RAG pipeline: one after the other, or several at once."""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["Answered", "AnsweringPipeline", "answer_questions"]


class AnsweringPipeline(Protocol):
    """What :func:`answer_questions` needs from :class:`dagma.lib.rag.RagPipeline`."""

    def retrieve(self, question: str) -> list[Any]: ...

    def answer(self, question: str, docs: Sequence[Any] | None = None) -> Any: ...


@dataclass(frozen=True)
class Answered:
    """One question answered: the passages it was given, the answer, and how long they took."""

    question: str
    docs: list[Any]
    answer: Any
    latency_s: float  # retrieval plus answer, wall time
    generation_s: float  # the answer alone: the answer's own measure when it gives one


def answer_questions(
    questions: Sequence[str],
    pipelines: AnsweringPipeline | Sequence[AnsweringPipeline],
    spans: Sequence[Callable[[], AbstractContextManager[Any]]] | None = None,
) -> list[Answered]:
    """Retrieve and answer each question, inside ``spans[i]()`` when given; in order.

    With several pipelines as many questions are answered at once, each pipeline by one thread
    at a time, so each may hold its own local model (``chat_model(replica=i)``: a llama.cpp
    context serves one thread). With one, they are answered here, one after the other.
    """
    pool = [pipelines] if not isinstance(pipelines, Sequence) else list(pipelines)
    if not pool:
        raise ValueError("pipelines is empty: pass at least one pipeline to answer with")
    if spans is not None and len(spans) != len(questions):
        raise ValueError(f"{len(spans)} spans for {len(questions)} questions: give one each")

    def answer(i: int, pipeline: AnsweringPipeline) -> Answered:
        with spans[i]() if spans is not None else nullcontext():
            start = time.perf_counter()
            docs = pipeline.retrieve(questions[i])
            retrieved = time.perf_counter()
            reply = pipeline.answer(questions[i], docs)
            done = time.perf_counter()
        own = getattr(reply, "generation_s", None)
        return Answered(
            questions[i], docs, reply, done - start, done - retrieved if own is None else own
        )

    if len(pool) == 1 or len(questions) < 2:
        return [answer(i, pool[0]) for i in range(len(questions))]
    free: queue.SimpleQueue[AnsweringPipeline] = queue.SimpleQueue()
    for pipeline in pool:
        free.put(pipeline)

    def job(i: int) -> Answered:
        pipeline = free.get()
        try:
            return answer(i, pipeline)
        finally:
            free.put(pipeline)

    with ThreadPoolExecutor(max_workers=min(len(pool), len(questions))) as workers:
        futures = [workers.submit(job, i) for i in range(len(questions))]
        try:
            return [f.result() for f in futures]
        except BaseException:
            workers.shutdown(cancel_futures=True)
            raise
