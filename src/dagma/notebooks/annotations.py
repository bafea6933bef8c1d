"""A parameter's annotation read as data, from an allow-list of type forms; never evaluated.

The parameters cell comes from whoever wrote the notebook, and `dagma` reads it in the lab's own
process (discovery, the launchpad, `dagma run`), so an annotation is matched against the forms
below node by node and anything else is refused: no name lookup, attribute or call runs.
"""

from __future__ import annotations

import ast
from typing import Annotated, Any, Literal

from pydantic import Field

from dagma.errors import DagmaError

_NAMES: dict[str, Any] = {"int": int, "float": float, "str": str, "bool": bool}
_CONTAINERS: dict[str, Any] = {"list": list, "dict": dict}
# The constraints `Field(...)` may carry: ranges, lengths, a pattern and the description.
_FIELD_KEYWORDS = frozenset(
    {
        "ge",
        "gt",
        "le",
        "lt",
        "multiple_of",
        "allow_inf_nan",
        "min_length",
        "max_length",
        "pattern",
        "strict",
        "title",
        "description",
    }
)
ALLOWED = (
    "int, float, str, bool, list or list[T], dict or dict[str, T], T | None or Optional[T], "
    'Literal["a", "b"] (strings, ints or bools), Annotated[T, Field(ge=..., le=...)]'
)


class UnsupportedType(DagmaError, ValueError):
    """An annotation outside the allowed forms; the message names the part that is not allowed."""


def parse_annotation(node: ast.expr) -> Any:
    """The type that `node` spells, built from the allow-list alone."""
    if isinstance(node, ast.Name) and node.id in _NAMES | _CONTAINERS:
        return (_NAMES | _CONTAINERS)[node.id]
    if isinstance(node, ast.Constant) and node.value is None:
        return None
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _union(parse_annotation(node.left), parse_annotation(node.right), node)
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name):
        args = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        return _subscript(node.value.id, args, node)
    raise UnsupportedType(f"{ast.unparse(node)!r} is not one of the allowed forms")


def _subscript(form: str, args: list[ast.expr], node: ast.expr) -> Any:
    if form == "list" and len(args) == 1:
        return list[parse_annotation(args[0])]  # type: ignore[misc]
    if form == "dict" and len(args) == 2:
        return dict[parse_annotation(args[0]), parse_annotation(args[1])]  # type: ignore[misc]
    if form == "Optional" and len(args) == 1:
        return _union(parse_annotation(args[0]), None, node)
    if form == "Literal" and args:
        return Literal[tuple(_literal_value(a) for a in args)]
    if form == "Annotated" and len(args) >= 2:
        meta = tuple(_field(a) for a in args[1:])
        return Annotated[(parse_annotation(args[0]), *meta)]
    raise UnsupportedType(f"{ast.unparse(node)!r} is not one of the allowed forms")


def _union(left: Any, right: Any, node: ast.expr) -> Any:
    try:
        return left | right
    except TypeError:
        raise UnsupportedType(f"{ast.unparse(node)!r} is not a union of types") from None


def _constant(node: ast.expr, what: str) -> Any:
    try:
        value = ast.literal_eval(node)
    except ValueError:
        value = None
    if value is None or type(value) not in (str, int, float, bool):
        raise UnsupportedType(f"{what} {ast.unparse(node)!r} is not a string, number or bool")
    return value


def _literal_value(node: ast.expr) -> Any:
    value = _constant(node, "the Literal value")
    if isinstance(value, float):
        raise UnsupportedType(f"the Literal value {value!r} is a float; use strings, ints or bools")
    return value


def _field(node: ast.expr) -> Any:
    if not (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "Field"
        and not node.args
    ):
        raise UnsupportedType(
            f"{ast.unparse(node)!r} is not Field(...) with keyword constraints such as ge=1"
        )
    kwargs: dict[str, Any] = {}
    for kw in node.keywords:
        if kw.arg not in _FIELD_KEYWORDS:
            allowed = ", ".join(sorted(_FIELD_KEYWORDS))
            raise UnsupportedType(f"Field({kw.arg}=...) is not allowed; use {allowed}")
        kwargs[kw.arg] = _constant(kw.value, f"Field's {kw.arg}")
    return Field(**kwargs)
