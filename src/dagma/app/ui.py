"""What every page shares: cached clients and data (keyed by the settings), the sidebar, errors."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import streamlit as st

from dagma.app import data
from dagma.client import DagmaApiError
from dagma.lib.inert_html import inert_markdown
from dagma.settings import Settings, get_settings

# --------------------------------------------------------------------------- clients


@st.cache_resource(show_spinner=False)
def _instance(dagster_dir: str) -> Any:
    return data.open_instance(Path(dagster_dir))


@st.cache_resource(show_spinner="Loading the Dagster definitions…")
def _definitions(home: str) -> Any:
    return data.load_definitions()


@st.cache_resource(show_spinner=False)
def _mlflow(tracking_uri: str) -> Any:
    return data.mlflow_client(tracking_uri)


@st.cache_resource(show_spinner=False)
def _store(url: str | None, root: str) -> Any:
    return data.open_vectors(get_settings())  # (url, root), from the same settings, key the cache


@st.cache_resource(show_spinner="Loading the embedder…")
def _embedder() -> Any:
    from dagma.lib.embeddings import get_embedder

    return get_embedder()


# --------------------------------------------------------------------------- data


@st.cache_data(ttl=10, show_spinner="Reading the assets…")
def assets(home: str, dagster_dir: str, ui_url: str) -> data.AssetsView:
    """From the webserver when one answers at `ui_url`, else from the embedded instance."""
    if data.dagster_webserver_answers(ui_url):
        return data.assets_from_webserver(ui_url)
    data.require_instance(Path(dagster_dir))
    return data.assets_from_instance(_instance(dagster_dir), _definitions(home), Path(dagster_dir))


@st.cache_data(ttl=15, show_spinner="Reading the MLflow runs…")
def runs(tracking_uri: str, experiment: str) -> tuple[str, list[data.RunInfo]]:
    return data.experiment_runs(_mlflow(tracking_uri), tracking_uri, experiment)


@st.cache_data(ttl=15, show_spinner=False)
def model_ref(tracking_uri: str, name: str) -> data.ModelRef:
    return data.current_model(_mlflow(tracking_uri), tracking_uri, name)


@st.cache_resource(show_spinner="Loading the model…", max_entries=4)
def model(tracking_uri: str, name: str, version: str) -> data.LoadedModel:
    return data.load_model(_mlflow(tracking_uri), tracking_uri, name, version)


@st.cache_data(ttl=10, show_spinner=False)
def collection(url: str | None, root: str, name: str) -> Any:
    return data.collection_version(_store(url, root), name)


@st.cache_data(ttl=300, show_spinner=False)
def sources(
    url: str | None, root: str, name: str, version: int, dim: int, points: int
) -> list[str]:
    return data.collection_sources(_store(url, root), name, dim, points)


@st.cache_data(ttl=60, show_spinner="Searching…", max_entries=256)
def search(
    url: str | None, root: str, name: str, version: int, query: str, k: int, source: str | None
) -> list[data.SearchHit]:
    return data.search(_store(url, root), _embedder(), name, query, k, source)


@st.cache_resource(show_spinner="Loading the chat model…")
def chat(url: str | None, root: str, name: str, llm: str) -> data.Chat:
    return data.rag_chat(_store(url, root), name, _embedder())


@st.cache_data(ttl=10, show_spinner=False)
def notebooks(runs_dir: str) -> list[data.ExecutedNotebook]:
    return data.executed_notebooks(Path(runs_dir))


@st.cache_data(max_entries=8, show_spinner=False)
def file_bytes(path: str, mtime: float) -> bytes:
    return Path(path).read_bytes()


@st.cache_data(max_entries=8, show_spinner=False)
def inert_notebook_html(path: str, mtime: float) -> str:
    """An executed notebook's HTML copy, cleaned again: copies written before cleaning was the
    rule (or by hand) reach the page inert too."""
    from dagma.lib.inert_html import inert_document

    return inert_document(Path(path).read_text(encoding="utf-8", errors="replace"))


def store_key(settings: Settings) -> tuple[str | None, str]:
    """What identifies the vector store: the server URL or the embedded folder."""
    return settings.qdrant_url, str(settings.qdrant_path)


def llm_key() -> str:
    """The chat model's identity, so a changed DAGMA_LLM loads a new one."""
    return "|".join(
        os.environ.get(v, "") for v in ("DAGMA_LLM", "DAGMA_LLM_MODEL", "DAGMA_LLM_MODEL_PATH")
    )


# --------------------------------------------------------------------------- shared UI


def dagster_run_url(settings: Settings, run_id: str) -> str:
    return f"{settings.dagster_ui_url.rstrip('/')}/runs/{run_id}"


def dagster_asset_url(settings: Settings, key: str) -> str:
    return f"{settings.dagster_ui_url.rstrip('/')}/assets/{key}"


def _refresh() -> None:
    st.cache_data.clear()


def sidebar(settings: Settings) -> None:
    """Where the lab lives, the other UIs and a refresh button."""
    with st.sidebar:
        st.caption(f"Lab home `{settings.home}`")
        if settings.dagma_api_url:
            st.caption(
                f"Model, Search and Chat go through the Dagma API at `{settings.dagma_api_url}`; "
                "Overview, Experiments and Notebooks read the lab's stores (the API has no "
                "endpoint for them)."
            )
        st.link_button("Dagster UI", settings.dagster_ui_url, icon=":material/hub:")
        st.link_button("MLflow UI", settings.mlflow_ui, icon=":material/science:")
        st.button(
            "Refresh data",
            icon=":material/refresh:",
            on_click=_refresh,
            help="Data is cached for a few seconds; this reads it again now.",
        )


@contextmanager
def guard(what: str) -> Iterator[None]:
    """Show a missing store as what to run and any other error as a warning, never a traceback."""
    try:
        yield
    except data.NotReady as exc:
        st.info(str(exc), icon=":material/info:")
    except DagmaApiError as exc:
        # The API's own words, kept inert: an error may quote the request.
        message = inert_markdown(f"The API answered {exc.status}: {exc.error.rstrip('.')}.")
        text = f"{message} Fix: {inert_markdown(exc.fix)}"
        if exc.status == 404:  # no model or no champion yet: like a store not built yet
            st.info(text, icon=":material/info:")
        else:
            lock = exc.status in (401, 403)
            st.warning(text, icon=":material/lock:" if lock else ":material/cloud_off:")
    except data.Unavailable as exc:
        st.warning(str(exc), icon=":material/cloud_off:")
    except Exception as exc:
        st.warning(
            f"{what} failed ({type(exc).__name__}: {str(exc).rstrip('.')}). Check the lab with "
            "`uv run dagma doctor`, or rebuild it with `make clean demo`.",
            icon=":material/warning:",
        )
