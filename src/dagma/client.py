"""A small typed client of the Dagma API (`dagma serve`).

    from dagma.client import DagmaClient

    with DagmaClient("http://127.0.0.1:8000", token) as api:
        api.predict([{"alcohol": 13.2, ...}]).predictions
        api.search("catch an exception", k=3).hits
        api.ask("How do I catch an exception?").text
        for event in api.ask_stream("How do I catch an exception?"):
            ...

Every error response raises `DagmaApiError` with the HTTP status, the problem and the fix.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal, Self

import httpx
from httpx_sse import SSEError, connect_sse
from pydantic import BaseModel, Field

from dagma.errors import DagmaError
from dagma.lib.answers import Answer, Source

__all__ = [
    "AnswerEvent",
    "AskEvent",
    "Component",
    "DagmaApiError",
    "DagmaClient",
    "Prediction",
    "Readiness",
    "SearchHit",
    "SearchResult",
    "SourcesEvent",
    "TokenEvent",
]


class DagmaApiError(DagmaError):
    """The API answered with an error: `status`, `error` (the problem), `fix`, `details`."""

    def __init__(
        self, status: int, error: str, fix: str, details: list[dict[str, Any]] | None = None
    ) -> None:
        super().__init__(f"{error} (HTTP {status}). Fix: {fix}")
        self.status = status
        self.error = error
        self.fix = fix
        self.details = details or []


class Prediction(BaseModel):
    model: str
    version: str
    predictions: list[Any]


class SearchHit(BaseModel):
    rank: int
    id: str
    score: float
    source: str
    title: str
    text: str
    payload: dict[str, Any] = Field(default_factory=dict)


class SearchResult(BaseModel):
    collection: str
    version: int
    query: str
    mmr: bool
    hits: list[SearchHit]


class Component(BaseModel):
    ok: bool
    detail: str
    fix: str | None = None


class Readiness(BaseModel):
    ready: bool
    components: dict[str, Component]


class SourcesEvent(BaseModel):
    """The passages the answer is generated from (the stream's first event)."""

    kind: Literal["sources"] = "sources"
    sources: list[Source]


class TokenEvent(BaseModel):
    """A piece of the answer's text, as the model generates it."""

    kind: Literal["token"] = "token"
    text: str


class AnswerEvent(BaseModel):
    """The whole structured answer (the stream's last event)."""

    kind: Literal["answer"] = "answer"
    answer: Answer


AskEvent = SourcesEvent | TokenEvent | AnswerEvent


class DagmaClient:
    """Calls `base_url` with the bearer `token`; `transport` is for in-process apps (tests)."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        timeout: float = 180.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"), headers=headers, timeout=timeout, transport=transport
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._http.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise _error(response)
        return response.json()

    def health(self) -> dict[str, Any]:
        """`GET /healthz`: the process answers (no token needed)."""
        body: dict[str, Any] = self._call("GET", "/healthz")
        return body

    def ready(self) -> Readiness:
        """`GET /readyz`: each backend, reachable or not (a 503 is returned, not raised)."""
        response = self._http.get("/readyz")
        if response.status_code not in (200, 503) or "components" not in _json(response):
            raise _error(response)
        return Readiness.model_validate(response.json())

    def predict(self, rows: Sequence[Mapping[str, Any]], *, model: str | None = None) -> Prediction:
        """Score `rows` with the champion of `model` (default dagma-wine)."""
        params = {"model": model} if model else None
        body = self._call("POST", "/v1/predict", json={"rows": list(rows)}, params=params)
        return Prediction.model_validate(body)

    def search(
        self, query: str, k: int = 4, source: str | None = None, mmr: bool = False
    ) -> SearchResult:
        """The `k` chunks nearest to `query`, optionally of one `source`, optionally diverse."""
        params: dict[str, Any] = {"q": query, "k": k, "mmr": mmr}
        if source:
            params["source"] = source
        return SearchResult.model_validate(self._call("GET", "/v1/search", params=params))

    def ask(
        self, question: str, *, k: int = 4, source: str | None = None, mmr: bool = False
    ) -> Answer:
        """A whole RAG answer with its sources."""
        body = _ask_body(question, k, source, mmr)
        return Answer.model_validate(self._call("POST", "/v1/ask", json=body))

    def ask_stream(
        self, question: str, *, k: int = 4, source: str | None = None, mmr: bool = False
    ) -> Iterator[AskEvent]:
        """The answer as it is generated: `SourcesEvent`, `TokenEvent`s, then `AnswerEvent`.

        An error before or during the stream raises `DagmaApiError`.
        """
        body = _ask_body(question, k, source, mmr)
        with connect_sse(self._http, "POST", "/v1/ask", json=body) as events:
            if events.response.status_code >= 400:
                events.response.read()
                raise _error(events.response)
            try:
                for sse in events.iter_sse():
                    if sse.event == "sources":
                        yield SourcesEvent(sources=sse.json())
                    elif sse.event == "token":
                        yield TokenEvent(text=sse.json()["text"])
                    elif sse.event == "answer":
                        yield AnswerEvent(answer=Answer.model_validate_json(sse.data))
                    elif sse.event == "error":
                        problem = sse.json()
                        raise DagmaApiError(
                            int(problem.get("status", 500)),
                            str(problem.get("error", "the stream failed")),
                            str(problem.get("fix", "retry")),
                        )
            except SSEError as exc:
                raise DagmaApiError(
                    events.response.status_code,
                    f"the answer did not come as server-sent events ({exc})",
                    "Check that base_url is a Dagma API.",
                ) from exc


def _ask_body(question: str, k: int, source: str | None, mmr: bool) -> dict[str, Any]:
    return {"question": question, "k": k, "source": source, "mmr": mmr}


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return {}


def _error(response: httpx.Response) -> DagmaApiError:
    body = _json(response)
    if not isinstance(body, dict):
        body = {}
    return DagmaApiError(
        response.status_code,
        str(body.get("error") or response.reason_phrase or "error"),
        str(body.get("fix") or "Check the request against the API's /docs."),
        body.get("details") if isinstance(body.get("details"), list) else None,
    )
