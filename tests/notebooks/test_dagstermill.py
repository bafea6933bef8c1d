"""Issue 15: dagstermill notebooks and definitions run in the lab, on real kernels and stores."""

import os
import pickle  # nosec B403 # reads what this test's own run stored
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import mlflow
import nbformat
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from dagma.lab import load_definitions, materialize
from dagma.lib.telemetry import tracing
from dagma.notebooks.spec import NotebookError, parse_notebook
from dagma.settings import PROJECT_ROOT, get_settings
from tests.conftest import QUIET
from tests.notebooks.test_spec import write_nb

pytestmark = pytest.mark.integration

# Shaped like Dagster's notebook-assets tutorial: the parameters cell holds by-hand code.
HAND_WRITTEN = """\
from pathlib import Path

import dagster as dg
from dagstermill import define_dagstermill_asset

wine_report = define_dagstermill_asset(
    name="wine_report",
    notebook_path=str(Path(__file__).with_name("wine_report.ipynb")),
    ins={"table": dg.AssetIn("wine_table")},
)
"""
# A dagstermill op in a job, with its executed notebook as an output.
HAND_WRITTEN_JOB = """from pathlib import Path

import dagster as dg
from dagstermill import define_dagstermill_op

greet = define_dagstermill_op(
    name="greet",
    notebook_path=str(Path(__file__).with_name("greet.ipynb")),
    output_notebook_name="notebook",
)


@dg.job
def greeting_job():
    greet()
"""
CLUSTERS_PARAMS = (
    'upstream = ["wine_table"]\n'
    'asset = {"engine": "dagstermill", "partitions": {"static": ["a", "b"]}}\n'
    "k: int = 3\nrate: float = 1\npartition_key: str = ''"
)
CLUSTERS_BODY = """\
import dagstermill
import dagster as dg
import mlflow

context = dagstermill.get_context()
context.log.info(f"k={k}")
with mlflow.start_run():
    mlflow.log_metric("rows", len(wine_table))
dagstermill.yield_event(dg.AssetObservation(asset_key="wine_groups", metadata={"k": k}))
dagstermill.yield_result({
    "rows": len(wine_table), "k": k, "rate": rate, "partition": context.partition_key,
    "parameter": partition_key, "config": dict(context.op_config or {}),
    "tracking": context.resources.mlflow.tracking_uri,
})"""


def _notebook(path: Path, params: str, body: str) -> Path:
    """A notebook as Jupyter saves it, with its kernel named."""
    write_nb(path, params=params, body=body)
    nb = nbformat.read(path, as_version=4)
    nb.metadata["kernelspec"] = {"name": "python3", "language": "python", "display_name": "Py"}
    nbformat.write(nb, path)
    return path


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One lab for the module: a copy of notebooks/, a team defs folder, wine_table made once."""
    root = tmp_path_factory.mktemp("dagstermill")
    folder = root / "notebooks"
    shutil.copytree(PROJECT_ROOT / "notebooks", folder)
    team = root / "team"
    team.mkdir()
    (team / "report.py").write_text(HAND_WRITTEN)
    _notebook(
        team / "wine_report.ipynb",
        params="import pandas as pd\ntable = pd.DataFrame({'by_hand': [1]})",
        body="import dagstermill\ncontext = dagstermill.get_context()\nprint('rows', len(table))",
    )
    (team / "greeting.py").write_text(HAND_WRITTEN_JOB)
    _notebook(team / "greet.ipynb", params="who = 'you'", body="print('hello')")
    _notebook(folder / "wine_groups.ipynb", CLUSTERS_PARAMS, CLUSTERS_BODY)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DAGMA_NOTEBOOKS_DIR", str(folder))
        mp.setenv("DAGMA_DEFS_DIR", str(team))
        mp.setenv("DAGMA_HOME", str(root / "home"))
        mp.delenv("DAGSTER_HOME", raising=False)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        run = materialize(get_settings(), selection=["wine_table"], console=QUIET)
        assert run.success, run.error
        yield folder


def _dagster(*args: str) -> subprocess.CompletedProcess[str]:
    """The Dagster CLI on the lab's code location, as a user would run it."""
    get_settings().export_env()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    dagster = str(Path(sys.executable).parent / "dagster")
    done = subprocess.run(
        [dagster, *args, "-m", "dagma.definitions"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _materialized(key: str) -> bool:
    instance = dg.DagsterInstance.get()
    return instance.get_latest_materialization_event(dg.AssetKey(key)) is not None


def _latest(key: str) -> dg.EventLogEntry:
    event = dg.DagsterInstance.get().get_latest_materialization_event(dg.AssetKey(key))
    assert event is not None
    return event


def test_a_hand_written_dagstermill_asset_materializes_through_dagma_run(lab: Path):
    run = materialize(get_settings(), selection=["wine_report"], console=QUIET)
    assert run.success, run.error
    metadata = _latest("wine_report").asset_materialization.metadata
    assert isinstance(metadata["notebook"], dg.NotebookMetadataValue)  # the UI's "View Notebook"
    assert metadata["notebook"].value.endswith("wine_report.view.ipynb")  # its inert copy
    kept = Path(metadata["executed_notebook"].value)
    assert kept.parent.parent.name == run.run_id and kept.is_file()
    executed = nbformat.read(kept, as_version=4)
    assert "rows 178" in str(executed.cells[-2].outputs)  # the table came from wine_table
    assert Path(metadata["html"].value).read_text().startswith("<!DOCTYPE html>")
    logged = mlflow.MlflowClient(get_settings().tracking_uri).get_run(
        metadata["mlflow_run_id"].text
    )
    assert logged.info.status == "FINISHED"
    assert logged.data.tags["dagma.dagster_run_id"] == run.run_id
    assert logged.data.tags["dagma.engine"] == "dagstermill"

    node = load_definitions(get_settings()).resolve_asset_graph().get(dg.AssetKey("wine_report"))
    assert {"jupyter", "dagstermill"} <= node.kinds
    assert node.code_version and node.automation_condition is not None

    # dagstermill's inputs for the kernel went to the lab's scratch folder, not to a folder of
    # the machine's temp shared by every user, and are gone once the run ended.
    assert not (Path(tempfile.gettempdir()) / "dagstermill" / run.run_id).exists()
    scratch = get_settings().scratch_dir / "dagstermill"
    assert scratch.is_dir() and not (scratch / run.run_id).exists()


def test_a_hand_written_dagstermill_asset_materializes_through_the_dagster_cli(lab: Path):
    before = _latest("wine_report").run_id
    _dagster("asset", "materialize", "--select", "wine_report")
    event = _latest("wine_report")
    assert event.run_id != before
    assert Path(event.asset_materialization.metadata["html"].value).is_file()


def test_a_hand_written_dagstermill_job_runs_with_the_lab_resources(lab: Path):
    _dagster("job", "execute", "-j", "greeting_job")
    event = _latest("greet_output_notebook")
    kept = Path(event.asset_materialization.metadata["executed_notebook"].value)
    assert kept.is_file() and "hello" in kept.read_text()
    assert kept.with_suffix(".html").is_file()


def test_a_dagstermill_engine_dropin_keeps_defaults_and_takes_typed_config(lab: Path):
    exporter = InMemorySpanExporter()
    tracing.configure(exporter)
    try:
        run = materialize(
            get_settings(),
            selection=["wine_groups"],
            params={"wine_groups": {"rate": 0.5}},  # a float declared with the default 1
            console=QUIET,
        )
    finally:
        tracing.shutdown()
    assert run.success, run.error
    # dagstermill's own cell loop is traced too: its cells sit under the step's execute span
    spans = exporter.get_finished_spans()
    [execute] = [s for s in spans if s.name == "notebook.execute"]
    cells = [s for s in spans if s.name == "notebook.cell"]
    assert len(cells) >= 4 and {c.parent.span_id for c in cells} == {execute.context.span_id}
    [step] = [s for s in spans if s.name == "step wine_groups"]
    assert {s.context.trace_id for s in spans} == {step.context.trace_id}
    value = run.values["wine_groups"]
    assert value == {
        "rows": 178,  # wine_table, loaded by dagstermill into the variable of its name
        "k": 3,  # the parameters cell's default survived dagstermill
        "rate": 0.5,
        "partition": "b",  # the latest static partition, on dagstermill's own context
        "parameter": "b",
        "config": {"rate": 0.5},
        "tracking": get_settings().tracking_uri,  # the lab's resources, in the kernel
    }
    event = _latest("wine_groups")
    assert event.asset_materialization.partition == "b"
    metadata = event.asset_materialization.metadata
    executed = nbformat.read(metadata["executed_notebook"].value, as_version=4)
    tags = [c.metadata.get("tags", []) for c in executed.cells]
    assert ["dagma-defaults"] in tags and ["injected-parameters"] in tags
    assert Path(metadata["html"].value).is_file()

    logged = mlflow.MlflowClient(get_settings().tracking_uri).get_run(
        metadata["mlflow_run_id"].text
    )
    assert logged.data.metrics["rows"] == 178  # a plain mlflow.start_run() logged into it
    assert logged.data.tags["dagma.notebook"] == "wine_groups"
    assert logged.data.tags["dagma.partition"] == "b"
    records = dg.DagsterInstance.get().fetch_observations(dg.AssetKey("wine_groups"), limit=5)
    assert records.records[0].asset_observation.metadata["k"].value == 3

    node = load_definitions(get_settings()).resolve_asset_graph().get(dg.AssetKey("wine_groups"))
    assert {"jupyter", "dagstermill"} <= node.kinds


def test_both_kinds_run_side_by_side_on_two_processes(lab: Path):
    run = materialize(
        get_settings(), selection=["wine_report", "wine_groups"], processes=2, console=QUIET
    )
    assert run.success, run.error
    assert sorted(run.materialized) == ["wine_groups", "wine_report"]


def test_a_dagstermill_notebook_that_hands_no_value_is_its_executed_copy(lab: Path):
    params = 'upstream = ["wine_table"]\nasset = {"engine": "dagstermill"}'
    _notebook(lab / "wine_eda.ipynb", params, "print('columns', len(wine_table.columns))")
    try:
        run = materialize(get_settings(), selection=["wine_eda"], console=QUIET)
        assert run.success, run.error
        value = run.values["wine_eda"]
        assert "columns 14" in Path(value["executed_notebook"]).read_text()
        assert Path(value["html"]).is_file()
    finally:
        (lab / "wine_eda.ipynb").unlink()


def test_a_failing_dagstermill_notebook_keeps_ipynb_html_and_fails_its_mlflow_run(lab: Path):
    params = 'upstream = ["wine_table"]\nasset = {"engine": "dagstermill"}\nn: int = 1'
    _notebook(lab / "wine_broken.ipynb", params, "raise ValueError(f'boom {n}')")
    try:
        run = materialize(get_settings(), selection=["wine_broken"], console=QUIET)
    finally:
        (lab / "wine_broken.ipynb").unlink()
    assert not run.success
    assert "wine_broken.ipynb failed: ValueError: boom 1" in str(run.error)
    runs_dir = get_settings().runs_dir / run.run_ids[0] / "wine_broken"
    executed = runs_dir / "wine_broken.ipynb"
    assert "boom 1" in executed.read_text()
    assert "boom 1" in (runs_dir / "wine_broken.html").read_text()
    client = mlflow.MlflowClient(get_settings().tracking_uri)
    found = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.`dagma.dagster_run_id` = '{run.run_ids[0]}'",
    )
    assert [r.info.status for r in found] == ["FAILED"]


def test_the_lab_limits_bound_the_dagstermill_engine_too(lab: Path):
    """Output cap, kernel tag and notebook timeout, on dagstermill's own execution."""
    params = 'asset = {"engine": "dagstermill", "max_output": 20000, "max_runtime": 20}\nn: int = 1'
    body = (
        "import os, time\n"
        "print('tagged', os.environ.get('DAGMA_KERNEL_RUN_ID'))\n"
        "for i in range(200_000):\n    print('line', i)\n"
        "time.sleep(n)"
    )
    _notebook(lab / "wine_flood.ipynb", params, body)
    try:
        run = materialize(get_settings(), selection=["wine_flood"], console=QUIET)
        assert run.success, run.error
        executed = Path(run.values["wine_flood"]["executed_notebook"]).read_text()
        assert f"tagged {run.run_ids[0]}" in executed  # a dead run's kernel can be found
        assert "output was cut at 20,000 bytes" in executed and "line 199999" not in executed
        assert len(executed) < 100_000
        tags = dg.DagsterInstance.get().get_run_by_id(run.run_ids[0]).tags
        assert tags["dagster/max_runtime"] == str(20 + 600)  # for run monitoring, with a margin
        late = materialize(
            get_settings(),
            selection=["wine_flood"],
            params={"wine_flood": {"n": 90}},
            console=QUIET,
        )
    finally:
        (lab / "wine_flood.ipynb").unlink()
    assert not late.success
    assert "max_runtime of 20 seconds" in str(late.error)
    assert late.seconds < 80  # not the 90 s sleep


def test_dagstermill_notebooks_errors_name_the_file_and_the_fix(lab: Path, tmp_path: Path):
    bad_engine = write_nb(tmp_path / "odd.ipynb", params='asset = {"engine": "papermil"}')
    with pytest.raises(NotebookError, match=r"odd\.ipynb: `asset\['engine'\]` is 'papermil'.*"):
        parse_notebook(bad_engine)

    team = Path(os.environ["DAGMA_DEFS_DIR"])
    (team / "orphan.py").write_text(
        HAND_WRITTEN.replace('"wine_report"', '"wine_orphan"').replace(
            'AssetIn("wine_table")', 'AssetIn("no_such_table")'
        )
    )
    try:
        with pytest.raises(
            NotebookError,
            match=r"wine_report\.ipynb: upstream 'no_such_table' is not an asset\. Fix the `ins` "
            r"of define_dagstermill_asset\(name='wine_orphan'",
        ):
            load_definitions(get_settings())
    finally:
        (team / "orphan.py").unlink()

    (team / "broken.py").write_text(
        HAND_WRITTEN.replace('"wine_report"', '"wine_broken_nb"').replace(
            '"wine_report.ipynb"', '"broken.ipynb"'
        )
    )
    (team / "broken.ipynb").write_text("{not json")
    try:
        with pytest.raises(NotebookError, match=r"broken\.ipynb: not a valid Jupyter notebook"):
            load_definitions(get_settings())
    finally:
        (team / "broken.py").unlink()
        (team / "broken.ipynb").unlink()


def test_a_defs_dir_that_is_not_a_folder_names_the_variable(
    lab: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("DAGMA_DEFS_DIR", str(tmp_path / "missing"))
    with pytest.raises(NotebookError, match=r"DAGMA_DEFS_DIR=.*missing is not a folder"):
        load_definitions(get_settings())


def test_the_stored_partition_is_the_handed_value(lab: Path):
    stored = get_settings().dagster_dir / "storage" / "wine_groups" / "b"
    with open(stored, "rb") as fh:
        assert pickle.load(fh)["k"] == 3  # nosec B301


def test_the_dagster_ui_opens_the_executed_notebooks_of_both_engines(
    lab: Path, monkeypatch: pytest.MonkeyPatch
):
    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._core.workspace.load_target import ModuleTarget
    from dagster_webserver.webserver import DagsterWebserver
    from starlette.testclient import TestClient

    settings = get_settings()
    missing = [k for k in ("wine_report", "wine_groups") if not _materialized(k)]
    if missing:  # when run alone
        assert materialize(settings, selection=missing, console=QUIET).success
    settings.export_env()
    # The viewer serves only notebooks under the code server's working directory, as with
    # `dagster dev` started in a project whose DAGMA_HOME is inside it (the default ./.dagma).
    monkeypatch.chdir(lab.parent)
    target = ModuleTarget(
        module_name="dagma.definitions",
        attribute=None,
        working_directory=str(lab.parent),
        location_name="dagma",
    )
    expected = {"wine_report": "rows 178", "wine_groups": "yield_result", "wine_table": None}
    with WorkspaceProcessContext(dg.DagsterInstance.get(), target) as context:
        client = TestClient(DagsterWebserver(context).create_asgi_app())
        for key, text in expected.items():
            metadata = _latest(key).asset_materialization.metadata
            if text is None:  # a Python asset: no notebook to view
                assert "executed_notebook" not in metadata
                continue
            page = client.get(
                "/notebook",
                params={"path": metadata["notebook"].value, "repoLocName": "dagma"},
            )
            assert page.status_code == 200, page.text[:500]
            assert text in page.text  # the executed notebook, rendered by the webserver


def test_in_process_execution_is_what_dagstermill_refuses_and_dagma_run_avoids(lab: Path):
    definitions = load_definitions(get_settings())
    job = definitions.resolve_implicit_global_asset_job_def()
    result = job.execute_in_process(
        instance=dg.DagsterInstance.get(),
        asset_selection=[dg.AssetKey("wine_report")],
        raise_on_error=False,
    )
    assert not result.success
    [failure] = [e for e in result.all_events if e.is_step_failure]
    assert "not reconstructable" in failure.step_failure_data.error.message
