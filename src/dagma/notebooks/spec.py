"""Read what a notebook declares about itself: upstream, typed parameters, asset options.

A production notebook has one code cell tagged `parameters`. In it:
- `upstream = ["asset_a", ...]` names the assets whose values it reads;
- `asset = {"group": ..., "outputs": [...], "kinds": [...], "owners": [...], "tags": {...},
  "pool": ..., "engine": ...}` is optional; `pool` names a Dagster concurrency pool (one step
  at a time by default), for notebooks that write a shared store; `engine` is "papermill" (the
  default bridge) or "dagstermill";
- every other assignment is a typed parameter with a literal default, e.g. `seed: int = 42`.

A dagstermill notebook joins as it is (`dagma notebook adopt`): its declaration sits in the
notebook's metadata under "dagma" (`{"engine": "dagstermill", "ins": {"variable": "asset"},
...asset options}`), and its parameters cell, code written for working by hand, is replaced at
run time by the upstream values, as dagstermill does.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat
from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from dagma.errors import DagmaError
from dagma.notebooks.annotations import ALLOWED, UnsupportedType, parse_annotation

RESERVED = ("upstream", "asset")
ASSET_OPTIONS = {
    "group",
    "outputs",
    "kinds",
    "owners",
    "tags",
    "description",
    "partitions",
    "pool",
    "engine",
    "timeout",
    "max_runtime",
    "max_output",
}
# The default bridge first. "dagstermill" runs the notebook through dagstermill's own execution.
ENGINES = ("papermill", "dagstermill")
PARTITION_KINDS = ("daily", "hourly", "weekly", "monthly", "static")
# A snake_case asset, pool or variable name (fullmatch: `$` would let a trailing newline in).
ASSET_NAME = re.compile(r"[a-z_][a-z0-9_]*")


class NotebookError(DagmaError, ValueError):
    """A notebook cannot be used as an asset; the message names the file and the fix."""

    exit_code = 2


@dataclass(frozen=True)
class Param:
    name: str
    annotation: Any
    default: Any
    source: str

    @property
    def type_name(self) -> str:
        return self.source or type(self.default).__name__


@dataclass(frozen=True)
class NotebookSpec:
    """Everything Dagma needs to turn one `.ipynb` into an asset."""

    path: Path
    name: str
    description: str
    upstream: tuple[str, ...]
    params: dict[str, Param]
    code_version: str
    group: str | None = None
    outputs: tuple[str, ...] = ()
    kinds: frozenset[str] = frozenset({"jupyter"})
    owners: tuple[str, ...] = ()
    tags: dict[str, str] = field(default_factory=dict)
    partitions: tuple[str, Any, int] | None = None
    pool: str | None = None
    engine: str = ENGINES[0]
    timeout: float | None = None  # seconds a cell may run; None: the lab's DAGMA_CELL_TIMEOUT
    max_runtime: float | None = None  # seconds the notebook may run; None: DAGMA_NOTEBOOK_TIMEOUT
    max_output: int | None = None  # bytes of output kept per cell; None: DAGMA_MAX_CELL_OUTPUT
    # The notebook's variable for each upstream asset; the asset's own name unless adopted.
    ins: dict[str, str] = field(default_factory=dict)
    # False for an adopted dagstermill notebook: its parameters cell is replaced, not kept.
    keeps_defaults: bool = True

    @property
    def asset_names(self) -> tuple[str, ...]:
        return self.outputs or (self.name,)

    @property
    def defaults(self) -> dict[str, Any]:
        return {name: p.default for name, p in self.params.items()}

    def params_model(self) -> type[BaseModel]:
        fields: dict[str, Any] = {n: (p.annotation, p.default) for n, p in self.params.items()}
        return create_model(
            f"{self.name}_params",
            __config__=ConfigDict(extra="forbid", validate_default=True),
            **fields,
        )

    def coerce(self, strings: dict[str, str]) -> dict[str, Any]:
        """Command-line strings as the declared types, e.g. `-p rate=0.5` or `-p ids=[1,2]`.

        Only the given names are returned; the rest keep the notebook's defaults.
        """
        values: dict[str, Any] = {}
        for name, text in strings.items():
            values[name] = text
            if text.lstrip()[:1] in ("[", "{"):  # a list or dict, written as JSON
                with contextlib.suppress(ValueError):
                    values[name] = json.loads(text)
        return {k: v for k, v in self.validate_params(values).items() if k in strings}

    def validate_params(self, values: dict[str, Any] | None = None) -> dict[str, Any]:
        """Defaults overlaid with `values`, coerced to the declared types; clear errors otherwise."""
        try:
            return self.params_model()(**(values or {})).model_dump()
        except ValidationError as exc:
            problems = []
            for err in exc.errors():
                loc = ".".join(str(p) for p in err["loc"]) or "?"
                if err["type"] == "extra_forbidden":
                    known = ", ".join(self.params) or "none"
                    problems.append(f"unknown parameter {loc!r} (known: {known})")
                else:
                    declared = self.params[loc].type_name if loc in self.params else "?"
                    problems.append(
                        f"parameter {loc!r} = {err.get('input')!r}: {err['msg']} "
                        f"(declared {declared})"
                    )
            raise NotebookError(f"{self.path.name}: " + "; ".join(problems)) from None


def _parameters_cell(nb: nbformat.NotebookNode, path: Path) -> str:
    cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if not cells:
        raise NotebookError(
            f"{path}: no cell is tagged 'parameters'. Tag the cell that holds `upstream` and the "
            "parameters, or prefix the file name with '_' to keep a draft out of the graph."
        )
    if len(cells) > 1 or cells[0].cell_type != "code":
        raise NotebookError(f"{path}: exactly one code cell may be tagged 'parameters'.")
    return str(cells[0].source)


def _literal(node: ast.expr, path: Path, name: str) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise NotebookError(
            f"{path}: the default of {name!r} must be a literal (number, string, list, dict...), "
            f"not {ast.unparse(node)!r}."
        ) from None


def _annotation(node: ast.expr | None, default: Any, path: Path, name: str) -> tuple[Any, str]:
    if node is None:
        return (type(default) if default is not None else Any), ""
    source = ast.unparse(node)
    try:
        return parse_annotation(node), source
    except UnsupportedType as exc:
        raise NotebookError(
            f"{path}: the type of parameter {name!r} ({source}) is not supported: {exc}. "
            f"Use {ALLOWED}."
        ) from None


def _parse_parameters(source: str, path: Path) -> tuple[dict[str, Any], dict[str, Param]]:
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        raise NotebookError(
            f"{path}: the parameters cell is not valid Python ({exc.msg})."
        ) from None
    reserved: dict[str, Any] = {}
    params: dict[str, Param] = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
            target, value, annotation = stmt.targets[0], stmt.value, None
        elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
            target, value, annotation = stmt.target, stmt.value, stmt.annotation
        else:
            raise NotebookError(
                f"{path}: the parameters cell may only hold assignments such as `seed: int = 42`; "
                f"found {ast.unparse(stmt)!r}."
            )
        if not isinstance(target, ast.Name):
            raise NotebookError(f"{path}: cannot assign {ast.unparse(target)!r} in parameters.")
        name = target.id
        default = _literal(value, path, name)
        if name in RESERVED:
            reserved[name] = default
            continue
        if name.startswith("_"):
            raise NotebookError(f"{path}: parameter {name!r} may not start with '_'.")
        ann, ann_source = _annotation(annotation, default, path, name)
        params[name] = Param(name, ann, default, ann_source)
    return reserved, params


def _description(nb: nbformat.NotebookNode) -> str:
    for cell in nb.cells:
        if cell.cell_type == "markdown" and cell.source.strip():
            return str(cell.source).strip()
    return ""


def code_version(nb: nbformat.NotebookNode) -> str:
    """Hash of the code cells' source only: outputs, metadata and markdown do not count."""
    digest = hashlib.sha256()
    for cell in nb.cells:
        if cell.cell_type == "code":
            digest.update(str(cell.source).strip().encode())
            digest.update(b"\0")
    return digest.hexdigest()[:16]


def _string_list(value: Any, path: Path, what: str) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise NotebookError(f"{path}: `{what}` must be a list of strings, got {value!r}.")
    return tuple(value)


def _partitions(value: Any, path: Path) -> tuple[str, Any, int] | None:
    """`{"daily": "2026-01-01"}` (also hourly, weekly, monthly) or `{"static": ["a", "b"]}`.

    A time kind may add `"end_offset": 1`, so the current day (or hour) is a partition too.
    """
    if value is None:
        return None
    if isinstance(value, dict):
        rest = dict(value)
        offset = rest.pop("end_offset", 0)
        if len(rest) == 1 and isinstance(offset, int) and not isinstance(offset, bool):
            kind, arg = next(iter(rest.items()))
            strings = isinstance(arg, list) and all(isinstance(v, str) for v in arg)
            if kind == "static" and strings and not offset:
                return kind, tuple(arg), 0
            if kind in PARTITION_KINDS and kind != "static" and isinstance(arg, str):
                return kind, arg, offset
    raise NotebookError(
        f"{path}: `asset['partitions']` must be like {{'daily': '2026-01-01'}} (one of "
        f"{', '.join(PARTITION_KINDS)}; static takes a list of keys; a time kind may add "
        f"an integer 'end_offset'), got {value!r}."
    )


def _check_language(nb: nbformat.NotebookNode, path: Path) -> None:
    language = (
        nb.metadata.get("kernelspec", {}).get("language")
        or nb.metadata.get("language_info", {}).get("name")
        or "python"
    )
    if language.lower() != "python":
        raise NotebookError(
            f"{path}: its kernel language is {language!r}; Dagma runs Python notebooks in this "
            "project's own environment. Switch the notebook's kernel to Python 3."
        )


def read_notebook(path: Path) -> nbformat.NotebookNode:
    try:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
    except (OSError, json.JSONDecodeError, nbformat.ValidationError, AttributeError) as exc:
        raise NotebookError(
            f"{path}: not a valid Jupyter notebook ({type(exc).__name__}: {str(exc)[:200]}). "
            "Open and re-save it in Jupyter, or restore it from git."
        ) from None
    except Exception as exc:  # nbformat raises bare Exceptions on some malformed files
        raise NotebookError(f"{path}: not a valid Jupyter notebook ({exc}).") from None
    return nb


METADATA_KEY = "dagma"
# dagstermill's name for the output `yield_result(value)` yields without one.
DAGSTERMILL_RESULT = "result"


def _positive(
    options: dict[str, Any], key: str, kinds: tuple[type, ...], path: Path, what: str
) -> Any:
    """`options[key]` when it is a positive number of `kinds` (None when absent)."""
    value: Any = options.get(key)
    if value is not None and (type(value) not in kinds or value <= 0):  # a bool is not an int
        raise NotebookError(f"{path}: `asset['{key}']` is {what}, got {value!r}.")
    return value


def _adopted(declared: Any, path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The asset options and `ins` of a dagstermill notebook declared in its metadata."""
    fix = "Run `dagma notebook adopt` on it again, or fix its metadata by hand"
    if not isinstance(declared, dict) or set(declared) - ASSET_OPTIONS - {"ins"}:
        raise NotebookError(
            f"{path}: metadata['{METADATA_KEY}'] must be a dict with keys among "
            f"{sorted(ASSET_OPTIONS | {'ins'})}, got {declared!r}. {fix}."
        )
    options = {k: v for k, v in declared.items() if k != "ins"}
    if options.get("engine") != "dagstermill":
        raise NotebookError(
            f"{path}: metadata['{METADATA_KEY}'] declares a dagstermill notebook, so its "
            f"'engine' must be 'dagstermill'. A notebook for the default engine declares "
            f"itself in its parameters cell instead. {fix}."
        )
    ins = declared.get("ins", {})
    good = isinstance(ins, dict) and all(
        isinstance(k, str) and k.isidentifier() and isinstance(v, str) and ASSET_NAME.fullmatch(v)
        for k, v in ins.items()
    )
    if not good:
        raise NotebookError(
            f"{path}: metadata['{METADATA_KEY}']['ins'] must map the notebook's variable names "
            f"to asset names, like {{'table': 'wine_table'}}, got {ins!r}. {fix}."
        )
    return options, dict(ins)


def parse_notebook(path: Path) -> NotebookSpec:
    """Parse one notebook into a spec; raise NotebookError naming the file on any problem."""
    path = path.resolve()
    nb = read_notebook(path)
    _check_language(nb, path)
    declared = nb.metadata.get(METADATA_KEY)
    ins: dict[str, str] | None = None
    reserved: dict[str, Any]
    params: dict[str, Param]
    if declared is not None:
        options, ins = _adopted(declared, path)
        reserved, params = {"asset": options, "upstream": sorted(set(ins.values()))}, {}
    else:
        reserved, params = _parse_parameters(_parameters_cell(nb, path), path)
    name = path.stem
    if not ASSET_NAME.fullmatch(name):
        raise NotebookError(
            f"{path}: the file name must be a snake_case asset name like 'wine_model.ipynb'."
        )
    upstream = _string_list(reserved.get("upstream", []), path, "upstream")
    for up in upstream:
        if not ASSET_NAME.fullmatch(up):
            raise NotebookError(f"{path}: upstream {up!r} must be a snake_case asset name.")
    options = reserved.get("asset", {})
    if not isinstance(options, dict) or set(options) - ASSET_OPTIONS:
        raise NotebookError(
            f"{path}: `asset` must be a dict with keys among {sorted(ASSET_OPTIONS)}, "
            f"got {options!r}."
        )
    outputs = _string_list(options.get("outputs", []), path, "asset['outputs']")
    for out in outputs:
        if not ASSET_NAME.fullmatch(out):
            raise NotebookError(f"{path}: output {out!r} must be a snake_case asset name.")
    engine = options.get("engine", ENGINES[0])
    if engine not in ENGINES:
        raise NotebookError(
            f"{path}: `asset['engine']` is {engine!r}, which is not an engine; use one of "
            f"{', '.join(map(repr, ENGINES))} (or leave it out for {ENGINES[0]!r})."
        )
    timeout = _positive(
        options,
        "timeout",
        (int, float),
        path,
        "the most seconds one cell may run, a positive number like 600",
    )
    max_runtime = _positive(
        options,
        "max_runtime",
        (int, float),
        path,
        "the most seconds the whole notebook may run, a positive number like 7200",
    )
    max_output = _positive(
        options,
        "max_output",
        (int,),
        path,
        "the most bytes of output kept per cell, a positive whole number like 1000000",
    )
    pool = options.get("pool")
    if pool is not None and not (isinstance(pool, str) and ASSET_NAME.fullmatch(pool)):
        raise NotebookError(
            f"{path}: `asset['pool']` must be a snake_case pool name like 'dagma_vectors', "
            f"got {pool!r}."
        )
    return NotebookSpec(
        path=path,
        name=name,
        description=str(options.get("description") or _description(nb)),
        upstream=upstream,
        params=params,
        code_version=code_version(nb),
        group=options.get("group"),
        outputs=outputs,
        kinds=frozenset(_string_list(options.get("kinds", ["jupyter"]), path, "kinds")) | {engine},
        owners=_string_list(options.get("owners", []), path, "owners"),
        tags={str(k): str(v) for k, v in options.get("tags", {}).items()},
        partitions=_partitions(options.get("partitions"), path),
        pool=pool,
        engine=engine,
        timeout=float(timeout) if timeout is not None else None,
        max_runtime=float(max_runtime) if max_runtime is not None else None,
        max_output=max_output,
        ins=ins if ins is not None else {u: u for u in upstream},
        keeps_defaults=declared is None,
    )


def discover(folder: Path) -> list[NotebookSpec]:
    """Every production notebook under `folder`; names starting with '_' are drafts and skipped."""
    specs = [
        parse_notebook(path)
        for path in sorted(folder.rglob("*.ipynb"))
        if not any(part.startswith(("_", ".")) for part in path.relative_to(folder).parts)
    ]
    seen: dict[str, Path] = {}
    for spec in specs:
        for asset in spec.asset_names:
            if asset in seen:
                raise NotebookError(f"{spec.path}: asset {asset!r} is also made by {seen[asset]}.")
            seen[asset] = spec.path
    return specs
