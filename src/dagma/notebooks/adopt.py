"""`dagma notebook adopt`: a dagstermill notebook joins the lab.

By default its code cells stay as they are: the declaration (engine, inputs, asset options)
goes into the notebook's metadata, and the notebook keeps running through dagstermill. With
`native=True` it is rewritten for the default engine instead: a literal parameters cell,
`ctx.upstream` for each input and `ctx.output` for each `yield_result`.

Longer than 450 lines because it is one job, reading and rewriting a dagstermill notebook's
cells, and its steps (inputs, results, events, parameters) share one parsed notebook.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import dataclasses
import difflib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import nbformat

from dagma.notebooks.spec import (
    ASSET_NAME,
    DAGSTERMILL_RESULT,
    METADATA_KEY,
    RESERVED,
    NotebookError,
    NotebookSpec,
    parse_notebook,
)

TAG = "parameters"
# What a kept parameter's annotation may name and still run in the kernel without an import.
_BUILTIN_TYPES = {"int", "float", "str", "bool", "list", "dict", "None"}
# The dagstermill context's attributes the default engine's `ctx` has too.
_CTX_ATTRIBUTES = {"partition_key", "run_id"}
_NO_EQUIVALENT = {
    "resources": "Dagster resources, which default-engine notebooks do not get",
    "op_config": "op config; the default engine passes typed parameters instead",
    "log": "Dagster's logger, which default-engine notebooks do not get (print() output is "
    "kept in the executed notebook)",
}
# A rewrite of one cell's source: replace source[start:end] with text.
Edit = tuple[int, int, str]
KnownAssets = Callable[[Path], Iterable[str]]


@dataclass(frozen=True)
class Adoption:
    """What adopting one notebook writes, and the diff that shows it."""

    source: Path
    target: Path
    notebook: nbformat.NotebookNode
    spec: NotebookSpec
    ins: dict[str, str]  # the notebook's variable -> the asset it reads
    diff: str
    notes: tuple[str, ...]

    def write(self) -> NotebookSpec:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(self.notebook, self.target)
        return parse_notebook(self.target)


def suggest_name(stem: str) -> str:
    """A snake_case asset name for a file name: 'Iris-KMeans 2' -> 'iris_kmeans_2'."""
    name = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", stem)
    name = re.sub(r"[^0-9a-zA-Z]+", "_", name).strip("_").lower()
    return name if name[:1].isalpha() else f"nb_{name}".rstrip("_")


def parse_ins(pairs: Iterable[str], source: Path) -> dict[str, str]:
    """`--ins VARIABLE=ASSET` strings as a mapping."""
    ins: dict[str, str] = {}
    for pair in pairs:
        variable, sep, asset = (part.strip() for part in pair.partition("="))
        if not sep or not variable.isidentifier() or not asset:
            raise NotebookError(
                f"{source}: --ins {pair!r} is not VARIABLE=ASSET. Write the notebook's variable "
                "and the asset it reads, e.g. --ins table=wine_table."
            )
        if ins.get(variable, asset) != asset:
            raise NotebookError(
                f"{source}: --ins gives {variable!r} two assets ({ins[variable]}, {asset}). "
                "Keep one --ins per variable."
            )
        ins[variable] = asset
    return ins


@contextlib.contextmanager
def lab_without(folder: Path, hidden: Path) -> Iterator[Path]:
    """`folder`, or a mirror of it (symlinks) without `hidden`, to load the lab without it."""
    folder, hidden = folder.resolve(), hidden.resolve()
    if not hidden.is_file() or not hidden.is_relative_to(folder):
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="dagma-adopt-") as tmp:
        mirror = Path(tmp) / folder.name
        shutil.copytree(
            folder,
            mirror,
            copy_function=os.symlink,
            ignore=lambda where, names: [n for n in names if Path(where, n) == hidden],
        )
        yield mirror


def plan(
    source: Path,
    folder: Path,
    known_assets: KnownAssets,
    *,
    ins: dict[str, str] | None = None,
    group: str | None = None,
    native: bool = False,
) -> Adoption:
    """Check `source` and build what adopting it writes into `folder`; writes nothing.

    `known_assets(target)` lists the lab's assets as it loads without the notebook at
    `target`; it is called only once the notebook itself passes the checks.
    """
    source, folder = source.resolve(), folder.resolve()
    nb = _read(source)
    name = _check_name(source)
    target = _target(source, folder)
    at = _parameters_index(nb, source)
    cells = [_python(c.source) if c.cell_type == "code" else None for c in nb.cells]
    _check_not_adopted(nb, source, at, cells, folder)
    assigned = _assigned(cells[at]) if at is not None else set()
    known = sorted(set(known_assets(target)))
    if name in known:
        raise NotebookError(
            f"{source}: the lab already has an asset named {name!r}. Copy the notebook under "
            f"another name (e.g. {name}_nb.ipynb) and adopt that copy."
        )
    notes: list[str] = []
    if ins is None:
        ins = _infer_ins(source, cells, at, known, native, notes)
    else:
        _check_ins(ins, source, known, assigned, at is not None)
    names = _Names.of(cells)
    outputs = _outputs(name, names, cells, source, native)
    options: dict[str, object] = {"group": group} if group else {}
    if outputs:
        options["outputs"] = outputs
    if native:
        new = _to_native(nb, at, cells, ins, options, names, source)
        before, after = _code_lines(nb), _code_lines(new)
    else:
        new = copy.deepcopy(nb)
        new.metadata[METADATA_KEY] = {"engine": "dagstermill", "ins": ins, **options}
        before, after = [], json.dumps(new.metadata[METADATA_KEY], indent=2).splitlines()
        notes += _dropped_names(cells, at, ins)
    spec = _validate(new, target)
    where = f'  metadata["{METADATA_KEY}"]' if not native else ""
    diff = difflib.unified_diff(
        before, after, f"{shown(source)}{where}", f"{shown(target)}{where}", lineterm=""
    )
    return Adoption(source, target, new, spec, ins, "\n".join(diff), tuple(notes))


def shown(path: Path) -> str:
    """`path` relative to the working directory when under it, for messages."""
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def _read(source: Path) -> nbformat.NotebookNode:
    if not source.is_file():
        raise NotebookError(f"{source}: no such file. Give the path of the .ipynb to adopt.")
    if source.suffix != ".ipynb":
        raise NotebookError(
            f"{source}: not a Jupyter notebook (.ipynb). Adopt the notebook that "
            "define_dagstermill_asset's notebook_path names."
        )
    try:
        nb = nbformat.read(source, as_version=4)
        nbformat.validate(nb)
    except Exception as exc:  # nbformat raises bare Exceptions on some malformed files
        raise NotebookError(
            f"{source}: not a valid Jupyter notebook ({type(exc).__name__}: {str(exc)[:200]}). "
            "Open and re-save it in Jupyter, or restore it from version control, then adopt it."
        ) from None
    language = (
        nb.metadata.get("kernelspec", {}).get("language")
        or nb.metadata.get("language_info", {}).get("name")
        or "python"
    )
    if str(language).lower() != "python":
        raise NotebookError(
            f"{source}: its kernel language is {language!r}, not Python; the lab runs Python "
            "notebooks only. Port it to a Python 3 kernel before adopting it."
        )
    return nb


def _check_name(source: Path) -> str:
    name = source.stem
    if not ASSET_NAME.fullmatch(name) or name.startswith("_"):
        why = "would be a draft (a leading '_')" if name.startswith("_") else "is not snake_case"
        better = suggest_name(name.lstrip("_"))
        raise NotebookError(
            f"{source}: the file name is the asset's name, and {source.name!r} {why}. Copy or "
            f"rename it to {better}.ipynb and adopt that."
        )
    return name


def _target(source: Path, folder: Path) -> Path:
    """Where the adopted notebook goes: in place when it is already a notebook of the lab."""
    if source.is_relative_to(folder):
        parts = source.relative_to(folder).parts
        if not any(p.startswith(("_", ".")) for p in parts):
            return source
    target = folder / source.name
    if target.exists() and target.read_bytes() != source.read_bytes():
        raise NotebookError(
            f"{source}: {target} already exists with other content. Compare the two, then "
            f"remove or rename the one in {folder}, or adopt a copy of {source.name} under "
            "another name."
        )
    return target


def _parameters_index(nb: nbformat.NotebookNode, source: Path) -> int | None:
    tagged = [i for i, c in enumerate(nb.cells) if TAG in c.get("metadata", {}).get("tags", [])]
    if len(tagged) > 1:
        numbers = ", ".join(str(i + 1) for i in tagged)
        raise NotebookError(
            f"{source}: {len(tagged)} cells are tagged 'parameters' (cells {numbers}). Keep the "
            "tag on the one cell that assigns the inputs, remove it from the others, and run "
            "adopt again."
        )
    if tagged and nb.cells[tagged[0]].cell_type != "code":
        raise NotebookError(
            f"{source}: cell {tagged[0] + 1}, tagged 'parameters', is not a code cell. Move the "
            "tag to the code cell that assigns the inputs."
        )
    return tagged[0] if tagged else None


def _python(source: str) -> ast.Module | None:
    """A cell's code with IPython magics blanked (lines keep their numbers); None if not Python."""
    if source.lstrip().startswith("%%"):
        return None
    lines = [re.sub(r"^(\s*)[%!].*", r"\1pass", line) for line in source.split("\n")]
    try:
        return ast.parse("\n".join(lines))
    except SyntaxError:
        return None


def _check_not_adopted(
    nb: nbformat.NotebookNode,
    source: Path,
    at: int | None,
    cells: list[ast.Module | None],
    folder: Path,
) -> None:
    if METADATA_KEY in nb.metadata:
        declared = json.dumps(nb.metadata[METADATA_KEY])
        where = "It is in the lab" if source.is_relative_to(folder) else f"Copy it into {folder}"
        raise NotebookError(
            f"{source}: already adopted: its metadata['{METADATA_KEY}'] declares it "
            f"({declared}). {where} as it is; to change the declaration, edit that metadata, "
            "or remove it and run adopt again."
        )
    if at is None:
        return
    tree = cells[at]
    if tree is None:
        raise NotebookError(
            f"{source}: the parameters cell (cell {at + 1}) is not valid Python. Fix it so "
            "that it runs in Jupyter, then adopt again."
        )
    if _assigned(tree) & set(RESERVED):
        raise NotebookError(
            f"{source}: already adopted: its parameters cell declares it in Dagma's form "
            f"(`upstream = [...]`). It needs no adoption: copy it into {folder} as it is."
        )


def _assigned(tree: ast.Module | None) -> set[str]:
    """The variables a cell assigns anywhere in it (loop targets too; imports not)."""
    return {
        node.id
        for node in (ast.walk(tree) if tree is not None else ())
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)
    }


def _infer_ins(
    source: Path,
    cells: list[ast.Module | None],
    at: int | None,
    known: list[str],
    native: bool,
    notes: list[str],
) -> dict[str, str]:
    """The parameters cell's variables named like an asset; refuse to guess when there is none
    and later cells read a variable that cell sets (it would be lost or wrong at run time)."""
    assigned = _assigned(cells[at]) if at is not None else set()
    ins = {v: v for v in sorted(assigned) if v in known}
    if ins or at is None:
        if not ins:
            notes.append("no inputs: the notebook has no cell tagged 'parameters'.")
        return ins
    tree = cells[at]
    # Literal defaults the default engine keeps as parameters are not lost.
    kept = {p for stmt in tree.body if (p := _parameter(stmt))} if native and tree else set()
    read = sorted(_used_later(cells, at, assigned - kept - {"context"}))
    if not read:
        notes.append("no inputs: no variable of the parameters cell is named like an asset.")
        return ins
    hints = [
        f"--ins {variable}={close[0]}"
        for variable in read
        if (close := difflib.get_close_matches(variable, known, n=1, cutoff=0.5))
    ]
    raise NotebookError(
        f"{source}: cannot tell which assets it reads: no variable of its parameters cell is "
        f"named like an asset, yet later cells use what it sets ({', '.join(read)}). Name "
        f"the asset each input reads, e.g. {' '.join(hints) or f'--ins {read[0]}=ASSET'} "
        f"(assets: {', '.join(known)})."
    )


def _imported(tree: ast.Module | None) -> set[str]:
    return {
        (a.asname or a.name).split(".")[0]
        for node in (ast.walk(tree) if tree is not None else ())
        if isinstance(node, ast.Import | ast.ImportFrom)
        for a in node.names
    }


def _used_later(cells: list[ast.Module | None], at: int, names: set[str]) -> dict[str, int]:
    """Which of `names` the cells after the parameters cell read, with the first such cell."""
    used: dict[str, int] = {}
    for i, tree in enumerate(cells[at + 1 :], at + 2):
        for node in ast.walk(tree) if tree is not None else ():
            if isinstance(node, ast.Name) and node.id in names:
                used.setdefault(node.id, i)
    return used


def _check_ins(
    ins: dict[str, str], source: Path, known: list[str], assigned: set[str], has_cell: bool
) -> None:
    for variable, asset in ins.items():
        if asset not in known:
            close = difflib.get_close_matches(asset, known, n=1)
            hint = f"Did you mean {close[0]!r}? " if close else ""
            raise NotebookError(
                f"{source}: --ins {variable}={asset}: {asset!r} is not an asset of this lab. "
                f"{hint}Pick one of: {', '.join(known)}."
            )
        if has_cell and variable not in assigned:
            have = ", ".join(sorted(assigned)) or "nothing"
            raise NotebookError(
                f"{source}: --ins {variable}={asset}: the parameters cell assigns no variable "
                f"{variable!r} (it assigns: {have}). Name the variable the notebook reads "
                f"{asset} into, e.g. --ins {next(iter(sorted(assigned)), 'table')}={asset}."
            )


@dataclass(frozen=True)
class _Names:
    """How the notebook spells dagstermill: module aliases, imported functions, context."""

    module: frozenset[str]
    functions: dict[str, frozenset[str]]
    context: frozenset[str]

    @classmethod
    def of(cls, cells: list[ast.Module | None]) -> _Names:
        module, functions = {"dagstermill"}, dict[str, set[str]]()
        trees = [t for t in cells if t is not None]
        for node in (n for t in trees for n in ast.walk(t)):
            if isinstance(node, ast.Import):
                module |= {a.asname or a.name for a in node.names if a.name == "dagstermill"}
            elif isinstance(node, ast.ImportFrom) and node.module == "dagstermill":
                for a in node.names:
                    functions.setdefault(a.name, set()).add(a.asname or a.name)
        names = cls(frozenset(module), {k: frozenset(v) for k, v in functions.items()}, frozenset())
        # The names get_context() is assigned to; else the `context` dagstermill injects.
        context = {
            target.id
            for t in trees
            for node in ast.walk(t)
            if isinstance(node, ast.Assign) and names.calls(node.value, "get_context")
            for target in node.targets
            if isinstance(target, ast.Name)
        }
        stored = set().union(*(_assigned(t) for t in trees)) if trees else set()
        if not context and "context" not in stored:
            context = {"context"}
        return dataclasses.replace(names, context=frozenset(context))

    def calls(self, node: ast.AST, function: str) -> bool:
        """Whether `node` calls dagstermill's `function`."""
        if not isinstance(node, ast.Call):
            return False
        func = node.func
        if isinstance(func, ast.Name):
            return func.id in self.functions.get(function, ())
        return (
            isinstance(func, ast.Attribute)
            and func.attr == function
            and isinstance(func.value, ast.Name)
            and func.value.id in self.module
        )

    def is_context(self, node: ast.AST) -> bool:
        return (isinstance(node, ast.Name) and node.id in self.context) or self.calls(
            node, "get_context"
        )


def _output_name(call: ast.Call) -> ast.expr | None:
    if len(call.args) > 1:
        return call.args[1]
    return next((k.value for k in call.keywords if k.arg == "output_name"), None)


def _output_value(call: ast.Call) -> ast.expr | None:
    if call.args:
        return call.args[0]
    return next((k.value for k in call.keywords if k.arg == "value"), None)


def _outputs(
    name: str, names: _Names, cells: list[ast.Module | None], source: Path, native: bool
) -> list[str]:
    """Asset names of the outputs `yield_result` names; none when it only yields the default."""
    named: list[str] = []
    default = False
    for i, tree in enumerate(cells):
        for node in ast.walk(tree) if tree is not None else ():
            if not isinstance(node, ast.Call) or not names.calls(node, "yield_result"):
                continue
            arg = _output_name(node)
            if arg is None:
                default = True
            elif isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                if arg.value == DAGSTERMILL_RESULT:
                    default = True
                elif arg.value not in named:
                    named.append(arg.value)
            elif native:
                raise NotebookError(
                    f"{source}: cell {i + 1}, line {node.lineno}: yield_result names its output "
                    f"with {ast.unparse(arg)!r}, not a string. Write the name as a string, or "
                    f"adopt without --to native."
                )
    if not named:
        return []
    return ([name] if default else []) + named


def _dropped_names(
    cells: list[ast.Module | None], at: int | None, ins: dict[str, str]
) -> list[str]:
    """Notes for names the parameters cell binds, later cells use, and dagstermill drops."""
    if at is None:
        return []
    bound = _assigned(cells[at]) | _imported(cells[at])
    used = _used_later(cells, at, bound - set(ins) - {"context"})
    return [
        f"the parameters cell also defines {v!r}, which cell {cell} uses; at run time "
        f"dagstermill replaces that cell with the inputs, so move {v!r} to a cell above it "
        "(or adopt with --to native, which keeps it)."
        for v, cell in sorted(used.items())
    ]


def _code_lines(nb: nbformat.NotebookNode) -> list[str]:
    """The code cells in the percent format (`# %%` starts a cell), for the diff."""
    lines: list[str] = []
    for cell in nb.cells:
        if cell.cell_type == "code":
            tags = cell.get("metadata", {}).get("tags", [])
            lines.append("# %%" + (f" tags={json.dumps(tags)}" if tags else ""))
            lines.extend(str(cell.source).splitlines())
    return lines


def _validate(nb: nbformat.NotebookNode, target: Path) -> NotebookSpec:
    """Parse the result as the lab will, before anything is written."""
    with tempfile.TemporaryDirectory(prefix="dagma-adopt-") as tmp:
        trial = Path(tmp) / target.name
        nbformat.write(nb, trial)
        try:
            return parse_notebook(trial)
        except NotebookError as exc:
            raise NotebookError(str(exc).replace(str(trial.resolve()), str(target))) from None


# --- `--to native`: the default engine ---------------------------------------------------


def _offset(lines: list[str], lineno: int, col: int) -> int:
    """A character offset into the cell from ast's line and UTF-8 byte column."""
    before = sum(len(line) + 1 for line in lines[: lineno - 1])
    return before + len(lines[lineno - 1].encode()[:col].decode())


def _span(source: str, node: ast.expr | ast.stmt) -> tuple[int, int]:
    lines = source.split("\n")
    start = _offset(lines, node.lineno, node.col_offset)
    end = _offset(lines, node.end_lineno or node.lineno, node.end_col_offset or node.col_offset)
    return start, end


def _line_span(source: str, node: ast.stmt) -> tuple[int, int] | None:
    """The whole lines of a statement, newline included; None if it shares a line."""
    start, end = _span(source, node)
    head = source.rfind("\n", 0, start) + 1
    tail = source.find("\n", end)
    tail = len(source) if tail < 0 else tail + 1
    rest = source[end:tail].strip()
    if source[head:start].strip() or (rest and not rest.startswith("#")):
        return None
    return head, tail


def _apply(source: str, edits: list[Edit]) -> str:
    for start, end, text in sorted(edits, reverse=True):
        source = source[:start] + text + source[end:]
    return source


def _stores(node: ast.Name) -> bool:
    return isinstance(node.ctx, ast.Store)


def _line(source: str, lineno: int) -> str:
    return source.split("\n")[lineno - 1].strip()


def _refusals(
    nb: nbformat.NotebookNode, cells: list[ast.Module | None], names: _Names
) -> list[str]:
    """Each use of dagstermill the default engine has no equivalent for, by cell and line."""
    problems = []
    for i, (cell, tree) in enumerate(zip(nb.cells, cells, strict=True)):
        text = str(cell.source)
        if tree is None:
            if cell.cell_type == "code" and re.search(r"dagstermill|yield_|context", text):
                problems.append(
                    f"cell {i + 1} is not valid Python, so its uses of dagstermill cannot be "
                    "rewritten"
                )
            continue
        allowed: set[int] = set()  # get_context() calls a rewrite or a removal takes care of
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and names.calls(node.value, "get_context"):
                allowed.add(id(node.value))
            elif isinstance(node, ast.Attribute) and names.is_context(node.value):
                allowed.add(id(node.value))
                if node.attr not in _CTX_ATTRIBUTES:
                    why = _NO_EQUIVALENT.get(node.attr, "a dagstermill-only context attribute")
                    problems.append(
                        f"cell {i + 1}, line {node.lineno}: `{_line(text, node.lineno)}` uses "
                        f"context.{node.attr}: {why}"
                    )
        for node in ast.walk(tree):
            at = f"cell {i + 1}, line {getattr(node, 'lineno', 0)}: "
            code = f"`{_line(text, getattr(node, 'lineno', 1))}`"
            if names.calls(node, "yield_event"):
                problems.append(
                    f"{at}{code} uses dagstermill.yield_event, which has no equivalent on the "
                    "default engine"
                )
            elif names.is_context(node) and id(node) not in allowed:
                if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
                    continue
                problems.append(
                    f"{at}{code} uses dagstermill's context itself, which the default engine "
                    "has no equivalent for"
                )
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and node.id in {"nb", "ctx"} and _stores(node):
                problems.append(
                    f"cell {i + 1}, line {node.lineno}: `{_line(text, node.lineno)}` binds "
                    f"{node.id!r}, a name the default engine's cell needs; rename it"
                )
    return problems


def _context_edits(source: str, tree: ast.Module, names: _Names) -> list[Edit]:
    return [
        (*_span(source, node), f"ctx.{node.attr}")
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and names.is_context(node.value)
    ]


def _output_edits(source: str, tree: ast.Module, names: _Names) -> list[Edit]:
    edits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and names.calls(node, "yield_result"):
            value, arg = _output_value(node), _output_name(node)
            text = (ast.get_source_segment(source, value) if value is not None else None) or "None"
            if isinstance(arg, ast.Constant) and arg.value != DAGSTERMILL_RESULT:
                text += f", name={json.dumps(arg.value)}"
            edits.append((*_span(source, node), f"ctx.output({text})"))
    return edits


def _unassign_context(source: str, tree: ast.Module, names: _Names) -> list[Edit]:
    """Drop `context = dagstermill.get_context()`: its uses were rewritten or refused."""
    spans = (
        _line_span(source, stmt)
        for stmt in tree.body
        if isinstance(stmt, ast.Assign) and names.calls(stmt.value, "get_context")
    )
    return [(*span, "") for span in spans if span is not None]


def _unimport(source: str, tree: ast.Module, used: set[str]) -> list[Edit]:
    """Drop the dagstermill imports nothing uses any more."""
    edits = []
    for stmt in tree.body:
        if isinstance(stmt, ast.Import):
            bound = [a.asname or a.name for a in stmt.names if a.name == "dagstermill"]
            drop = len(bound) == len(stmt.names) and not set(bound) & used
        elif isinstance(stmt, ast.ImportFrom) and stmt.module == "dagstermill":
            drop = not {a.asname or a.name for a in stmt.names} & used
        else:
            drop = False
        span = _line_span(source, stmt) if drop else None
        if span is not None:
            edits.append((*span, ""))
    return edits


def _rewrite(nb: nbformat.NotebookNode, pass_: Callable[[str, ast.Module], list[Edit]]) -> None:
    for cell in nb.cells:
        tree = _python(cell.source) if cell.cell_type == "code" else None
        if tree is not None:
            cell.source = _apply(str(cell.source), pass_(str(cell.source), tree))


def _loaded(nb: nbformat.NotebookNode) -> set[str]:
    trees = [_python(c.source) for c in nb.cells if c.cell_type == "code"]
    return {
        n.id
        for t in trees
        if t is not None
        for n in ast.walk(t)
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)
    }


def _single_target(stmt: ast.stmt) -> str | None:
    """The one name `x = ...` or `x: T = ...` assigns; None for any other statement."""
    if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
        target = stmt.targets[0]
    elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
        target = stmt.target
    else:
        return None
    return target.id if isinstance(target, ast.Name) else None


def _parameter(stmt: ast.stmt) -> str | None:
    """The name of a literal assignment the default engine can keep as a typed parameter."""
    name = _single_target(stmt)
    if name is None or name.startswith("_") or name in RESERVED:
        return None
    if not isinstance(stmt, ast.Assign | ast.AnnAssign) or stmt.value is None:
        return None
    annotation = stmt.annotation if isinstance(stmt, ast.AnnAssign) else None
    types = {n.id for n in ast.walk(annotation) if isinstance(n, ast.Name)} if annotation else set()
    if not types <= _BUILTIN_TYPES:
        return None
    try:
        ast.literal_eval(stmt.value)
    except ValueError:
        return None
    return name


def _to_native(
    nb: nbformat.NotebookNode,
    at: int | None,
    cells: list[ast.Module | None],
    ins: dict[str, str],
    options: dict[str, object],
    names: _Names,
    source: Path,
) -> nbformat.NotebookNode:
    problems = _refusals(nb, cells, names)
    if problems:
        raise NotebookError(
            f"{source}: cannot move to the default engine:\n  - "
            + "\n  - ".join(problems)
            + f"\nKeep the dagstermill engine: run `dagma notebook adopt {source}` without "
            "--to native."
        )
    new = copy.deepcopy(nb)
    before = [str(c.source) for c in new.cells]
    _rewrite(new, lambda s, t: _context_edits(s, t, names))
    _rewrite(new, lambda s, t: _output_edits(s, t, names))
    _rewrite(new, lambda s, t: _unassign_context(s, t, names))
    params: list[str] = []
    moved = ""
    if at is not None:
        cell = new.cells[at]
        text = str(cell.source)
        tree = _python(text) or ast.Module(body=[], type_ignores=[])  # parsed by _check_not_adopted
        taken: list[Edit] = []
        for stmt in tree.body:
            target = _single_target(stmt)
            keep = target not in ins and _parameter(stmt) is not None
            if keep or target in ins:
                span = _line_span(text, stmt) or _span(text, stmt)
                if keep:
                    params.append(text[slice(*span)].strip())
                taken.append((*span, ""))
        moved = _apply(text, taken).strip()
    header = [f"upstream = {json.dumps(sorted(set(ins.values())))}"]
    if options:
        header.append(f"asset = {json.dumps(options)}")
    glue = ["from dagma import nb", "ctx = nb.context()"]
    glue += [f"{var} = ctx.upstream({json.dumps(asset)})" for var, asset in ins.items()]
    parameters = nbformat.v4.new_code_cell("\n".join(header + params))
    parameters.metadata["tags"] = [TAG]
    reads = nbformat.v4.new_code_cell("\n".join(([moved] if moved else []) + glue))
    if at is not None:
        parameters.metadata = new.cells[at].metadata
        new.cells[at : at + 1] = [parameters, reads]
        before[at : at + 1] = [parameters.source, reads.source]
    else:
        first = next((i for i, c in enumerate(new.cells) if c.cell_type == "code"), 0)
        new.cells[first:first] = [parameters, reads]
        before[first:first] = [parameters.source, reads.source]
    used = _loaded(new)
    _rewrite(new, lambda s, t: _unimport(s, t, used))
    # Drop only the cells this rewrite emptied (e.g. one that held just `import dagstermill`).
    new.cells = [
        c
        for c, was in zip(new.cells, before, strict=True)
        if c.cell_type != "code" or c.source.strip() or not was.strip()
    ]
    return new
