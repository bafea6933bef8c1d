"""The layers in docs/architecture.md, checked on the source: what imports what, and how big."""

import ast
from pathlib import Path

import pytest

from dagma.settings import PROJECT_ROOT

SRC = PROJECT_ROOT / "src" / "dagma"
MAX_LINES = 450
# A module over MAX_LINES says why in a line of its docstring or a comment near its top.
REASON = "Longer than 450 lines because"


def _modules() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if "embedder_model" not in p.parts)


def _imports(path: Path) -> list[str]:
    """Every module `path` imports, at the top or inside a function."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def _unit(path: Path) -> str:
    """The top-level package (or module) of `dagma` that `path` belongs to."""
    return path.relative_to(SRC).parts[0].removesuffix(".py")


@pytest.mark.parametrize("layer", ["lib", "notebooks"])
def test_the_pure_layers_import_no_dagster(layer: str):
    found = [
        f"{path.relative_to(SRC)} imports {name}"
        for path in _modules()
        if _unit(path) == layer
        for name in _imports(path)
        if name.split(".")[0] in ("dagster", "dagstermill") or name.startswith("dagster_")
    ]
    assert not found, found


def test_the_kernel_api_imports_no_dagster_and_nothing_above_lib():
    names = _imports(SRC / "nb.py")
    assert not [n for n in names if n.startswith("dagster")], names
    above = [
        n
        for n in names
        if n.startswith("dagma.")
        and not n.startswith(("dagma.lib", "dagma.errors", "dagma.settings"))
    ]
    assert not above, above


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in _modules():
        unit = _unit(path)
        graph.setdefault(unit, set())
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] == "dagma" and len(parts) > 1 and parts[1] != unit:
                graph[unit].add(parts[1])
    return graph


def test_there_are_no_import_cycles_between_the_top_level_packages():
    from graphlib import CycleError, TopologicalSorter

    graph = _graph()
    try:
        TopologicalSorter(graph).prepare()
    except CycleError as exc:
        pytest.fail(f"import cycle between top-level parts of dagma: {' -> '.join(exc.args[1])}")


def test_the_graph_check_finds_a_cycle():
    from graphlib import CycleError, TopologicalSorter

    with pytest.raises(CycleError):
        TopologicalSorter({**_graph(), "lib": {"defs"}, "defs": {"lib"}}).prepare()


def test_no_module_is_long_without_saying_why():
    long = []
    for path in _modules():
        lines = path.read_text().splitlines()
        if len(lines) > MAX_LINES and not any(REASON in line for line in lines[:15]):
            long.append(f"{path.relative_to(SRC)} ({len(lines)} lines)")
    assert not long, f"split these, or say why at their top ('{REASON} ...'): {long}"


def _private_uses(path: Path) -> list[str]:
    """Private names of dagma that a test imports, reads or patches."""
    tree = ast.parse(path.read_text(), str(path))
    modules: set[str] = set()  # local names bound to dagma modules
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dagma"):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"from {node.module} import {alias.name}")
                modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("dagma"):
                    modules.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in modules
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            found.append(f"{node.value.id}.{node.attr}")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "setattr"
            and len(node.args) >= 2
            and isinstance(node.args[0], ast.Name)
            and node.args[0].id in modules
            and isinstance(node.args[1], ast.Constant)
            and str(node.args[1].value).startswith("_")
        ):
            found.append(f"setattr({node.args[0].id}, {node.args[1].value!r})")
    return found


def test_no_test_uses_a_private_name_of_dagma():
    tests = PROJECT_ROOT / "tests"
    found = {
        str(path.relative_to(tests)): uses
        for path in sorted(tests.rglob("*.py"))
        if (uses := _private_uses(path))
    }
    assert not found, found


def test_no_module_imports_another_modules_private_name():
    found = {str(p.relative_to(SRC)): uses for p in _modules() if (uses := _private_uses(p))}
    assert not found, found


def test_the_private_name_check_sees_an_import_a_read_and_a_patch(tmp_path: Path):
    sample = tmp_path / "test_sample.py"
    sample.write_text(
        "from dagma.lib import vectors\nfrom dagma.lib.vectors import _x\n"
        "vectors._y\nmonkeypatch.setattr(vectors, '_z', 1)\n"
    )
    assert _private_uses(sample) == [
        "from dagma.lib.vectors import _x",
        "vectors._y",
        "setattr(vectors, '_z')",
    ]
