"""Notebooks: the executed notebooks of every run, newest first, rendered as HTML."""

from __future__ import annotations

import streamlit as st

from dagma.app import ui
from dagma.lib import tracking
from dagma.settings import get_settings

SELECTED = "notebook"
COLUMNS = 3


def select(path: str) -> None:
    st.session_state[SELECTED] = path


def mlflow_run_url(run_id: str) -> str:
    """The run's page in the MLflow UI (its experiment's id comes from the store when it can)."""
    try:
        experiment_id, _ = ui.runs(settings.tracking_uri, settings.dagma_experiment)
    except Exception:
        return settings.mlflow_ui
    return tracking.run_url(settings.mlflow_ui, experiment_id, run_id)


settings = get_settings()
st.title("Notebooks")
st.caption(
    "Each notebook asset saves its executed copy per run: outputs, figures and the parameters "
    "it ran with."
)

with ui.guard("Reading the executed notebooks"):
    books = ui.notebooks(str(settings.runs_dir))
    st.caption(f"{len(books)} executed notebooks in `{settings.runs_dir}`, newest first.")
    chosen = next((b for b in books if str(b.html) == st.session_state.get(SELECTED)), books[0])
    gallery = st.container(height=300 if len(books) > 2 * COLUMNS else "content", border=False)
    cols = gallery.columns(COLUMNS)
    for i, book in enumerate(books):
        with cols[i % COLUMNS].container(border=True):
            st.markdown(f"**{book.asset}**" + (f" · `{book.partition}`" if book.partition else ""))
            st.caption(f"{book.modified:%Y-%m-%d %H:%M:%S} · run `{book.run_id[:8]}`")
            st.button(
                "Viewing" if book == chosen else "View",
                key=f"view-{i}",
                on_click=select,
                args=(str(book.html),),
                type="primary" if book == chosen else "secondary",
                icon=":material/visibility:",
                width="stretch",
            )

    st.subheader(chosen.label)
    links = [f"[Dagster run]({ui.dagster_run_url(settings, chosen.run_id)})"]
    if chosen.mlflow_run_id:
        links.append(f"[MLflow run]({mlflow_run_url(chosen.mlflow_run_id)})")
    st.caption(" · ".join(links))
    html = ui.inert_notebook_html(str(chosen.html), chosen.html.stat().st_mtime)
    left, right, _ = st.columns([1, 1, 3])
    left.download_button(
        "Download HTML",
        html,
        file_name=f"{chosen.asset}-{chosen.run_id[:8]}.html",
        mime="text/html",
        icon=":material/download:",
    )
    if chosen.ipynb is not None:
        right.download_button(
            "Download .ipynb",
            ui.file_bytes(str(chosen.ipynb), chosen.ipynb.stat().st_mtime),
            file_name=f"{chosen.asset}-{chosen.run_id[:8]}.ipynb",
            mime="application/x-ipynb+json",
            icon=":material/download:",
        )
    # st.iframe lets scripts run, so the page gets the inert copy, whose own
    # Content-Security-Policy also refuses any script or remote load in the browser.
    st.iframe(html, height=900, alt=f"Executed notebook {chosen.label}")
