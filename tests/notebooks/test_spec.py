import re
from datetime import UTC, datetime
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from dagma.defs.core.notebook_assets import partitions_def
from dagma.notebooks.spec import NotebookError, code_version, discover, parse_notebook
from dagma.settings import PROJECT_ROOT

PARAMS = 'upstream = ["wine_table"]\nasset = {"group": "models"}\nseed: int = 42\nrate: float = 0.5\nlabel = "x"'


def write_nb(path: Path, params: str | None = PARAMS, body: str = "print(seed)") -> Path:
    nb = new_notebook()
    cells = [new_markdown_cell("# Title\n\nWhat it does."), new_code_cell("import math")]
    if params is not None:
        cell = new_code_cell(params)
        cell.metadata["tags"] = ["parameters"]
        cells.append(cell)
    cells.append(new_code_cell(body))
    nb.cells = cells
    nbformat.write(nb, path)
    return path


def test_parameters_cell_declares_upstream_types_and_options(tmp_path: Path):
    spec = parse_notebook(write_nb(tmp_path / "my_model.ipynb"))
    assert spec.name == "my_model"
    assert spec.upstream == ("wine_table",)
    assert spec.group == "models"
    assert spec.defaults == {"seed": 42, "rate": 0.5, "label": "x"}
    assert spec.params["seed"].annotation is int
    assert spec.description.startswith("# Title")


def test_strings_are_coerced_to_declared_types(tmp_path: Path):
    spec = parse_notebook(write_nb(tmp_path / "nb.ipynb"))
    assert spec.validate_params({"seed": "7", "rate": "0.25"}) == {
        "seed": 7,
        "rate": 0.25,
        "label": "x",
    }


def test_unknown_parameter_names_the_notebook_and_the_known_ones(tmp_path: Path):
    spec = parse_notebook(write_nb(tmp_path / "nb.ipynb"))
    with pytest.raises(NotebookError, match=r"nb\.ipynb: unknown parameter 'sed' \(known: seed"):
        spec.validate_params({"sed": 1})


def test_wrong_type_names_the_parameter_and_its_declared_type(tmp_path: Path):
    spec = parse_notebook(write_nb(tmp_path / "nb.ipynb"))
    with pytest.raises(NotebookError, match=r"parameter 'seed' = 'abc'.*declared int"):
        spec.validate_params({"seed": "abc"})


def test_range_constraints_from_annotated_fields(tmp_path: Path):
    path = write_nb(tmp_path / "nb.ipynb", "n: Annotated[int, Field(ge=1, le=10)] = 3")
    spec = parse_notebook(path)
    assert spec.validate_params({"n": "10"}) == {"n": 10}
    with pytest.raises(NotebookError, match=r"parameter 'n' = 11.*less than or equal to 10"):
        spec.validate_params({"n": 11})


def test_malformed_notebook_names_the_file(tmp_path: Path):
    bad = tmp_path / "broken.ipynb"
    bad.write_text('{"cells": [')
    with pytest.raises(NotebookError, match=r"broken\.ipynb: not a valid Jupyter notebook"):
        parse_notebook(bad)


def test_missing_parameters_cell_says_how_to_fix(tmp_path: Path):
    with pytest.raises(
        NotebookError, match=r"no cell is tagged 'parameters'.*prefix the file name"
    ):
        parse_notebook(write_nb(tmp_path / "nb.ipynb", params=None))


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ("seed = random()", "must be a literal"),
        ("print(1)", "may only hold assignments"),
        ("x: Callable = 1", "is not supported"),
        ("upstream = 'wine_table'", "must be a list of strings"),
        ("asset = {'colour': 'red'}", "must be a dict with keys among"),
        ("seed = (", "not valid Python"),
        ("asset = {'partitions': {'daily': '2026-01-01', 'end_offset': '1'}}", "end_offset"),
        ("asset = {'partitions': {'static': ['a'], 'end_offset': 1}}", "end_offset"),
        ("asset = {'partitions': {'daily': '2026-01-01', 'hourly': '2026-01-01'}}", "one of"),
    ],
)
def test_bad_parameters_cells_are_explained(tmp_path: Path, params: str, message: str):
    with pytest.raises(NotebookError, match=message):
        parse_notebook(write_nb(tmp_path / "nb.ipynb", params=params))


def test_code_version_ignores_markdown_outputs_and_metadata_but_not_code(tmp_path: Path):
    path = write_nb(tmp_path / "nb.ipynb")
    nb = nbformat.read(path, as_version=4)
    before = code_version(nb)
    nb.cells[0].source = "# A new title"
    nb.cells[-1].outputs = [new_output("stream", text="42\n")]
    nb.cells[-1].execution_count = 3
    nb.metadata["widgets"] = {"x": 1}
    assert code_version(nb) == before
    nb.cells[-1].source = "print(seed + 1)"
    assert code_version(nb) != before


def test_drafts_are_skipped_and_duplicates_refused(tmp_path: Path):
    write_nb(tmp_path / "alpha.ipynb")
    write_nb(tmp_path / "_draft.ipynb", params=None)
    (tmp_path / "_scratch").mkdir()
    write_nb(tmp_path / "_scratch" / "beta.ipynb", params=None)
    assert [s.name for s in discover(tmp_path)] == ["alpha"]
    write_nb(tmp_path / "gamma.ipynb", params='asset = {"outputs": ["alpha"]}')
    with pytest.raises(NotebookError, match="asset 'alpha' is also made by"):
        discover(tmp_path)


def test_the_production_notebooks_parse():
    specs = {s.name: s for s in discover(PROJECT_ROOT / "notebooks")}
    assert {"wine_model", "doc_vectors"} <= set(specs)
    assert specs["wine_model"].upstream == ("wine_table",)
    assert specs["doc_vectors"].upstream == ("doc_corpus",)


def test_a_time_partitioned_notebook_may_include_the_current_period(tmp_path: Path):
    params = PARAMS + "\nasset = {'partitions': {'daily': '2026-01-01', 'end_offset': 1}}"
    spec = parse_notebook(write_nb(tmp_path / "nb.ipynb", params=params))
    assert spec.partitions == ("daily", "2026-01-01", 1)
    days = partitions_def(spec)
    assert days is not None
    assert days.get_last_partition_key() == datetime.now(UTC).strftime("%Y-%m-%d")


def test_a_name_with_a_trailing_newline_is_refused(tmp_path: Path):
    path = write_nb(tmp_path / "nb.ipynb", 'asset = {"pool": "writer\\n", "outputs": ["a"]}')
    with pytest.raises(NotebookError, match=r"`asset\['pool'\]` must be a snake_case pool name"):
        parse_notebook(path)


@pytest.mark.parametrize(
    "annotation",
    [
        "().__class__.__base__.__subclasses__()",
        "__import__('os').system('touch {flag}')",
        # The classic escape from eval without builtins: reach them again through a class.
        "[c for c in ().__class__.__base__.__subclasses__() if c.__name__ == 'catch_warnings']"
        "[0]()._module.__builtins__['__import__']('os').system('touch {flag}')",
        "Annotated[int, Field(ge=__import__('os').system('touch {flag}'))]",
        "list[().__class__.__base__.__subclasses__()]",
    ],
)
def test_an_annotation_is_read_as_data_and_never_run(tmp_path: Path, annotation: str):
    flag = tmp_path / "pwned"
    params = f"x: {annotation.format(flag=flag)} = 1"
    with pytest.raises(NotebookError) as refused:
        parse_notebook(write_nb(tmp_path / "nb.ipynb", params=params))
    message = str(refused.value)
    assert "nb.ipynb: the type of parameter 'x'" in message
    assert "is not supported" in message and "Literal" in message and "Annotated" in message
    assert not flag.exists()


def test_every_allowed_type_form_is_read_without_evaluating(tmp_path: Path):
    params = """a: int = 1
b: list[int] = [1]
c: dict[str, float] = {"x": 1.0}
d: int | None = None
e: Optional[str] = None
f: Literal["fast", "slow", 3, True] = "fast"
g: Annotated[float, Field(gt=0, le=1, description="share")] = 0.5
h: list = []
i: dict = {}"""
    spec = parse_notebook(write_nb(tmp_path / "nb.ipynb", params=params))
    assert spec.validate_params({"d": "4", "e": "x", "f": 3}) == {
        "a": 1,
        "b": [1],
        "c": {"x": 1.0},
        "d": 4,
        "e": "x",
        "f": 3,
        "g": 0.5,
        "h": [],
        "i": {},
    }
    with pytest.raises(NotebookError, match=r"parameter 'g' = 0"):
        spec.validate_params({"g": 0})
    with pytest.raises(NotebookError, match=r"parameter 'f' = 'medium'"):
        spec.validate_params({"f": "medium"})


@pytest.mark.parametrize(
    ("annotation", "part"),
    [
        ("Annotated[int, Field(default_factory=list)]", "Field(default_factory=...)"),
        ("Literal[1.5]", "is a float"),
        ("typing.List[int]", "'typing.List[int]' is not one of the allowed forms"),
    ],
)
def test_a_refused_annotation_names_the_part_not_allowed(
    tmp_path: Path, annotation: str, part: str
):
    with pytest.raises(NotebookError, match=re.escape(part)):
        parse_notebook(write_nb(tmp_path / "nb.ipynb", params=f"x: {annotation} = 1"))


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ('upstream = ["wine_table\\n"]', r"upstream 'wine_table\\n' must be a snake_case"),
        ('asset = {"outputs": ["wine_model\\n"]}', r"output 'wine_model\\n' must be a snake_case"),
    ],
)
def test_names_in_the_parameters_cell_are_matched_whole(tmp_path: Path, params: str, message: str):
    with pytest.raises(NotebookError, match=message):
        parse_notebook(write_nb(tmp_path / "nb.ipynb", params=params))


def test_a_notebook_file_name_with_a_trailing_newline_is_refused(tmp_path: Path):
    from dagma.notebooks.adopt import plan
    from dagma.notebooks.scaffold import scaffold

    with pytest.raises(NotebookError, match=r"'wine_model\\n' is not a snake_case asset name"):
        scaffold("wine_model\n", tmp_path, [])
    with pytest.raises(NotebookError, match=r"upstream 'wine_table\\n' is not a snake_case"):
        scaffold("wine_model", tmp_path, ["wine_table\n"])
    with pytest.raises(NotebookError, match="must be a snake_case asset name"):
        parse_notebook(write_nb(tmp_path / "wine_model\n.ipynb"))
    with pytest.raises(NotebookError, match="is not snake_case"):
        plan(write_nb(tmp_path / "wine_model\n.ipynb"), tmp_path / "lab", lambda folder: [])
    assert not list(tmp_path.glob("wine_model.ipynb"))
