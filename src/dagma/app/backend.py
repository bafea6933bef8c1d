"""The Model, Search and Chat pages' one seam: the lab's stores, or the Dagma API.

`for_settings` picks once: with DAGMA_API_URL set the pages go through `dagma.client` with
DAGMA_API_TOKEN, else they read MLflow and the vector store as before. Both backends have the
same methods, so a page never branches on the mode. API errors raise `DagmaApiError` (its
`error` and `fix` are shown by `ui.guard`); an API that does not answer raises `Unavailable`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import httpx
import streamlit as st

from dagma.app import data, ui
from dagma.client import AnswerEvent, DagmaApiError, DagmaClient, TokenEvent
from dagma.lib import tracking
from dagma.lib.answers import Answer
from dagma.lib.models import REGISTERED_MODEL
from dagma.settings import Settings

AUTHORIZE_FIX = (
    "Set DAGMA_API_TOKEN for the app to a token from "
    "`dagma token issue --scope predict --scope search --scope ask --ttl 30d`."
)

SEEN_SOURCES = "api_sources_seen"


@dataclass(frozen=True)
class Scored:
    label: str
    probabilities: dict[str, float] | None
    by: str


@dataclass(frozen=True)
class ModelForm:
    """The champion's features with their defaults, what to say about it, and how to score."""

    heading: str
    features: list[str]
    defaults: dict[str, float]
    score: Callable[[Mapping[str, float]], Scored]


@dataclass(frozen=True)
class CollectionView:
    name: str
    version: int | None
    caption: str
    sources: list[str]


@dataclass(frozen=True)
class Reply:
    """An answer being generated: its text pieces, the finished `Answer`, its source rows."""

    chunks: Iterable[str]
    finish: Callable[[str], Answer] | None
    rows: Callable[[], list[dict[str, Any]]]


class Backend(Protocol):
    def model_form(self) -> ModelForm: ...
    def collection(self) -> CollectionView: ...
    def search(
        self, view: CollectionView, query: str, k: int, source: str | None
    ) -> list[data.SearchHit]: ...
    def prepare_chat(self) -> None: ...
    def ask(self, question: str) -> AbstractContextManager[Reply]: ...


def for_settings(settings: Settings) -> Backend:
    """The API when DAGMA_API_URL is set, else the stores."""
    if settings.dagma_api_url:
        token = settings.dagma_api_token
        return ApiBackend(settings.dagma_api_url, token.get_secret_value() if token else None)
    return StoresBackend(settings)


# --------------------------------------------------------------------------- the stores


class StoresBackend:
    """Reads MLflow and the vector store directly (cached in `ui`)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.url, self.root = ui.store_key(settings)

    def model_form(self) -> ModelForm:
        uri, mlflow_ui = self.settings.tracking_uri, self.settings.mlflow_ui
        ref = ui.model_ref(uri, REGISTERED_MODEL)
        run = f" · trained by run `{ref.run_id[:8]}`" if ref.run_id else ""
        run += f" · registered {ref.created:%Y-%m-%d %H:%M}" if ref.created else ""
        heading = (
            f"Using **{ref.name} v{ref.version}** (alias `champion`){run} · "
            f"[open in MLflow]({tracking.model_url(mlflow_ui, ref.name, ref.version)})"
        )
        loaded = ui.model(uri, ref.name, ref.version)

        def score(values: Mapping[str, float]) -> Scored:
            found = data.predict(loaded, dict(values))
            by = f"by {ref.name} v{ref.version} ({loaded.flavor})"
            return Scored(found.label, found.probabilities, by)

        return ModelForm(heading, loaded.features, loaded.defaults, score)

    def collection(self) -> CollectionView:
        current = ui.collection(self.url, self.root, self.settings.dagma_collection)
        kind = f"Qdrant server {self.url}" if self.url else f"embedded store `{self.root}`"
        caption = (
            f"Collection `{current.collection}` v{current.version}: {current.points} chunks, "
            f"{current.dim} dimensions, in the {kind}."
        )
        sources = ui.sources(
            self.url, self.root, current.collection, current.version, current.dim, current.points
        )
        return CollectionView(current.collection, current.version, caption, sources)

    def search(
        self, view: CollectionView, query: str, k: int, source: str | None
    ) -> list[data.SearchHit]:
        version = view.version or 0
        return ui.search(self.url, self.root, view.name, version, query, k, source)

    def prepare_chat(self) -> None:
        ui.collection(self.url, self.root, self.settings.dagma_collection)
        ui.chat(self.url, self.root, self.settings.dagma_collection, ui.llm_key())

    @contextmanager
    def ask(self, question: str) -> Iterator[Reply]:
        """The shared model answers one question at a time: hold its lock while streaming."""
        chat = ui.chat(self.url, self.root, self.settings.dagma_collection, ui.llm_key())
        if not chat.lock.acquire(blocking=False):
            with st.spinner("Waiting for another answer to finish…"):
                chat.lock.acquire()
        try:
            with st.spinner("Retrieving…"):
                docs = chat.pipeline.retrieve(question)
            assemble = getattr(chat.pipeline, "assemble", None)  # a RagPipeline's, not all
            finish = partial(assemble, question, docs) if assemble is not None else None
            rows = partial(data.source_rows, docs)
            yield Reply(chat.pipeline.stream(question, docs), finish, rows)
        finally:
            chat.lock.release()


# --------------------------------------------------------------------------- the API


class ApiBackend:
    """Goes through `dagma serve` at `url` with a bearer `token`; reads no store."""

    def __init__(self, url: str, token: str | None) -> None:
        self.url = url.rstrip("/")
        self.token = token

    @contextmanager
    def _client(self) -> Iterator[DagmaClient]:
        """A client whose failures name the fix: an API that is down, or a missing token."""
        try:
            with DagmaClient(self.url, self.token) as client:
                yield client
        except DagmaApiError as exc:
            if exc.status == 401 and not self.token:
                raise DagmaApiError(exc.status, exc.error, AUTHORIZE_FIX, exc.details) from exc
            raise
        except httpx.TransportError as exc:
            raise data.Unavailable(
                f"The Dagma API at DAGMA_API_URL={self.url} does not answer ({exc}). Start it "
                "(`dagma serve`), or unset DAGMA_API_URL to read the lab's stores directly."
            ) from exc

    def model_form(self) -> ModelForm:
        features = api_features(self.url)
        heading = (
            f"Scored through the Dagma API at `{self.url}`: the `champion` version it serves "
            "now, named with each prediction."
        )

        def score(values: Mapping[str, float]) -> Scored:
            with self._client() as client:
                found = client.predict([{f: float(values[f]) for f in features}])
            by = f"by {found.model} v{found.version} (through the API)"
            return Scored(str(found.predictions[0]), None, by)

        return ModelForm(heading, features, data.feature_defaults(features, None), score)

    def collection(self) -> CollectionView:
        caption = (
            f"Searched through the Dagma API at `{self.url}`, in the collection's current "
            "version. The API lists no sources: pick one seen in the results, or type one "
            "(e.g. `pydoc:try`), to keep only its chunks."
        )
        return CollectionView("", None, caption, sorted(st.session_state.get(SEEN_SOURCES, ())))

    def search(
        self, view: CollectionView, query: str, k: int, source: str | None
    ) -> list[data.SearchHit]:
        with self._client() as client:
            result = client.search(query, k=k, source=source)
        st.session_state.setdefault(SEEN_SOURCES, set()).update(h.source for h in result.hits)
        return [
            data.SearchHit(
                rank=hit.rank,
                score=hit.score,
                source=hit.source,
                title=hit.title,
                text=hit.text,
                payload={
                    "id": hit.id,
                    **{key: v for key, v in hit.payload.items() if key != "text"},
                },
            )
            for hit in result.hits
        ]

    def prepare_chat(self) -> None:
        """Nothing to load here: the API holds the model."""

    @contextmanager
    def ask(self, question: str) -> Iterator[Reply]:
        with self._client() as client:
            stream = _Stream()
            yield Reply(stream.chunks(client.ask_stream(question)), stream.finish, stream.rows)


class _Stream:
    """Collects the sources and the final answer of an SSE stream while passing its text on."""

    def __init__(self) -> None:
        self.answer: Answer | None = None

    def chunks(self, events: Iterable[Any]) -> Iterator[str]:
        for event in events:
            if isinstance(event, TokenEvent):
                yield event.text
            elif isinstance(event, AnswerEvent):  # its sources are the SourcesEvent's too
                self.answer = event.answer

    def finish(self, text: str) -> Answer:
        if self.answer is None:
            raise data.Unavailable(
                "The API's answer stream ended before its answer. Ask again; if it keeps "
                "happening, look at the `dagma serve` log."
            )
        return self.answer

    def rows(self) -> list[dict[str, Any]]:
        sources = self.answer.sources if self.answer else []
        return [
            {"rank": s.rank, "source": s.source, "score": s.score, "snippet": s.snippet}
            for s in sources
        ]


@st.cache_data(ttl=10, show_spinner=False)
def api_features(url: str) -> list[str]:
    """The columns of a predict row, from the API's OpenAPI schema (the champion's signature)."""
    try:
        # The first schema loads the champion, which can take a while on a busy machine.
        response = httpx.get(f"{url}/openapi.json", timeout=120)
        response.raise_for_status()
        schema = response.json()
        components = schema["components"]["schemas"]
        operation = schema["paths"]["/v1/predict"]["post"]
        body = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        request = components[body.rsplit("/", 1)[1]]
        row = components[request["properties"]["rows"]["items"]["$ref"].rsplit("/", 1)[1]]
        return [str(name) for name in row["properties"]]
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        raise data.Unavailable(
            f"The Dagma API at DAGMA_API_URL={url} did not describe its predict rows "
            f"({type(exc).__name__}: {exc}). Start it (`dagma serve`) and check that a "
            "champion model exists, or unset DAGMA_API_URL to read the lab's stores."
        ) from exc
