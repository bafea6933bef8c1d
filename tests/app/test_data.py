"""The app's read-only data layer: the pure parts, without Streamlit."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import pytest

from dagma.app import data


def run(name: str, minute: int, **params: str) -> data.RunInfo:
    start = datetime(2026, 1, 1, 12, minute).astimezone()
    return data.RunInfo(
        run_id=f"{name}-{minute:02d}" + "0" * 24,
        name=name,
        status="FINISHED",
        start=start,
        end=start + timedelta(seconds=3),
        metrics={"accuracy": minute / 100},
        params=params,
    )


def test_param_diff_keeps_only_what_differs():
    a = run("wine_model", 1, C="1.0", seed="42", max_iter="500")
    b = run("wine_model", 2, C="0.5", seed="42", test_size="0.25")
    diff = data.param_diff(a, b)
    assert diff.to_dict("records") == [
        {"parameter": "C", "A": "1.0", "B": "0.5"},
        {"parameter": "max_iter", "A": "500", "B": "—"},
        {"parameter": "test_size", "A": "—", "B": "0.25"},
    ]
    assert data.param_diff(a, a).empty


def test_default_pair_prefers_two_runs_of_one_asset():
    runs = [run("rag_eval", 5), run("wine_model", 4), run("doc_vectors", 3), run("wine_model", 2)]
    assert data.default_pair(runs) == (1, 3)
    assert data.default_pair(runs[:3]) == (0, 1)
    assert data.default_pair(runs[:1]) == (0, 0)


def test_metric_series_is_oldest_first_and_skips_runs_without_the_metric():
    runs = [run("wine_model", 3), run("wine_model", 1), run("rag_eval", 2)]
    runs[2].metrics.clear()
    series = data.metric_series(runs, "accuracy")
    assert list(series["accuracy"]) == [0.01, 0.03]
    assert data.metric_series(runs, "mrr").empty


@pytest.mark.parametrize(
    ("uri", "path"),
    [
        ("sqlite:////tmp/lab/mlflow.db", Path("/tmp/lab/mlflow.db")),
        ("file:///tmp/lab/mlruns", Path("/tmp/lab/mlruns")),
        ("/tmp/lab/mlruns", Path("/tmp/lab/mlruns")),
        ("http://127.0.0.1:5000", None),
    ],
)
def test_local_tracking_stores_are_recognised(uri: str, path: Path | None):
    from dagma.lib import tracking

    assert tracking.local_store(uri) == path


def test_a_missing_or_empty_store_is_not_ready_and_stays_missing(tmp_path: Path):
    db = tmp_path / "mlflow" / "mlflow.db"
    with pytest.raises(data.NotReady, match="make demo"):
        data.mlflow_client(f"sqlite:///{db}")
    assert not db.parent.exists()
    db.parent.mkdir()
    db.touch()
    with pytest.raises(data.NotReady):
        data.require_tracking_store(f"sqlite:///{db}")
    assert db.stat().st_size == 0


def test_a_missing_dagster_instance_is_not_ready(tmp_path: Path):
    with pytest.raises(data.NotReady, match="make demo"):
        data.open_instance(tmp_path / "dagster")
    (tmp_path / "dagster").mkdir()
    (tmp_path / "dagster" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with pytest.raises(data.NotReady):
        data.require_instance(tmp_path / "dagster")
    assert sorted(p.name for p in (tmp_path / "dagster").iterdir()) == ["dagster.yaml"]


def test_executed_notebooks_are_newest_first_with_their_context(tmp_path: Path):
    import os

    from dagma.lib.run_folder import RunFolder
    from dagma.nb import NotebookContext, RunTarget

    for i, (run_id, asset, partition) in enumerate(
        [("run-a", "wine_model", None), ("run-b", "wine_daily_scores", "2026-01-02")]
    ):
        folder = RunFolder.of(tmp_path, run_id, asset).create()
        folder.html.write_text("<html></html>")
        folder.ipynb.write_text("{}")
        target = RunTarget("", "dagma", None, None, "", "c", run_id, partition_key=partition)
        context = NotebookContext(asset, [asset], target, {}, folder.outputs, mlflow_run_id="m1")
        folder.write_context(context.to_json())  # as the runner writes it
        os.utime(folder.html, (1_000_000 + i, 1_000_000 + i))
    books = data.executed_notebooks(tmp_path)
    assert [(b.asset, b.run_id, b.partition, b.mlflow_run_id) for b in books] == [
        ("wine_daily_scores", "run-b", "2026-01-02", "m1"),
        ("wine_model", "run-a", None, "m1"),
    ]
    assert books[0].ipynb is not None and "[2026-01-02]" in books[0].label
    with pytest.raises(data.NotReady, match="make demo"):
        data.executed_notebooks(tmp_path / "nothing")


def test_source_rows_number_and_trim_the_passages():
    from langchain_core.documents import Document

    docs = [
        Document(page_content="word " * 100, metadata={"source": "pydoc:try", "score": 0.71}),
        Document(page_content="short", metadata={"source": "docs:x.md", "score": 0.5}),
    ]
    rows = data.source_rows(docs)
    assert [(r["rank"], r["source"], r["score"]) for r in rows] == [
        (1, "pydoc:try", 0.71),
        (2, "docs:x.md", 0.5),
    ]
    assert rows[0]["snippet"].endswith("…") and len(rows[0]["snippet"]) <= data.SNIPPET_CHARS + 1
    assert rows[1]["snippet"] == "short"


def test_the_app_reads_qdrant_with_the_read_only_key_when_there_is_one(
    monkeypatch: pytest.MonkeyPatch,
):
    from dagma.settings import Settings

    monkeypatch.delenv("QDRANT_READ_ONLY_API_KEY", raising=False)
    monkeypatch.delenv("QDRANT_API_KEY", raising=False)
    assert Settings().qdrant_key(read_only=True) is None
    monkeypatch.setenv("QDRANT_API_KEY", "writer")  # pragma: allowlist secret
    assert Settings().qdrant_key(read_only=True) == "writer"
    monkeypatch.setenv("QDRANT_READ_ONLY_API_KEY", "reader")  # pragma: allowlist secret
    assert Settings().qdrant_key(read_only=True) == "reader"
    assert Settings().qdrant_key() == "writer"  # writers keep the writers' key


def test_the_app_uses_only_the_champion_version(tmp_path: Path):
    """A registered version that never passed the gate is not served, even if it is newer."""
    from dagma.lib import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.setup_experiment(uri, "dagma", tmp_path / "artifacts")
    client = tracking.client(uri)
    client.create_registered_model("dagma-wine")
    for _ in range(2):
        client.create_model_version("dagma-wine", source=str(tmp_path))
    with pytest.raises(data.NotReady, match="quality gate"):
        data.current_model(client, uri, "dagma-wine")
    tracking.promote(uri, "dagma-wine", "1")
    ref = data.current_model(client, uri, "dagma-wine")
    assert (ref.version, ref.alias) == ("1", "champion")  # not version 2, which never passed
