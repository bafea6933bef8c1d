"""Dagma's app: the lab's assets, experiments, model, documents and notebooks, read-only."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from dagma.app import ui
from dagma.settings import get_settings

PAGES = Path(__file__).with_name("pages")

st.set_page_config(page_title="Dagma", page_icon="🧪", layout="wide")
page = st.navigation(
    {
        "Lab": [
            st.Page(PAGES / "overview.py", title="Overview", icon=":material/hub:", default=True),
            st.Page(PAGES / "experiments.py", title="Experiments", icon=":material/science:"),
            st.Page(PAGES / "notebooks.py", title="Notebooks", icon=":material/menu_book:"),
            st.Page(PAGES / "monitoring.py", title="Monitoring", icon=":material/monitoring:"),
        ],
        "Use it": [
            st.Page(PAGES / "model.py", title="Model", icon=":material/wine_bar:"),
            st.Page(PAGES / "search.py", title="Search", icon=":material/search:"),
            st.Page(PAGES / "chat.py", title="Chat", icon=":material/chat:"),
        ],
    }
)
ui.sidebar(get_settings())
page.run()
