"""The notebook each engine executes: the source with this run's values injected.

Both engines keep the parameters cell and its defaults, and put the run's values after it, as
papermill does. The cells are written here, not through papermill's translator registry,
because `import dagstermill` replaces that registry's Python translator with one that only
accepts dagstermill's own parameters.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import nbformat
from papermill.translators import PythonTranslator

from dagma.nb import CONTEXT_VAR

PARAMETERS_TAG = "parameters"
INJECTED_TAG = "injected-parameters"
# In a dagstermill-engine copy: the author's defaults, untagged so dagstermill keeps them.
DEFAULTS_TAG = "dagma-defaults"
PRELUDE_TAG = "dagma-prelude"
KERNELSPEC = {"name": "python3", "language": "python", "display_name": "Python 3 (ipykernel)"}
# Not "injected-parameters": dagstermill would replace a cell with that tag instead.
RUN_VALUES_TAG = "dagma-parameters"
PRELUDE = (
    "import dagma.dagstermill_kernel as __dagma_kernel  # yield_result, partition_key in assets"
)
# After the run's values: a plain mlflow.start_run() logs into the materialization's run.
BIND = "__dagma_kernel.bind({context})"


def _tagged(source: str, tag: str) -> nbformat.NotebookNode:
    cell = nbformat.v4.new_code_cell(source)
    cell.metadata["tags"] = [tag]
    return cell


def _parameters_index(nb: nbformat.NotebookNode) -> int | None:
    for i, cell in enumerate(nb.cells):
        if PARAMETERS_TAG in cell.get("metadata", {}).get("tags", []):
            return i
    return None


def codify(values: dict[str, Any], comment: str = "Parameters") -> str:
    """Python assignments of `values`, as papermill writes them."""
    return str(PythonTranslator.codify(values, comment))


def for_papermill(nb: nbformat.NotebookNode, values: dict[str, Any]) -> nbformat.NotebookNode:
    """`nb` with an injected-parameters cell of `values` right after its parameters cell."""
    nb = copy.deepcopy(nb)
    at = _parameters_index(nb)
    if at is None:
        raise ValueError("the notebook has no cell tagged 'parameters'")
    nb.cells.insert(at + 1, _tagged(codify(values), INJECTED_TAG))
    nb.metadata.setdefault("papermill", {})["parameters"] = json.loads(
        json.dumps(values, default=str)
    )
    return nb


def for_dagstermill(
    nb: nbformat.NotebookNode, values: dict[str, Any], *, keep_defaults: bool = True
) -> nbformat.NotebookNode:
    """The copy a dagstermill-engine asset hands to dagstermill.

    dagstermill replaces the cell tagged `parameters` with its context cell (which also loads
    the upstream values into variables). With `keep_defaults`, that tag moves to a new empty
    cell after the author's parameters cell, so the defaults still run first. Without (an
    adopted dagstermill notebook), the author's cell is replaced, as dagstermill does. The
    run's values follow in a cell of their own, and a first cell lets `yield_result` hand
    values to the asset.
    """
    nb = copy.deepcopy(nb)
    at = _parameters_index(nb)
    if at is None:  # dagstermill would inject at the top
        nb.cells.insert(0, _tagged("", PARAMETERS_TAG))
        at = 0
    elif keep_defaults:
        defaults = nb.cells[at]
        defaults.metadata["tags"] = [
            DEFAULTS_TAG if t == PARAMETERS_TAG else t for t in defaults.metadata.get("tags", [])
        ]
        at += 1
        nb.cells.insert(at, _tagged("", PARAMETERS_TAG))
    source = codify(values, "Parameters of this run (Dagma)")
    uses_mlflow = any("mlflow" in c.source for c in nb.cells if c.cell_type == "code")
    if CONTEXT_VAR in values and uses_mlflow:  # binding waits for the run to exist
        source += BIND.format(context=CONTEXT_VAR) + "\n"
    nb.cells.insert(at + 1, _tagged(source, RUN_VALUES_TAG))
    nb.cells.insert(0, _tagged(PRELUDE, PRELUDE_TAG))
    # The project's own kernel, as the bridge uses, whatever the notebook was saved with.
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    return nb
