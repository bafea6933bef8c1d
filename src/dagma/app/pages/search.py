"""Search: the nearest document chunks to a query, with their scores and payloads."""

from __future__ import annotations

import streamlit as st

from dagma.app import ui
from dagma.lib.inert_html import inert_markdown
from dagma.settings import get_settings

settings = get_settings()
st.title("Search")
st.caption("Vector search over the document collection that the RAG chat answers from.")

with ui.guard("Searching the collection"):
    url, root = ui.store_key(settings)
    current = ui.collection(url, root, settings.dagma_collection)
    kind = f"Qdrant server {url}" if url else f"embedded store `{root}`"
    st.caption(
        f"Collection `{current.collection}` v{current.version}: {current.points} chunks, "
        f"{current.dim} dimensions, in the {kind}."
    )
    query = st.text_input("Query", placeholder="How do I catch an exception?")
    left, right = st.columns([1, 2])
    k = left.slider("Results (k)", 1, 20, 5)
    source = right.selectbox(
        "Only from source",
        ui.sources(url, root, current.collection, current.version, current.dim, current.points),
        index=None,
        placeholder="All sources",
        accept_new_options=True,
    )
    if query.strip():
        hits = ui.search(url, root, current.collection, current.version, query.strip(), k, source)
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
