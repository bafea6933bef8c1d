"""Search: the nearest document chunks to a query, with their scores and payloads."""

from __future__ import annotations

import streamlit as st

from dagma.app import backend, ui
from dagma.lib.inert_html import inert_markdown
from dagma.settings import get_settings

settings = get_settings()
st.title("Search")
st.caption("Vector search over the document collection that the RAG chat answers from.")

with ui.guard("Searching the collection"):
    lab = backend.for_settings(settings)
    current = lab.collection()
    st.caption(current.caption)
    query = st.text_input("Query", placeholder="How do I catch an exception?")
    left, right = st.columns([1, 2])
    k = left.slider("Results (k)", 1, 20, 5)
    source = right.selectbox(
        "Only from source",
        current.sources,
        index=None,
        placeholder="All sources",
        accept_new_options=True,
    )
    if query.strip():
        hits = lab.search(current, query.strip(), k, source)
        if not hits:
            st.info(f"No chunk matches{f' in {source}' if source else ''}.")
        for hit in hits:
            # A label renders markdown, images too; source and title come from the corpus.
            label = inert_markdown(f"{hit.rank}. {hit.score:.3f} · {hit.source} · {hit.title}")
            with st.expander(label, expanded=hit.rank == 1):
                st.text(hit.text)
                st.json(hit.payload)
    else:
        st.caption("Type a query to search.")
