"""Chat: streamed RAG answers from the local model, each with the passages it was given."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import pandas as pd
import streamlit as st

from dagma.app import backend, ui
from dagma.lib.answers import Answer
from dagma.lib.inert_html import inert_markdown
from dagma.lib.sentences import settled_prefix
from dagma.settings import get_settings

HISTORY = "chat_history"


def show_sources(rows: list[dict[str, Any]]) -> None:
    if rows:
        st.caption("Sources")
        table = pd.DataFrame(rows).set_index("rank")
        for column in ("source", "snippet"):  # corpus text: st.table renders markdown
            table[column] = table[column].astype(str).map(inert_markdown)
        st.table(table.style.format({"score": "{:.3f}"}))


def show_answer(chunks: Iterable[str], finish: Callable[[str], Answer] | None = None) -> str:
    """The answer as it streams, shown inert (no image, no raw HTML), and its whole text.

    With ``finish`` it streams sentence by sentence (none is shown cut by the token limit),
    then shows the finished answer with each sentence's ``[n]``.
    """
    shown, text = st.empty(), ""
    for chunk in chunks:
        text += chunk
        shown.markdown(inert_markdown(text if finish is None else settled_prefix(text)))
    if finish is None:
        return text
    answer = finish(text)
    text = answer.cited_text()
    shown.markdown(inert_markdown(text))
    if answer.trimmed:
        st.caption("Trimmed to its last complete sentence: the model reached its token limit.")
    return text


def answer(lab: backend.Backend, question: str) -> tuple[str, list[dict[str, Any]]]:
    """Stream the answer into the page, then show the passages it was given."""
    with lab.ask(question) as reply:
        text = show_answer(reply.chunks, reply.finish)
    rows = reply.rows()
    show_sources(rows)
    return str(text), rows


def clear() -> None:
    st.session_state[HISTORY] = []


settings = get_settings()
st.title("Chat")
st.caption(
    "Answers from the chat model (DAGMA_LLM, default the local SmolLM2) grounded in the "
    "retrieved passages; the number after each sentence is the source below that supports it."
)

history: list[dict[str, Any]] = st.session_state.setdefault(HISTORY, [])
for turn in history:
    with st.chat_message("user"):
        st.markdown(inert_markdown(turn["question"]))
    with st.chat_message("assistant"):
        st.markdown(inert_markdown(turn["answer"]))
        show_sources(turn["sources"])

with ui.guard("Answering"):
    lab = backend.for_settings(settings)
    lab.prepare_chat()
    st.sidebar.button("Clear the conversation", icon=":material/delete:", on_click=clear)
    question = st.chat_input("Ask about Python, e.g. how do I catch an exception?")
    if question:
        with st.chat_message("user"):
            st.markdown(inert_markdown(question))
        with st.chat_message("assistant"):
            try:
                text, rows = answer(lab, question)
            except ValueError as exc:
                st.warning(str(exc), icon=":material/warning:")
            else:
                history.append({"question": question, "answer": text, "sources": rows})
    elif not history:
        st.info("Ask a question below.", icon=":material/chat:")
