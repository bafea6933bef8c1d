"""Dagma's app: the latest MLflow metrics and a search box over the vector collection."""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from dagma.lib import embeddings, tracking
from dagma.lib.vectors import open_store
from dagma.settings import get_settings

st.set_page_config(page_title="Dagma", page_icon="🧪", layout="wide")
settings = get_settings()


@st.cache_resource
def embedder() -> embeddings.Embedder:
    return embeddings.get_embedder()


@st.cache_data(ttl=30)
def latest_runs(tracking_uri: str, experiment: str, limit: int = 20) -> pd.DataFrame:
    found = tracking.client(tracking_uri).get_experiment_by_name(experiment)
    if found is None:
        return pd.DataFrame()
    exp = found.experiment_id
    runs = tracking.client(tracking_uri).search_runs(
        [exp], max_results=limit, order_by=["attributes.start_time DESC"]
    )
    return pd.DataFrame(
        [
            {
                "run": r.info.run_name,
                "status": r.info.status,
                **r.data.metrics,
                "link": tracking.run_url(settings.mlflow_ui, exp, r.info.run_id),
            }
            for r in runs
        ]
    )


@st.cache_data(ttl=10)
def search(location: str, collection: str, query: str, k: int) -> list[dict[str, Any]]:
    vector = embedder().embed([query])[0]
    api_key = settings.qdrant_api_key.get_secret_value() if settings.qdrant_api_key else None
    with open_store(url=settings.qdrant_url, api_key=api_key, root=settings.qdrant_path) as store:
        hits = store.search(collection, vector, k=k)
    return [{"score": round(h.score, 4), **h.payload} for h in hits]


st.title("Dagma lab")
st.caption(
    f"State in `{settings.home}` · [MLflow]({settings.mlflow_ui}) · "
    f"[Dagster]({settings.dagster_ui_url})"
)

st.header("Latest MLflow runs")
try:
    runs = latest_runs(settings.tracking_uri, settings.dagma_experiment)
except Exception as exc:
    st.info(f"No MLflow runs yet ({exc}). Run `make demo` first.")
    runs = pd.DataFrame()
if runs.empty:
    st.info("No MLflow runs yet. Run `make demo` to train the model and build the collection.")
else:
    st.dataframe(runs, column_config={"link": st.column_config.LinkColumn("MLflow")})
    if "accuracy" in runs:
        st.line_chart(runs[["accuracy"]].dropna().iloc[::-1].reset_index(drop=True))

st.header("Search the documents")
query = st.text_input("Question or keywords", placeholder="How do I catch an exception?")
k = st.slider("Results", 1, 20, 5)
if query.strip():
    try:
        results = search(settings.vector_location, settings.dagma_collection, query.strip(), k)
    except Exception as exc:
        st.warning(f"The collection cannot be searched yet ({exc}). Run `make demo` first.")
    else:
        for hit in results:
            with st.expander(f"{hit['score']:.3f} · {hit.get('source')} · {hit.get('title')}"):
                st.write(hit.get("text", ""))
