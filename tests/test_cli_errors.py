"""One error root (`dagma.errors.DagmaError`) and one place where the CLI prints errors."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import dagma
from dagma.cli import app
from dagma.cli_errors import DagmaCommands, InputError
from dagma.errors import DagmaError
from dagma.services.cli import ServicesCommands

SRC = Path(dagma.__file__).parent


def modules() -> dict[str, ast.Module]:
    """Every module of the package, parsed (the embedder's model files are data)."""
    found = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = ast.parse(path.read_text(), str(path))
    return found


def test_every_exception_class_derives_from_dagma_error():
    checked = []
    for name, tree in modules().items():
        classes = [n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
        if not classes:
            continue
        module = importlib.import_module(name)
        for cls in classes:
            found = getattr(module, cls, None)
            if isinstance(found, type) and issubclass(found, BaseException):
                checked.append(f"{name}.{cls}")
                assert issubclass(found, DagmaError), f"{name}.{cls} does not derive DagmaError"
    assert len(checked) >= 16, checked  # the pages and the app define none


def test_no_library_code_raises_system_exit():
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Raise) and node.exc is not None:
                called = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                assert not (isinstance(called, ast.Name) and called.id == "SystemExit"), (
                    f"{name}:{node.lineno} raises SystemExit: raise a DagmaError instead"
                )


class Broken(DagmaError):
    exit_code = 3


def demo_app(cls: type[DagmaCommands]) -> typer.Typer:
    demo = typer.Typer(cls=cls)

    @demo.command()
    def fail(kind: str) -> None:
        if kind == "ours":
            raise Broken("the [bold]thing[/bold] at /a/very/long/path " + "x" * 120 + ": fix it")
        raise RuntimeError("a bug")

    @demo.command()
    def other() -> None:
        pass

    return demo


def test_an_error_of_ours_prints_one_line_and_exits_with_its_code():
    result = CliRunner().invoke(demo_app(DagmaCommands), ["fail", "ours"])
    assert result.exit_code == 3
    # Printed as written (no markup), on one line so the path stays whole.
    assert result.output.startswith("error: the [bold]thing[/bold] at /a/very/long/path xxx")
    assert result.output.count("\n") == 1


def test_a_bug_keeps_its_traceback():
    result = CliRunner().invoke(demo_app(DagmaCommands), ["fail", "bug"])
    assert isinstance(result.exception, RuntimeError) and result.output == ""


def test_services_commands_exit_1_on_every_error():
    result = CliRunner().invoke(demo_app(ServicesCommands), ["fail", "ours"])
    assert result.exit_code == 1 and result.output.startswith("error: the [bold]thing")


def test_the_dagma_command_reports_errors_from_nested_groups(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("DAGMA_NOTEBOOKS_DIR", str(tmp_path))
    result = CliRunner().invoke(app, ["notebook", "new", "Bad-Name"])
    assert result.exit_code == 2  # a NotebookError
    assert (
        result.output == "error: 'Bad-Name' is not a snake_case asset name, e.g. 'wine_features'.\n"
    )
    assert InputError.exit_code == 2


def test_an_unknown_asset_is_named_and_exits_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DAGMA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = CliRunner().invoke(app, ["run", "wine_tabel"])
    assert result.exit_code == 1
    assert result.output.startswith("error: Unknown asset(s): wine_tabel. Known: doc_corpus,")
