"""One notebook's run folder, `$DAGMA_HOME/runs/<run id>/<notebook>/`, and what is in it.

The runner writes it, the kernel reads its context, the app lists it, gc prunes it and a
restore moves the paths inside it. Pure: no Dagster, no MLflow, so every kernel can import it.

    context.json     what the kernel knows (target, upstream files, MLflow run id once known)
    <notebook>.ipynb the executed copy, kept on failure too; <notebook>.html beside it
    outputs/         what the kernel hands over: <asset>.pkl and <asset>.meta.json
    inputs/          upstream values that were not in the lab's storage, one pickle each
"""

from __future__ import annotations

import json
import os
import pickle  # nosec B403 # only pickles our own kernel or IO manager wrote
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dagma.lib.atomic import atomic_file, write_atomic

CONTEXT_FILE = "context.json"


@dataclass(frozen=True)
class RunFolder:
    """`<runs>/<run id>/<notebook>/`; the run id and notebook are the folder's two names."""

    path: Path

    @classmethod
    def of(cls, runs_dir: Path, run_id: str, notebook: str) -> RunFolder:
        return cls(Path(runs_dir) / run_id / notebook)

    @classmethod
    def every(cls, runs_dir: Path) -> list[RunFolder]:
        """Every run folder under `runs_dir`, by run then notebook (trash left out)."""
        found = []
        for run in sorted(runs_dir.iterdir()) if runs_dir.is_dir() else []:
            if run.is_dir() and not run.name.startswith("."):
                found += [cls(nb) for nb in sorted(run.iterdir()) if nb.is_dir()]
        return found

    @property
    def run_id(self) -> str:
        return self.path.parent.name

    @property
    def notebook(self) -> str:
        return self.path.name

    @property
    def mtime(self) -> float:
        return self.path.stat().st_mtime

    @property
    def ipynb(self) -> Path:
        return self.path / f"{self.notebook}.ipynb"

    @property
    def html(self) -> Path:
        return self.path / f"{self.notebook}.html"

    @property
    def context_file(self) -> Path:
        return self.path / CONTEXT_FILE

    @property
    def outputs(self) -> Path:
        return self.path / "outputs"

    @property
    def inputs(self) -> Path:
        return self.path / "inputs"

    def output_file(self, asset: str) -> Path:
        return self.outputs / f"{asset}.pkl"

    def output_metadata_file(self, asset: str) -> Path:
        return self.outputs / f"{asset}.meta.json"

    def create(self) -> RunFolder:
        for folder in (self.inputs, self.outputs):
            folder.mkdir(parents=True, exist_ok=True)
        return self

    def read_context(self) -> dict[str, Any]:
        """The context as written, or {} when there is none (e.g. a dagstermill notebook's)."""
        try:
            data = json.loads(self.context_file.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def write_context(self, data: dict[str, Any]) -> None:
        """Replace the context whole, so a reader never sees half of it."""
        write_atomic(self.context_file, json.dumps(data, default=str, indent=1))

    @property
    def mlflow_run_id(self) -> str | None:
        return self.read_context().get("mlflow_run_id")

    def rehome(self, old: str, new: str) -> None:
        """Point the context's paths at a lab that moved from `old` to `new` (a restore)."""
        if self.context_file.is_file():
            text = self.context_file.read_text()
            if old in text:
                moved = json.loads(text.replace(json.dumps(old)[1:-1], json.dumps(new)[1:-1]))
                self.write_context(moved)


def write_pickle(path: Path, value: Any) -> None:
    """Pickle `value` to `path` whole: written beside it, then renamed over it."""
    with atomic_file(path) as fh:
        pickle.dump(value, fh, pickle.HIGHEST_PROTOCOL)


def read_pickle(path: Path) -> Any:
    with open(path, "rb") as fh:
        return pickle.load(fh)  # nosec B301 # written by our own kernel or IO manager


@dataclass(frozen=True)
class PickleFile:
    """A value that is a pickle on disk, passed by its path instead of being loaded.

    The lab's IO manager gives a notebook step its upstream values this way, and the runner
    gives back what the kernel handed over this way, so each value is pickled once, by the
    kernel that made it, and unpickled once, by the kernel that reads it.
    """

    path: str

    def load(self) -> Any:
        return read_pickle(Path(self.path))

    def move_to(self, target: Path) -> None:
        """Put the file at `target` whole (a rename on one filesystem, else a copy)."""
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(self.path, target)
        except OSError:  # another filesystem
            with open(self.path, "rb") as src, atomic_file(target) as dst:
                shutil.copyfileobj(src, dst)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # An IO manager other than the lab's pickles the value itself, not the path.
        return pickle.loads, (Path(self.path).read_bytes(),)


def loaded(value: Any) -> Any:
    """`value` with each `PickleFile` in it (alone, or one per partition) loaded."""
    if isinstance(value, PickleFile):
        return value.load()
    if pickle_paths(value) is not None:
        return {k: v.load() for k, v in value.items()}
    return value


def pickle_paths(value: Any) -> str | dict[str, str] | None:
    """The file of a `PickleFile`, or of each partition in a dict of them; else None."""
    if isinstance(value, PickleFile):
        return value.path
    if isinstance(value, dict) and value and all(isinstance(v, PickleFile) for v in value.values()):
        return {str(k): v.path for k, v in value.items()}
    return None
