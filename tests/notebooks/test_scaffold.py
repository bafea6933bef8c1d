from pathlib import Path

import pytest
from typer.testing import CliRunner

from dagma.cli import app
from dagma.notebooks.spec import parse_notebook


def test_notebook_new_scaffolds_a_valid_asset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DAGMA_NOTEBOOKS_DIR", str(tmp_path))
    result = CliRunner().invoke(
        app, ["notebook", "new", "wine_features", "--upstream", "wine_table,doc_corpus"]
    )
    assert result.exit_code == 0, result.output
    spec = parse_notebook(tmp_path / "wine_features.ipynb")
    assert spec.upstream == ("wine_table", "doc_corpus")
    assert spec.defaults == {"seed": 42}
    assert spec.description.startswith("# Wine features")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["Bad-Name"], "not a snake_case asset name"),
        (["ok_name", "--upstream", "Not Valid"], "upstream 'Not Valid'"),
    ],
)
def test_notebook_new_refuses_bad_names(tmp_path, monkeypatch, args, message):
    monkeypatch.setenv("DAGMA_NOTEBOOKS_DIR", str(tmp_path))
    result = CliRunner().invoke(app, ["notebook", "new", *args])
    assert result.exit_code == 2, result.output  # a NotebookError, printed as `error: ...`
    assert result.output.startswith("error: ") and message in result.output
    assert not list(tmp_path.iterdir())


def test_notebook_new_never_overwrites(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGMA_NOTEBOOKS_DIR", str(tmp_path))
    assert CliRunner().invoke(app, ["notebook", "new", "once"]).exit_code == 0
    result = CliRunner().invoke(app, ["notebook", "new", "once"])
    assert result.exit_code == 2 and "already exists" in result.output
