"""The app over the API: with DAGMA_API_URL set, Model, Search and Chat go through `dagma serve`.

The app gets an empty DAGMA_HOME of its own, so a page that read the stores would find none.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from dagma.app.backend import AUTHORIZE_FIX
from tests.api.conftest import LabApi, lab_api  # noqa: F401 - the session's served API
from tests.app._support import APP, free_port

pytestmark = pytest.mark.integration
QUESTION = "How do I catch an exception?"


@pytest.fixture
def api_mode(lab_api: LabApi, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> LabApi:  # noqa: F811
    home = tmp_path / "no-lab"
    monkeypatch.setenv("DAGMA_HOME", str(home))
    for name in ("MLFLOW_TRACKING_URI", "QDRANT_URL", "DAGSTER_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DAGMA_API_URL", lab_api.url)
    monkeypatch.setenv("DAGMA_API_TOKEN", lab_api.token())
    return lab_api


def open_page(name: str, timeout: float = 120) -> AppTest:
    app = AppTest.from_file(str(APP), default_timeout=timeout).run()
    app.switch_page(f"pages/{name}.py").run()
    assert not app.exception, [e.value for e in app.exception]
    return app


def warnings(app: AppTest) -> str:
    return " ".join(w.value for w in [*app.warning, *app.info])


def test_model_predicts_through_the_api(api_mode: LabApi) -> None:
    app = open_page("model")
    assert not app.warning, warnings(app)
    assert app.metric[0].label == "Predicted class"
    assert app.metric[0].value == "1"  # the medians: the second cultivar, as from the stores
    by = next(c.value for c in app.caption if c.value.startswith("by "))
    assert re.fullmatch(r"by dagma-wine v\d+ \(through the API\)", by)
    features = {str(n.key).removeprefix("feature-"): n for n in app.number_input}
    assert len(features) == 13 and "proline" in features  # the champion's signature
    features["proline"].set_value(1500.0)
    features["flavanoids"].set_value(3.5)
    next(b for b in app.button if b.label == "Predict").click().run()
    assert not app.exception
    assert app.metric[0].value == "0"


def test_search_goes_through_the_api_and_filters_by_source(api_mode: LabApi) -> None:
    app = open_page("search")
    assert any("through the Dagma API" in c.value for c in app.caption)
    app.text_input[0].input(QUESTION).run()
    assert not app.warning, warnings(app)
    with api_mode.client(["search"]) as api:
        expected = api.search(QUESTION, k=5).hits
    labels = [e.label for e in app.expander]
    assert len(labels) == 5
    assert all(h.source in label for h, label in zip(expected, labels, strict=True))
    payloads = [json.loads(j.value) for j in app.json]
    assert [p["id"] for p in payloads] == [h.id for h in expected]
    app.run()  # the API lists no sources: the page offers those seen in the results
    source = app.selectbox[0]
    assert set(source.options) == {h.source for h in expected}
    wanted = expected[-1].source
    source.set_value(wanted).run()
    assert not app.exception
    assert app.expander and all(f" · {wanted} · " in e.label for e in app.expander)


def test_chat_streams_an_answer_over_sse(api_mode: LabApi) -> None:
    app = open_page("chat", timeout=300)
    app.chat_input[0].set_value(QUESTION).run()
    assert not app.exception, [e.value for e in app.exception]
    assert not app.warning, warnings(app)
    user, assistant = app.chat_message
    assert user.markdown[0].value == QUESTION
    assert len(assistant.markdown[0].value.strip()) > 20
    sources = assistant.table[0].value
    assert list(sources.columns) == ["source", "score", "snippet"]
    assert any(s.startswith("pydoc:") for s in sources["source"])


def test_a_token_without_the_scope_shows_the_apis_error_and_fix(
    api_mode: LabApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DAGMA_API_TOKEN", api_mode.token(["predict", "search"]))
    app = open_page("chat")
    app.chat_input[0].set_value(QUESTION).run()
    shown = warnings(app)
    assert "The API answered 403" in shown and "ask" in shown
    assert "Fix: " in shown and shown.split("Fix: ", 1)[1].strip()
    assert api_mode.token(["ask"]) not in shown


def test_no_token_says_to_set_dagma_api_token(api_mode: LabApi, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("DAGMA_API_TOKEN")
    app = open_page("search")
    app.text_input[0].input(QUESTION).run()
    shown = warnings(app)
    assert "The API answered 401" in shown and "DAGMA_API_TOKEN" in shown
    assert AUTHORIZE_FIX.split("`")[1] in shown


def test_an_api_that_does_not_answer_says_how_to_start_it(
    api_mode: LabApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DAGMA_API_URL", f"http://127.0.0.1:{free_port()}")
    app = open_page("model")
    shown = warnings(app)
    assert "does not answer" in shown or "did not describe" in shown
    assert "dagma serve" in shown and "DAGMA_API_URL" in shown
