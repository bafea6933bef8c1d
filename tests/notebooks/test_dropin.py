"""Issue 3's acceptance: a notebook dropped into notebooks/ is an asset, with no Python code."""

from pathlib import Path

import dagster as dg
import mlflow
import nbformat
import pytest

from dagma.lab import load_definitions, materialize
from dagma.notebooks.spec import NotebookError
from dagma.settings import get_settings
from tests.conftest import QUIET
from tests.notebooks.test_spec import write_nb

pytestmark = pytest.mark.integration

BODY = (
    "from dagma import nb\nctx = nb.context()\nwine = ctx.upstream('wine_table')\n"
    "ctx.output({'rows': len(wine), 'top': top, 'label': label})"
)


def summary_notebook(folder: Path) -> Path:
    return write_nb(
        folder / "wine_summary.ipynb",
        params='upstream = ["wine_table"]\ntop: int = 3\nlabel: str = "wine"',
        body=BODY,
    )


def test_a_dropped_in_notebook_becomes_an_asset_and_materializes(lab: Path):
    summary_notebook(lab)
    defs = load_definitions(get_settings())
    node = defs.resolve_assets_def("wine_summary")
    assert node.descriptions_by_key[dg.AssetKey("wine_summary")].startswith("# Title")
    assert dg.AssetKey("wine_table") in node.keys_by_input_name.values()
    run = materialize(get_settings(), selection=["wine_table", "wine_summary"], console=QUIET)
    assert run.success, run.error
    assert run.values["wine_summary"] == {"rows": 178, "top": 3, "label": "wine"}
    event = dg.DagsterInstance.get().get_latest_materialization_event(dg.AssetKey("wine_summary"))
    metadata = event.asset_materialization.metadata
    assert Path(metadata["executed_notebook"].value).is_file()
    assert Path(metadata["html"].value).read_text().startswith("<!DOCTYPE html>")


def test_an_unknown_upstream_fails_the_load_naming_the_file(lab: Path):
    write_nb(lab / "orphan.ipynb", params='upstream = ["no_such_asset"]', body=BODY)
    with pytest.raises(NotebookError, match=r"orphan\.ipynb: upstream 'no_such_asset' is not"):
        load_definitions(get_settings())


def test_a_cycle_between_notebooks_fails_the_load_naming_both_files(lab: Path):
    write_nb(lab / "chicken.ipynb", params='upstream = ["egg"]', body=BODY)
    write_nb(lab / "egg.ipynb", params='upstream = ["chicken"]', body=BODY)
    with pytest.raises(NotebookError, match=r"in a cycle: .*(chicken|egg)\.ipynb -> ") as err:
        load_definitions(get_settings())
    assert "chicken.ipynb" in str(err.value) and "egg.ipynb" in str(err.value)
    assert "`upstream` list" in str(err.value)


def test_a_malformed_notebook_fails_the_load_naming_the_file(lab: Path):
    (lab / "broken.ipynb").write_text("{not json")
    with pytest.raises(NotebookError, match=r"broken\.ipynb: not a valid Jupyter notebook"):
        load_definitions(get_settings())


def test_a_raising_notebook_fails_the_run_keeps_its_copies_and_fails_its_mlflow_run(lab: Path):
    write_nb(
        lab / "late_failure.ipynb",
        params="n: int = 1",
        body=(
            "from dagma import nb\nctx = nb.context()\nwith ctx.start_run():\n    pass\n"
            "raise RuntimeError('late failure')"
        ),
    )
    run = materialize(get_settings(), selection=["late_failure"], console=QUIET)
    assert not run.success
    assert "RuntimeError: late failure" in run.error
    copy = Path(run.error.split("Executed copy: ")[1].split("\n")[0].strip())
    assert copy.is_file() and copy.with_suffix(".html").is_file()
    settings = get_settings()
    mlflow.set_tracking_uri(settings.tracking_uri)
    [failed] = mlflow.search_runs(
        experiment_names=[settings.dagma_experiment],
        filter_string="tags.`dagma.notebook` = 'late_failure'",
        output_format="list",
    )
    assert failed.info.status == "FAILED"
    files = {a.path for a in mlflow.MlflowClient().list_artifacts(failed.info.run_id, "notebook")}
    assert files == {"notebook/late_failure.ipynb", "notebook/late_failure.html"}


def test_markdown_edits_keep_the_code_version_and_code_edits_make_it_stale(lab: Path):
    path = summary_notebook(lab)
    assert materialize(
        get_settings(), selection=["wine_table", "wine_summary"], console=QUIET
    ).success
    assert materialize(get_settings(), stale_only=True, selection=["wine_summary"]).run_id is None

    nb = nbformat.read(path, as_version=4)
    nb.cells[0].source = "# A better title\n\nSame code."
    nbformat.write(nb, path)
    assert materialize(get_settings(), stale_only=True, selection=["wine_summary"]).run_id is None

    nb.cells[-1].source = BODY.replace("len(wine)", "len(wine) + 1")
    nbformat.write(nb, path)
    rerun = materialize(
        get_settings(), stale_only=True, selection=["wine_table", "wine_summary"], console=QUIET
    )
    assert rerun.success, rerun.error
    assert "wine_summary" in rerun.materialized and "wine_table" not in rerun.materialized
    assert rerun.values["wine_summary"]["rows"] == 179


def test_cli_parameters_are_coerced_to_declared_types_and_checked(lab: Path):
    from typer.testing import CliRunner

    from dagma.cli import app

    summary_notebook(lab)
    runner = CliRunner()
    done = runner.invoke(app, ["run", "wine_table", "wine_summary", "-p", "top=5"])
    assert done.exit_code == 0, done.output
    event = dg.DagsterInstance.get().get_latest_materialization_event(dg.AssetKey("wine_summary"))
    assert event.asset_materialization.metadata["parameters"].value == {"top": 5, "label": "wine"}

    wrong = runner.invoke(app, ["run", "wine_summary", "-p", "top=many"])
    assert wrong.exit_code == 2, wrong.output  # NotebookError, printed by the CLI
    assert "error: wine_summary.ipynb: parameter 'top' = 'many'" in wrong.output
    unknown = runner.invoke(app, ["run", "wine_summary", "-p", "wine_summary.tpo=1"])
    assert unknown.exit_code == 2 and "unknown parameter 'tpo'" in unknown.output


TYPED = """rate: float = 1
n: int = 3
flag: bool = False
label: str = "x"
mode: Literal["fast", "slow"] = "fast"
share: Annotated[float, Field(ge=0, le=1)] = 0.5
ids: list[int] = [1]
opts: dict = {}"""


def test_the_launchpad_schema_has_the_declared_types_and_cli_strings_take_them(lab: Path):
    from typer.testing import CliRunner

    from dagma.cli import app

    body = "from dagma import nb\nnb.context().output({'rate': rate, 'ids': ids, 'mode': mode})"
    path = write_nb(lab / "ftest.ipynb", params=TYPED, body=body)
    nb = nbformat.read(path, as_version=4)
    nb.cells[1].source = "from typing import Annotated, Literal\n\nfrom pydantic import Field"
    nbformat.write(nb, path)
    op = load_definitions(get_settings()).resolve_assets_def("ftest").op
    fields = op.config_schema.as_field().config_type.fields
    kinds = {
        name: field.config_type.given_name or field.config_type.key
        for name, field in fields.items()
    }
    assert kinds["rate"] == "Float" and kinds["n"] == "Int" and kinds["flag"] == "Bool"
    assert kinds["label"] == "String" and kinds["share"] == "Float"  # the range: checked once
    mode = fields["mode"].config_type
    assert [v.config_value for v in mode.enum_values] == ["fast", "slow"]
    assert fields["ids"].config_type.inner_type.key == "Int"
    assert fields["rate"].description == "float parameter of ftest.ipynb"
    assert fields["share"].description.startswith("Annotated[float, Field(ge=0, le=1)]")

    runner = CliRunner()
    done = runner.invoke(
        app, ["run", "ftest", "-p", "rate=0.5", "-p", "mode=slow", "-p", "ids=[2, 3]"]
    )
    assert done.exit_code == 0, done.output
    event = dg.DagsterInstance.get().get_latest_materialization_event(dg.AssetKey("ftest"))
    assert event.asset_materialization.metadata["value"].value == {
        "rate": 0.5,
        "ids": [2, 3],
        "mode": "slow",
    }
    for pair, declared in (("mode=medium", "Literal"), ("share=2", "Annotated"), ("n=0.5", "int")):
        wrong = runner.invoke(app, ["run", "ftest", "-p", pair])
        assert wrong.exit_code == 2, wrong.output
        name = pair.split("=")[0]
        text = " ".join(wrong.output.split())
        assert f"error: ftest.ipynb: parameter '{name}'" in text
        assert f"(declared {declared}" in text

    # The launchpad path: Dagster's config takes a float in range; the model checks the range.
    out_of_range = materialize(
        get_settings(), selection=["ftest"], params={"ftest": {"share": 2.0}}, console=QUIET
    )
    assert not out_of_range.success
    assert "parameter 'share' = 2.0" in str(out_of_range.error)
