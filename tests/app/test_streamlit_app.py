"""Every page against the real demo state, through Streamlit's own test harness."""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from tests.app._support import APP, PAGES, free_port, running

pytestmark = pytest.mark.integration
QUESTION = "How do I catch an exception?"


def open_page(name: str, timeout: float = 120) -> AppTest:
    app = AppTest.from_file(str(APP), default_timeout=timeout).run()
    app.switch_page(f"pages/{name}.py").run()
    assert not app.exception, [e.value for e in app.exception]
    assert app.title[0].value == name.capitalize()
    return app


def test_overview_lists_assets_with_staleness(demo):
    app = open_page("overview")
    table = app.dataframe[0].value
    assert {"wine_model", "doc_vectors", "rag_eval"} <= set(table["asset"])
    status = table.set_index("asset")["status"]
    assert status[["wine_model", "doc_vectors", "rag_eval"]].isin(["fresh", "stale"]).all()
    counts = [m.value for m in app.metric[1:4]]  # Fresh, Stale, Missing
    assert counts == [str((status == s).sum()) for s in ("fresh", "stale", "missing")]
    assert table.set_index("asset").loc["wine_model", "last materialized"] is not None
    assert any("embedded Dagster instance" in c.value for c in app.caption)
    assert app.metric[0].value == str(len(table))


def test_experiments_shows_runs_a_metric_chart_and_a_param_diff(demo):
    app = open_page("experiments")
    runs = app.dataframe[0].value
    assert {"wine_model", "doc_vectors", "rag_eval"} <= set(runs["run"])
    metric = app.selectbox[0]
    assert metric.label == "Metric" and "accuracy" in metric.options
    assert metric.value == "accuracy"
    assert len(app.get("vega_lite_chart")) == 1
    metric.set_value("mrr").run()
    assert not app.exception
    assert any("1 of" in c.value and "mrr" in c.value for c in app.caption)
    run_a = next(s for s in app.selectbox if s.label == "Run A")
    run_b = next(s for s in app.selectbox if s.label == "Run B")
    ids = {row["run"]: row["mlflow"].rsplit("/", 1)[-1] for _, row in runs.iterrows()}
    wine, rag = ids["wine_model"], ids["rag_eval"]
    run_a.set_value(wine)
    run_b.set_value(rag).run()
    assert not app.exception
    diff = app.dataframe[1].value
    assert not app.table  # a table would render markdown in logged parameter values
    assert len(diff) > 0
    assert all(row["A"] != row["B"] for _, row in diff.iterrows())


def test_model_predicts_a_class_with_probabilities(demo):
    app = open_page("model")
    assert any(re.search(r"dagma-wine v\d+", m.value) for m in app.markdown)
    assert app.metric[0].label == "Predicted class"
    assert app.metric[0].value == "1"  # the form starts at the medians: the second cultivar
    assert len(app.get("vega_lite_chart")) == 1
    features = {n.key.removeprefix("feature-"): n for n in app.number_input}
    assert "alcohol" in features and "proline" in features
    features["proline"].set_value(1500.0)
    features["flavanoids"].set_value(3.5)
    next(b for b in app.button if b.label == "Predict").click().run()
    assert not app.exception
    assert app.metric[0].value == "0"  # rich in proline and flavanoids: the first cultivar


def test_search_returns_hits_with_payloads_and_filters_by_source(demo):
    app = open_page("search")
    app.text_input[0].input(QUESTION).run()
    labels = [e.label for e in app.expander]
    assert len(labels) == 5
    assert any("pydoc:" in label for label in labels)
    payloads = [json.loads(j.value) for j in app.json]
    assert all({"id", "source", "title", "chunk"} <= set(p) for p in payloads)
    app.slider[0].set_value(3).run()
    assert len(app.expander) == 3
    source = app.selectbox[0]
    assert "pydoc:try" in source.options
    source.set_value("pydoc:try").run()
    assert not app.exception
    assert app.expander and all("pydoc:try" in e.label for e in app.expander)


def test_chat_streams_an_answer_with_its_sources(demo):
    app = open_page("chat", timeout=300)
    app.chat_input[0].set_value(QUESTION).run()
    assert not app.exception, [e.value for e in app.exception]
    user, assistant = app.chat_message
    assert user.markdown[0].value == QUESTION
    assert len(assistant.markdown[0].value.strip()) > 20
    sources = assistant.table[0].value
    assert list(sources.columns) == ["source", "score", "snippet"]
    assert any(s.startswith("pydoc:") for s in sources["source"])
    app.run()  # the conversation survives a rerun
    assert len(app.chat_message) == 2
    assert app.chat_message[1].markdown[0].value == assistant.markdown[0].value


def test_notebooks_lists_and_renders_the_executed_notebooks(demo):
    app = open_page("notebooks")
    names = {m.value.split("**")[1] for m in app.markdown if m.value.startswith("**")}
    assert {"wine_model", "doc_vectors"} <= names
    assert [b.label for b in app.button].count("Viewing") == 1
    assert len(app.get("download_button")) == 2
    assert app.get("iframe")
    # Each materialization has its MLflow run, created before the kernel: the page links it.
    links = " ".join(c.value for c in app.caption if "[Dagster run](" in c.value)
    assert re.search(r"\[MLflow run\]\(http://[^)]+/#/experiments/\d+/runs/[0-9a-f]{32}\)", links)
    before = app.subheader[0].value
    next(b for b in app.button if b.label == "View").click().run()
    assert not app.exception
    assert app.subheader[0].value != before


def _snapshot(home: Path) -> dict[str, tuple[int, float]]:
    return {
        str(p.relative_to(home)): (p.stat().st_size, p.stat().st_mtime)
        for p in home.rglob("*")
        if p.is_file() and not p.name.endswith(("-wal", "-shm", "-journal"))
    }


def test_the_app_never_writes_the_lab(demo):
    settings, _ = demo
    before = _snapshot(settings.home)
    for name in PAGES:
        open_page(name)
    app = open_page("search")
    app.text_input[0].input(QUESTION).run()
    assert _snapshot(settings.home) == before


@pytest.fixture
def dagster_webserver(demo, tmp_path: Path) -> Iterator[str]:
    """`dagster-webserver` over the demo's instance, as `make dagster` or services mode run it."""
    settings, _ = demo
    url = f"http://127.0.0.1:{free_port()}"
    argv = [sys.executable, "-m", "dagster_webserver", "-m", "dagma.definitions"]
    argv += ["-h", "127.0.0.1", "-p", url.rsplit(":", 1)[1]]
    env = {**os.environ, "DAGSTER_HOME": str(settings.dagster_dir)}
    with running(argv, env, tmp_path / "webserver.log", f"{url}/server_info", timeout=180):
        yield url


def test_overview_reads_the_dagster_webserver_when_one_answers(
    dagster_webserver, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("DAGSTER_UI_URL", dagster_webserver)
    app = open_page("overview", timeout=180)
    assert any(f"Dagster webserver at {dagster_webserver}" in c.value for c in app.caption)
    table = app.dataframe[0].value.set_index("asset")
    assert {"wine_model", "doc_vectors", "rag_eval", "wine_daily_scores"} <= set(table.index)
    assert table.loc["wine_model", "run"].startswith(f"{dagster_webserver}/runs/")
    assert table.loc["wine_daily_scores", "partition"]
