"""What a spare kernel is warmed with: the imports of the notebooks it will run.

A notebook's first code cell holds its imports (the parameters cell comes after it), so a
kernel that has imported them ahead of time starts that notebook warm.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any


def first_cell_imports(notebook: dict[str, Any]) -> list[str]:
    """The modules imported at the top level of a notebook's first code cell."""
    for cell in notebook.get("cells", []):
        if cell.get("cell_type") != "code":
            continue
        source = cell.get("source", "")
        try:
            tree = ast.parse("".join(source) if isinstance(source, list) else source)
        except SyntaxError:
            return []
        found: list[str] = []
        for node in tree.body:
            if isinstance(node, ast.Import):
                found += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                # `from dagma import nb`: nb may be a module (a name that is not fails quietly)
                found += [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        return found
    return []


def imports_of(notebooks: list[Path]) -> list[str]:
    """The first-cell imports of each notebook, in order, each once."""
    modules: list[str] = []
    for path in notebooks:
        try:
            notebook = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        modules += [m for m in first_cell_imports(notebook) if m not in modules]
    return modules


_DAGSTERMILL = re.compile(r"""["']engine["']\s*:\s*["']dagstermill["']""")


def papermill_notebooks(folder: Path, selection: list[str] | None) -> list[Path]:
    """The notebooks in `folder` that a run of `selection` (None: all) starts on the papermill
    bridge, which takes spare kernels; dagstermill's engine starts its own."""
    found = []
    for path in sorted(folder.glob("*.ipynb")):
        if selection is not None and path.stem not in selection:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except OSError:
            continue
        if not _DAGSTERMILL.search(text.replace('\\"', '"')):
            found.append(path)
    return found


def warm_code(modules: list[str]) -> str:
    """Code that imports `modules` into a kernel, binding no name in its namespace."""
    return (
        "def __dagma_warm(names):\n"
        "    import importlib\n"
        "    for name in names:\n"
        "        try:\n"
        "            importlib.import_module(name)\n"
        "        except Exception:\n"
        "            pass\n"
        f"__dagma_warm({modules!r})\n"
        "del __dagma_warm\n"
    )
