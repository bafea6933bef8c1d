"""The whole demo graph, materialized for real into a temporary DAGMA_HOME."""

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import mlflow
import pytest
from rich.console import Console
from typer.testing import CliRunner

from dagma.cli import app
from dagma.lab import materialize, print_summary
from dagma.lib.answers import Answer
from dagma.lib.sentences import ELLIPSIS, split_sentences
from dagma.lib.vectors import open_store
from dagma.settings import Settings
from tests.conftest import QUIET, stored_value
from tests.test_definitions import DEMO_ASSETS

pytestmark = pytest.mark.integration


def test_demo_materializes_every_asset_and_passes_its_checks(demo):
    _, run = demo
    assert set(run.materialized) == DEMO_ASSETS
    assert run.checks == {"wine_model_quality": True, "rag_retrieval_quality": True}


def test_mlflow_has_the_notebook_run_with_params_metrics_model_and_notebook(demo):
    settings, run = demo
    mlflow.set_tracking_uri(settings.tracking_uri)
    runs = mlflow.search_runs(
        experiment_names=[settings.dagma_experiment],
        filter_string="tags.`dagma.notebook` = 'wine_model'",
        output_format="list",
    )
    found = next(r for r in runs if r.info.run_id == run.values["wine_model"]["mlflow_run_id"])
    assert found.data.params["seed"] == "42" and found.data.params["C"] == "1.0"
    assert found.data.metrics["accuracy"] >= 0.8
    assert found.data.tags["dagma.dagster_run_id"] == run.run_id
    assert found.data.tags["dagma.uv_lock"] != "unknown"
    client = mlflow.MlflowClient(settings.tracking_uri)
    notebook_files = {a.path for a in client.list_artifacts(found.info.run_id, "notebook")}
    assert notebook_files == {"notebook/wine_model.ipynb", "notebook/wine_model.html"}
    assert "confusion_matrix.png" in {a.path for a in client.list_artifacts(found.info.run_id)}
    version = client.get_model_version("dagma-wine", run.values["wine_model"]["model_version"])
    assert version.run_id == found.info.run_id
    model = mlflow.sklearn.load_model(run.values["wine_model"]["model_uri"])
    assert model.predict(model_input_example(settings)).shape == (3,)
    # Stated, not inferred: pinned to what is installed, and nothing from the test process.
    requirements = mlflow.pyfunc.get_model_dependencies(run.values["wine_model"]["model_uri"])
    pins = dict(line.split("==") for line in Path(requirements).read_text().split())
    assert pins == {
        "mlflow": mlflow.__version__,
        "scikit-learn": version_of("scikit-learn"),
        "skops": version_of("skops"),
    }


def version_of(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def model_input_example(settings: Settings):
    from dagma.lib.data import load_wine

    return load_wine().drop(columns=["target"]).head(3)


def test_partitioned_notebook_sees_its_partition_key(demo):
    settings, run = demo
    scores = run.values["wine_daily_scores"]
    mlflow.set_tracking_uri(settings.tracking_uri)
    logged = mlflow.get_run(scores["mlflow_run_id"])
    # The last complete UTC day when it ran (not now: the suite may cross midnight).
    started = datetime.fromtimestamp(logged.info.start_time / 1000, tz=UTC)
    latest = (started.date() - timedelta(days=1)).isoformat()
    assert scores["partition"] == latest
    assert scores["accuracy"] >= 0.8 and scores["rows"] == 40
    assert logged.data.tags["dagma.partition"] == latest


def test_the_day_so_far_scores_exactly_the_hour_the_demo_ingested(demo):
    """The daily notebook runs after its hourly upstream (their keys sort the other way)."""
    settings, _ = demo
    hour = stored_value(settings, "wine_arrivals")
    day = stored_value(settings, "wine_arrival_scores")
    assert len(hour) > 0 and len(day) == len(hour)
    assert list(day["source_file"]) == list(hour["source_file"])
    labelled = day.dropna(subset=["target"])  # the sample arrivals come labelled
    assert len(labelled) == len(day)
    assert (labelled["predicted"] == labelled["target"]).mean() >= 0.8  # the model, not noise


def test_executed_notebooks_are_kept_as_ipynb_and_html(demo):
    settings, run = demo
    folder = settings.runs_dir / run.run_id / "wine_model"
    assert (folder / "wine_model.ipynb").is_file()
    html = (folder / "wine_model.html").read_text()
    assert "data:image/png;base64" in html or "<img" in html
    assert "accuracy" in html


def test_every_chunk_is_one_point_and_a_rerun_never_duplicates(demo):
    settings, run = demo
    first = run.values["doc_vectors"]
    with open_store(url=None, api_key=None, root=settings.qdrant_path) as store:
        assert store.count(first["collection"]) == first["points"] > 500
    again = materialize(settings, selection=["doc_vectors"], console=QUIET)
    assert again.success, again.error
    second = again.values["doc_vectors"]
    assert second["version"] == first["version"] + 1
    assert second["points"] == first["points"]
    assert second["ids_digest"] == first["ids_digest"]
    with open_store(url=None, api_key=None, root=settings.qdrant_path) as store:
        assert store.count(first["collection"]) == first["points"]


def test_rag_eval_logs_retrieval_measures_and_answers_with_sources(demo):
    settings, run = demo
    evaluation = run.values["rag_eval"]
    metrics = evaluation["metrics"]
    assert {"hit_at_1", "hit_at_5", "mrr", "citation_precision", "faithfulness"} <= set(metrics)
    assert 0 < metrics["hit_at_1"] <= metrics["hit_at_5"] <= 1
    assert metrics["hit_at_5"] >= 0.4
    sample = evaluation["sample"]
    assert sample["text"].strip() and sample["attributions"]
    assert sample["sources"] and all(s["source"] for s in sample["sources"])
    mlflow.set_tracking_uri(settings.tracking_uri)
    logged = mlflow.get_run(evaluation["mlflow_run_id"])
    assert logged.data.metrics["hit_at_5"] == pytest.approx(metrics["hit_at_5"])


def test_the_demo_summary_prints_the_attributed_answer_and_no_cut_sentence(demo):
    settings, run = demo
    answer = Answer.model_validate(run.values["rag_eval"]["sample"])
    sentences = split_sentences(answer.text)
    assert sentences and all(s.complete for s in sentences[:-1])
    # the last sentence ended, or the limit cut the only one and the text says so
    assert sentences[-1].complete or (answer.trimmed and answer.text.endswith(ELLIPSIS))
    assert answer.finish_reason in ("stop", "length")
    if answer.trimmed:
        assert answer.raw_text.strip().startswith(answer.text.removesuffix(ELLIPSIS))
    else:
        assert answer.text == answer.raw_text
    attributed = [a for a in answer.attributions if a.source is not None]
    assert attributed and [a.sentence for a in answer.attributions] == [s.text for s in sentences]
    assert {a.source for a in attributed} <= {s.rank for s in answer.sources if s.cited}
    console = Console(record=True, width=400)
    print_summary(run, settings, console)
    lines = console.export_text().splitlines()
    start, end = lines.index(f"Q: {answer.question}"), lines.index("Sources:")
    said = lines[start + 2 : end]
    for a in answer.attributions:  # each sentence, its passage and its score
        mark = f"[{a.source}]" if a.source is not None else "[?]"
        assert f"  {' '.join(a.sentence.split())} {mark} ({a.score:.2f})" in said
    assert ("trimmed" in " ".join(said)) == answer.trimmed
    cited = [line for line in lines[end + 1 :] if ", cited, support 0." in line]
    assert len(cited) == len({a.source for a in attributed})
    if answer.trimmed:
        assert answer.raw_text.strip()[len(answer.text) :].strip() not in " ".join(said)


def test_scorecard_chart_is_written(demo):
    settings, _ = demo
    chart = Path(stored_value(settings, "lab_scorecard"))
    assert chart.read_bytes().startswith(b"\x89PNG")


def test_status_json_names_every_asset_and_collection(demo):
    _, run = demo
    result = CliRunner().invoke(app, ["status", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert {a["key"] for a in report["assets"]} >= DEMO_ASSETS
    assert all(a["last_materialized"] for a in report["assets"])
    assert report["vectors"]["kind"] == "embedded"
    [collection] = report["vectors"]["collections"]
    assert collection["points"] == run.values["doc_vectors"]["points"]
    assert any(r["name"] == "wine_model" for r in report["mlflow"]["runs"])
    by_key = {a["key"]: a for a in report["assets"]}
    html = Path(by_key["wine_model"]["executed_notebook"])  # the run folder of its last run
    assert html.is_file() and html.parent.parent.name == by_key["wine_model"]["run_id"]
    assert by_key["wine_table"]["executed_notebook"] is None  # a Python asset


def test_a_fresh_home_offline_reproduces_metrics_point_ids_and_answer(demo, tmp_path: Path):
    """`dagma demo` with every Python process of it (kernels included) refused any network use
    beyond this machine, which works without root: nothing is downloaded, or even looked up."""
    _, first = demo
    env = {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", "MLFLOW_TRACKING_URI")}
    env["DAGMA_HOME"] = str(tmp_path / "second")
    offline = Path(__file__).with_name("offline")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(offline), env.get("PYTHONPATH")]))
    attempts = tmp_path / "network-attempts.log"
    env["DAGMA_OFFLINE_LOG"] = str(attempts)
    dagma = str(Path(sys.executable).with_name("dagma"))
    probe = "import urllib.request as u; u.urlopen('https://pypi.org', timeout=5)"
    refused = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert refused.returncode != 0 and "offline test: refused" in refused.stderr  # the guard works
    attempts.unlink()
    done = subprocess.run(
        [dagma, "demo", "--json"],
        env=env,
        capture_output=True,
        timeout=600,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip(), "no summary: " + done.stderr[-3000:]
    assert not attempts.exists(), attempts.read_text()  # nothing even tried to go out
    second = json.loads(done.stdout)["values"]
    assert second["wine_model"]["metrics"] == first.values["wine_model"]["metrics"]
    assert second["doc_vectors"]["ids_digest"] == first.values["doc_vectors"]["ids_digest"]
    assert second["rag_eval"]["metrics"] == first.values["rag_eval"]["metrics"]
    assert second["rag_eval"]["sample"]["text"] == first.values["rag_eval"]["sample"]["text"]


def test_run_stale_catches_up_and_then_has_nothing_to_do(demo):
    runner = CliRunner()
    catch_up = runner.invoke(app, ["run", "--stale"])
    assert catch_up.exit_code == 0, catch_up.output
    again = runner.invoke(app, ["run", "--stale"])
    assert again.exit_code == 0, again.output
    assert "Nothing is stale" in again.output
    report = json.loads(runner.invoke(app, ["status", "--json"]).output)
    assert not [a["key"] for a in report["assets"] if a["stale"]]
