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

PARAMETERS_TAG = "parameters"
INJECTED_TAG = "injected-parameters"
# In a dagstermill-engine copy: the author's defaults, untagged so dagstermill keeps them.
DEFAULTS_TAG = "dagma-defaults"
PRELUDE_TAG = "dagma-prelude"
# Not "injected-parameters": dagstermill would replace a cell with that tag instead.
RUN_VALUES_TAG = "dagma-parameters"
PRELUDE = "import dagma.dagstermill_kernel  # Dagma: yield_result and partition_key in assets"


def _tagged(source: str, tag: str) -> nbformat.NotebookNode:
    cell = nbformat.v4.new_code_cell(source)
    cell.metadata["tags"] = [tag]
    return cell


def _parameters_index(nb: nbformat.NotebookNode) -> int:
    for i, cell in enumerate(nb.cells):
        if PARAMETERS_TAG in cell.get("metadata", {}).get("tags", []):
            return i
    raise ValueError("the notebook has no cell tagged 'parameters'")


def codify(values: dict[str, Any], comment: str = "Parameters") -> str:
    """Python assignments of `values`, as papermill writes them."""
    return str(PythonTranslator.codify(values, comment))


def for_papermill(nb: nbformat.NotebookNode, values: dict[str, Any]) -> nbformat.NotebookNode:
    """`nb` with an injected-parameters cell of `values` right after its parameters cell."""
    nb = copy.deepcopy(nb)
    at = _parameters_index(nb) + 1
    nb.cells.insert(at, _tagged(codify(values), INJECTED_TAG))
    nb.metadata.setdefault("papermill", {})["parameters"] = json.loads(
        json.dumps(values, default=str)
    )
    return nb


def for_dagstermill(nb: nbformat.NotebookNode, values: dict[str, Any]) -> nbformat.NotebookNode:
    """The copy a dagstermill-engine asset hands to dagstermill.

    dagstermill replaces the cell tagged `parameters` with its context cell (which also loads
    the upstream values into variables). Here that tag moves to a new empty cell after the
    author's parameters cell, so the defaults still run first; the run's values follow in a
    cell of their own. A first cell lets `yield_result` hand values to the asset.
    """
    nb = copy.deepcopy(nb)
    at = _parameters_index(nb)
    defaults = nb.cells[at]
    defaults.metadata["tags"] = [
        DEFAULTS_TAG if t == PARAMETERS_TAG else t for t in defaults.metadata.get("tags", [])
    ]
    run_values = _tagged(codify(values, "Parameters of this run (Dagma)"), RUN_VALUES_TAG)
    nb.cells[at + 1 : at + 1] = [nbformat.v4.new_code_cell(""), run_values]
    nb.cells[at + 1].metadata["tags"] = [PARAMETERS_TAG]
    nb.cells.insert(0, _tagged(PRELUDE, PRELUDE_TAG))
    return nb
