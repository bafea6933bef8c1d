"""Notebooks as assets: discovery, typed parameters, execution and executed copies."""

from dagma.notebooks.spec import NotebookError, NotebookSpec, discover, parse_notebook

__all__ = ["NotebookError", "NotebookSpec", "discover", "parse_notebook"]
