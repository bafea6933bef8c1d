"""`dagma notebook new`: a notebook that already follows the conventions."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from dagma.notebooks.spec import ASSET_NAME, NotebookError, parse_notebook


def scaffold(name: str, folder: Path, upstream: list[str], group: str | None = None) -> Path:
    """Write `folder/name.ipynb` with imports, a parameters cell and the nb.context glue."""
    if not ASSET_NAME.fullmatch(name):
        raise NotebookError(f"{name!r} is not a snake_case asset name, e.g. 'wine_features'.")
    path = folder / f"{name}.ipynb"
    if path.exists():
        raise NotebookError(f"{path} already exists; pick another name or edit that notebook.")
    for up in upstream:
        if not ASSET_NAME.fullmatch(up):
            raise NotebookError(f"upstream {up!r} is not a snake_case asset name.")
    options = {"group": group} if group else {}
    reads = "\n".join(f'{up} = ctx.upstream("{up}")' for up in upstream)
    nb = new_notebook(
        cells=[
            new_markdown_cell(f"# {name.replace('_', ' ').capitalize()}\n\nWhat this asset holds."),
            new_code_cell("from dagma import nb"),
            new_code_cell(
                f"upstream = {upstream!r}\nasset = {options!r}\nseed: int = 42",
                metadata={"tags": ["parameters"]},
            ),
            new_code_cell("ctx = nb.context()\n" + reads),
            new_code_cell("result = {'seed': seed}  # call into dagma.lib here\nresult"),
            new_code_cell("ctx.output(result)"),
        ],
        metadata={
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"},
        },
    )
    folder.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    parse_notebook(path)
    return path
