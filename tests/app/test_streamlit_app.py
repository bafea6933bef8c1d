"""The app against the real demo state, through Streamlit's own test harness."""

import pytest
from streamlit.testing.v1 import AppTest

from dagma.settings import PROJECT_ROOT

pytestmark = pytest.mark.integration
APP = str(PROJECT_ROOT / "src" / "dagma" / "app" / "streamlit_app.py")


def test_app_shows_latest_runs_and_searches_the_collection(demo):
    app = AppTest.from_file(APP, default_timeout=60).run()
    assert not app.exception
    table = app.dataframe[0].value
    assert {"wine_model", "doc_vectors", "rag_eval"} <= set(table["run"])
    app.text_input[0].input("How do I catch an exception?").run()
    assert not app.exception
    titles = [e.label for e in app.expander]
    assert len(titles) == 5
    assert any("pydoc:" in t for t in titles)


def test_app_explains_what_to_run_on_an_empty_lab(tmp_path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DAGMA_HOME", str(tmp_path / "empty"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    app = AppTest.from_file(APP, default_timeout=60).run()
    assert not app.exception
    assert any("make demo" in i.value for i in app.info)
    app.text_input[0].input("anything").run()
    assert not app.exception
    assert any("make demo" in w.value for w in app.warning)
