"""What each engine executes: the run's values injected, the author's defaults kept."""

from pathlib import Path

import nbformat
import pytest

from dagma.nb import CONTEXT_VAR
from dagma.notebooks import parameterize
from dagma.notebooks.runner import execute
from dagma.notebooks.spec import parse_notebook, read_notebook
from tests.notebooks.test_runner import target
from tests.notebooks.test_spec import write_nb


def tags(nb: nbformat.NotebookNode) -> list[list[str]]:
    return [c.metadata.get("tags", []) for c in nb.cells]


def test_papermill_copy_injects_values_after_the_kept_parameters_cell(tmp_path: Path):
    source = read_notebook(write_nb(tmp_path / "a.ipynb", params="n: int = 1"))
    copy = parameterize.for_papermill(source, {"n": 5, "label": "x"})
    assert tags(copy) == [[], [], ["parameters"], ["injected-parameters"], []]
    assert copy.cells[2].source == "n: int = 1"
    assert "n = 5" in copy.cells[3].source and 'label = "x"' in copy.cells[3].source
    assert len(source.cells) == 4  # the source is left as it was


def test_dagstermill_copy_keeps_defaults_before_the_cell_dagstermill_replaces(tmp_path: Path):
    body = "import mlflow\nprint(n)"
    source = read_notebook(write_nb(tmp_path / "a.ipynb", params="n: int = 1", body=body))
    copy = parameterize.for_dagstermill(source, {"n": 5, CONTEXT_VAR: "/run/context.json"})
    assert tags(copy) == [
        ["dagma-prelude"],
        [],
        [],
        ["dagma-defaults"],
        ["parameters"],  # empty: dagstermill puts its context cell here
        ["dagma-parameters"],
        [],
    ]
    assert copy.cells[3].source == "n: int = 1" and copy.cells[4].source == ""
    values = copy.cells[5].source
    assert "n = 5" in values and "__dagma_kernel.bind(dagma_context)" in values
    assert copy.metadata["kernelspec"]["name"] == "python3"


def test_dagstermill_copy_binds_mlflow_only_for_notebooks_that_use_it(tmp_path: Path):
    source = read_notebook(write_nb(tmp_path / "a.ipynb", params="n: int = 1"))
    copy = parameterize.for_dagstermill(source, {"n": 5, CONTEXT_VAR: "/run/context.json"})
    assert "bind" not in copy.cells[5].source  # no wait for an MLflow run nobody logs to


def test_an_adopted_notebooks_parameters_cell_is_replaced_as_dagstermill_does(tmp_path: Path):
    source = read_notebook(write_nb(tmp_path / "a.ipynb", params="table = load_by_hand()"))
    copy = parameterize.for_dagstermill(source, {}, keep_defaults=False)
    assert tags(copy) == [["dagma-prelude"], [], [], ["parameters"], ["dagma-parameters"], []]
    assert copy.cells[3].source == "table = load_by_hand()"  # dagstermill replaces this cell


def test_a_notebook_without_parameters_cell_gets_one_at_the_top(tmp_path: Path):
    source = read_notebook(write_nb(tmp_path / "a.ipynb", params=None))
    copy = parameterize.for_dagstermill(source, {}, keep_defaults=False)
    assert tags(copy)[:3] == [["dagma-prelude"], ["parameters"], ["dagma-parameters"]]
    with pytest.raises(ValueError, match="no cell tagged 'parameters'"):
        parameterize.for_papermill(source, {})


def test_the_bridge_still_runs_after_dagstermill_replaced_papermills_translator(tmp_path: Path):
    import dagstermill  # noqa: F401  # registers its translator for every Python notebook

    path = write_nb(
        tmp_path / "after.ipynb",
        params="n: int = 1",
        body="from dagma import nb\nnb.context().output(n * 2)",
    )
    run = execute(
        parse_notebook(path), runs_dir=tmp_path / "runs", target=target(tmp_path), params={"n": 4}
    )
    assert run.outputs["after"].load() == 8
