"""`dagma notebook adopt`: a dagstermill notebook joins the lab, as it is or onto the default
engine, and what cannot be adopted is refused with the file, the reason and the fix."""

from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook
from typer.testing import CliRunner

from dagma.cli import app
from dagma.lab import load_definitions, materialize
from dagma.notebooks import adopt
from dagma.notebooks.spec import METADATA_KEY, NotebookError, parse_notebook
from dagma.settings import get_settings
from tests.conftest import QUIET, stored_value

pytestmark = pytest.mark.integration

PARAMS = "import pandas as pd\ntable = pd.DataFrame()"
# The shape of Dagster's notebook-assets tutorial: the upstream table replaces the parameters
# cell, the notebook computes something and yields it.
BODY = ("context = dagstermill.get_context()\nrows = len(table)", "dagstermill.yield_result(rows)")
KNOWN = ["wine_table", "wine_model", "doc_corpus"]


def dagstermill_notebook(
    path: Path, params: str | None = PARAMS, body: tuple[str, ...] = BODY, language="python"
) -> Path:
    cells = [
        new_markdown_cell("# Wine rows\n\nHow big the wine table is."),
        new_code_cell("import dagstermill"),
    ]
    if params is not None:
        cells.append(new_code_cell(params, metadata={"tags": ["parameters"]}))
    cells += [new_code_cell(source) for source in body]
    kernel = {"name": "python3", "display_name": "Python 3", "language": language}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(new_notebook(cells=cells, metadata={"kernelspec": kernel}), path)
    return path


def code(path: Path) -> list[str]:
    return [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]


def adopt_cli(*args: str):
    return CliRunner().invoke(app, ["notebook", "adopt", *args])


def test_adopted_as_it_is_it_runs_through_dagstermill(lab: Path, tmp_path: Path):
    source = dagstermill_notebook(tmp_path / "project" / "wine_rows.ipynb")
    done = adopt_cli(str(source), "--ins", "table=wine_table", "--group", "models")
    assert done.exit_code == 0, done.output
    assert (
        '+  "engine": "dagstermill",' in done.output and '+    "table": "wine_table"' in done.output
    )
    target = lab / "wine_rows.ipynb"
    assert code(target) == code(source)  # only the metadata changed
    spec = parse_notebook(target)
    assert (spec.engine, spec.keeps_defaults, spec.ins) == (
        "dagstermill",
        False,
        {"table": "wine_table"},
    )
    assert spec.group == "models"

    run = materialize(get_settings(), selection=["wine_table", "wine_rows"], console=QUIET)
    assert run.success, run.error
    assert stored_value(get_settings(), "wine_rows") == 178


def test_to_native_rewrites_it_for_the_default_engine_and_it_runs(lab: Path, tmp_path: Path):
    source = dagstermill_notebook(
        tmp_path / "wine_rows.ipynb",
        params=PARAMS + "\ntop = 3",
        body=(BODY[0], "dagstermill.yield_result({'rows': rows, 'head': len(table.head(top))})"),
    )
    done = adopt_cli(str(source), "--to", "native", "--ins", "table=wine_table")
    assert done.exit_code == 0, done.output
    assert (
        '+upstream = ["wine_table"]' in done.output and "-dagstermill.yield_result(" in done.output
    )
    target = lab / "wine_rows.ipynb"
    assert code(target) == [
        'upstream = ["wine_table"]\ntop = 3',
        'import pandas as pd\nfrom dagma import nb\nctx = nb.context()\ntable = ctx.upstream("wine_table")',
        "rows = len(table)",
        "ctx.output({'rows': rows, 'head': len(table.head(top))})",
    ]
    spec = parse_notebook(target)
    assert (spec.engine, spec.upstream, spec.defaults) == ("papermill", ("wine_table",), {"top": 3})

    run = materialize(get_settings(), selection=["wine_table", "wine_rows"], console=QUIET)
    assert run.success, run.error
    assert run.values["wine_rows"] == {"rows": 178, "head": 3}


def test_a_notebook_already_in_the_lab_is_adopted_in_place(lab: Path):
    # Not yet adopted, it breaks the load: adopt lists the assets without it.
    source = dagstermill_notebook(
        lab / "wine_rows.ipynb",
        params="import pandas as pd\nwine_table = pd.DataFrame()",
        body=("dagstermill.yield_result(len(wine_table))",),
    )
    with pytest.raises(NotebookError):
        load_definitions(get_settings())
    done = adopt_cli(str(source))
    assert done.exit_code == 0, done.output
    assert parse_notebook(source).ins == {"wine_table": "wine_table"}  # inferred from the name
    assert sorted(p.name for p in lab.glob("wine_rows*")) == ["wine_rows.ipynb"]
    load_definitions(get_settings()).resolve_assets_def("wine_rows")


def test_dry_run_prints_the_diff_and_writes_nothing(lab: Path, tmp_path: Path):
    source = dagstermill_notebook(tmp_path / "wine_rows.ipynb")
    done = adopt_cli(str(source), "--ins", "table=wine_table", "--dry-run")
    assert done.exit_code == 0, done.output
    assert 'metadata["dagma"]' in done.output and "Dry run: nothing written." in done.output
    assert not (lab / "wine_rows.ipynb").exists()


def test_named_outputs_and_aliases_are_rewritten(tmp_path: Path):
    source = dagstermill_notebook(
        tmp_path / "wine_stats.ipynb",
        params="wine_table = None\nn: int = 2",
        body=(
            "import dagstermill as dm\nfrom dagstermill import yield_result",
            "ctx_free = dm.get_context().partition_key\n"
            "yield_result(len(wine_table), 'wine_rows')\n"
            "dm.yield_result(\n    wine_table.head(n),\n    output_name='result',\n)",
        ),
    )
    plan = adopt.plan(source, tmp_path / "lab", lambda _: KNOWN, native=True)
    assert plan.ins == {"wine_table": "wine_table"}
    assert plan.spec.asset_names == ("wine_stats", "wine_rows")
    # The cells that only imported dagstermill are gone.
    assert [c.source for c in plan.notebook.cells if c.cell_type == "code"] == [
        'upstream = ["wine_table"]\nasset = {"outputs": ["wine_stats", "wine_rows"]}\nn: int = 2',
        'from dagma import nb\nctx = nb.context()\nwine_table = ctx.upstream("wine_table")',
        "ctx_free = ctx.partition_key\n"
        'ctx.output(len(wine_table), name="wine_rows")\n'
        "ctx.output(wine_table.head(n))",
    ]


def test_a_dropped_name_is_noted(tmp_path: Path):
    source = dagstermill_notebook(tmp_path / "wine_rows.ipynb", body=("pd.Series(table)",))
    plan = adopt.plan(source, tmp_path / "lab", lambda _: KNOWN, ins={"table": "wine_table"})
    assert "the parameters cell also defines 'pd', which cell 4 uses" in plan.notes[0]


def snapshot(*folders: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for f in folders for p in sorted(f.rglob("*")) if p.is_file()}


def refused(lab: Path, source: Path, *args: str) -> str:
    """The error of `adopt`, after checking it exits 2 and writes nothing."""
    before = snapshot(lab, source.parent)
    done = adopt_cli(str(source), *args)
    assert done.exit_code == 2, done.output
    assert snapshot(lab, source.parent) == before
    message = " ".join(done.output.split())
    assert str(source) in message
    return message


def test_refuses_what_is_not_a_notebook(lab: Path, tmp_path: Path):
    broken = tmp_path / "src" / "broken.ipynb"
    broken.parent.mkdir()
    broken.write_text("{not json")
    assert "not a valid Jupyter notebook" in refused(lab, broken)
    assert "re-save it in Jupyter" in refused(lab, broken)


def test_refuses_a_notebook_that_is_not_python(lab: Path, tmp_path: Path):
    source = dagstermill_notebook(tmp_path / "src" / "wine_rows.ipynb", language="R")
    assert "its kernel language is 'R', not Python" in refused(lab, source)
    assert "Port it to a Python 3 kernel" in refused(lab, source)


def test_refuses_a_file_name_that_is_not_snake_case_and_suggests_one(lab: Path, tmp_path: Path):
    source = dagstermill_notebook(tmp_path / "src" / "Iris-KMeans.ipynb")
    assert "is not snake_case. Copy or rename it to iris_kmeans.ipynb" in refused(lab, source)


def test_refuses_an_unknown_asset_and_lists_the_known_ones(lab: Path, tmp_path: Path):
    source = dagstermill_notebook(tmp_path / "src" / "wine_rows.ipynb")
    message = refused(lab, source, "--ins", "table=wine_tabel")
    assert "'wine_tabel' is not an asset of this lab. Did you mean 'wine_table'?" in message
    assert "Pick one of: doc_corpus, doc_vectors" in message


def test_refuses_an_input_variable_the_parameters_cell_does_not_assign(lab: Path, tmp_path: Path):
    source = dagstermill_notebook(tmp_path / "src" / "wine_rows.ipynb")
    message = refused(lab, source, "--ins", "frame=wine_table")
    assert "the parameters cell assigns no variable 'frame' (it assigns: table)" in message
    assert "Name the variable the notebook reads wine_table into, e.g. --ins table=" in message


def test_refuses_to_guess_inputs_it_cannot_infer(lab: Path, tmp_path: Path):
    source = dagstermill_notebook(tmp_path / "src" / "wine_rows.ipynb")
    message = refused(lab, source)
    assert "cannot tell which assets it reads" in message
    assert "e.g. --ins table=wine_table" in message


def test_refuses_two_parameters_cells(lab: Path, tmp_path: Path):
    source = dagstermill_notebook(tmp_path / "src" / "wine_rows.ipynb", body=(BODY[0], "x = 1"))
    nb = nbformat.read(source, as_version=4)
    nb.cells[-1].metadata["tags"] = ["parameters"]
    nbformat.write(nb, source)
    message = refused(lab, source, "--ins", "table=wine_table")
    assert "2 cells are tagged 'parameters' (cells 3, 5). Keep the tag on the one cell" in message


def test_refuses_a_name_taken_in_the_lab(lab: Path, tmp_path: Path):
    other = dagstermill_notebook(tmp_path / "src" / "wine_model.ipynb")
    message = refused(lab, other, "--ins", "table=wine_table")
    assert f"{lab / 'wine_model.ipynb'} already exists with other content" in message
    assert "or adopt a copy of wine_model.ipynb under another name" in message
    python_asset = dagstermill_notebook(tmp_path / "src" / "wine_arrivals.ipynb")
    message = refused(lab, python_asset, "--ins", "table=wine_table")
    assert "the lab already has an asset named 'wine_arrivals'" in message


def test_refuses_a_notebook_already_adopted(lab: Path, tmp_path: Path):
    declared = dagstermill_notebook(tmp_path / "src" / "wine_rows.ipynb")
    nb = nbformat.read(declared, as_version=4)
    nb.metadata[METADATA_KEY] = {"engine": "dagstermill", "ins": {"table": "wine_table"}}
    nbformat.write(nb, declared)
    assert "already adopted: its metadata['dagma'] declares it" in refused(lab, declared)
    native = dagstermill_notebook(
        tmp_path / "src2" / "wine_rows.ipynb", params='upstream = ["wine_table"]'
    )
    message = refused(lab, native)
    assert "already adopted: its parameters cell declares it in Dagma's form" in message
    assert f"copy it into {lab} as it is" in message


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("dagstermill.yield_event(event)", "uses dagstermill.yield_event"),
        ("context.log.info('hi')", "uses context.log: Dagster's logger"),
        ("context.resources.db", "uses context.resources: Dagster resources"),
        ("k = context.op_config['k']", "uses context.op_config: op config"),
    ],
)
def test_to_native_refuses_what_the_default_engine_cannot_do(lab: Path, tmp_path: Path, line, why):
    source = dagstermill_notebook(tmp_path / "src" / "wine_rows.ipynb", body=(*BODY, line))
    message = refused(lab, source, "--ins", "table=wine_table", "--to", "native")
    assert f"cell 6, line 1: `{line}` {why}" in message
    assert "Keep the dagstermill engine: run `dagma notebook adopt" in message
    assert "without --to native" in message
