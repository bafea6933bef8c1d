"""nbval really compares outputs: a changed output fails, a sanitized volatile one passes."""

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook, new_output

from dagma.settings import PROJECT_ROOT

pytestmark = pytest.mark.integration
SANITIZE = PROJECT_ROOT / "notebooks" / "nbval_sanitize.cfg"


def checked_notebook(path: Path, stored: str, source: str) -> Path:
    cell = new_code_cell(f"# NBVAL_CHECK_OUTPUT\n{source}")
    cell.outputs = [new_output("stream", name="stdout", text=stored)]
    cell.execution_count = 1
    nb = new_notebook(cells=[cell])
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nbformat.write(nb, path)
    return path


def nbval(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "--nbval-lax",
            "--nbval-sanitize-with",
            str(SANITIZE),
            "--rootdir",
            str(path.parent),
            "-c",
            "/dev/null",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=path.parent,
    )


def test_a_changed_output_fails_nbval(tmp_path: Path):
    path = checked_notebook(tmp_path / "changed.ipynb", "accuracy 0.97\n", "print('accuracy 0.91')")
    done = nbval(path)
    assert done.returncode == 1, done.stdout[-2000:]
    assert "1 failed" in done.stdout
    assert "accuracy 0.97" in done.stdout and "accuracy 0.91" in done.stdout


def test_an_unchanged_output_passes_and_run_ids_are_sanitized(tmp_path: Path):
    stored = "MLflow run 0123456789abcdef0123456789abcdef, model version 3\n"
    source = "print('MLflow run ' + 'f' * 32 + ', model version 7')"
    done = nbval(checked_notebook(tmp_path / "same.ipynb", stored, source))
    assert done.returncode == 0, done.stdout[-2000:]
