"""The small API a production notebook uses: `ctx = nb.context()`.

Inside a Dagster run, Dagma injects `dagma_context` (a path to a JSON file) after the
parameters cell. Run by hand, `context()` reads the settings instead and upstream values come
from the last materialization, so the same notebook works in Jupyter and in the pipeline.
This module stays light (no Dagster, no MLflow at import) because every kernel imports it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dagma.errors import DagmaError
from dagma.lib.run_folder import RunFolder, read_pickle, write_pickle

CONTEXT_VAR = "dagma_context"
# The same path, for code that has no notebook namespace to read it from.
CONTEXT_ENV = "DAGMA_CONTEXT"


# The materialization metadata entry that carries a small dict value, so a summary of a run
# reads it from the event log instead of loading the value.
VALUE_METADATA = "value"
_PREVIEW_BYTES = 64_000


def value_preview(value: Any) -> dict[str, Any] | None:
    """`value` itself when it is a dict that JSON can carry in a few kilobytes, else None."""
    if not isinstance(value, dict):
        return None
    try:
        text = json.dumps(value, allow_nan=True)
    except (TypeError, ValueError):
        return None
    return value if len(text) <= _PREVIEW_BYTES else None


class NotebookContextError(DagmaError, RuntimeError):
    """The notebook asked for something its context cannot give."""


@dataclass
class RunTarget:
    """Where a run's notebook reads and writes: the lab's services and the run's identifiers."""

    tracking_uri: str
    experiment: str
    artifact_root: str | None
    qdrant_url: str | None
    qdrant_path: str
    collection: str
    run_id: str | None = None
    partition_key: str | None = None
    partition_range: list[str] | None = None
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class NotebookContext:
    """What a running notebook knows about its asset, its run and the lab's services.

    In a run it is the run folder's `context.json`: the target, the upstream values' files in
    the lab's storage (one file, or one per partition), and the MLflow run's id once known.
    """

    notebook: str
    asset_names: list[str]
    target: RunTarget
    upstream_paths: dict[str, str | dict[str, str]]
    outputs_dir: Path | None
    code_version: str | None = None
    mlflow_run_id: str | None = None
    context_file: Path | None = None

    tracking_uri = property(lambda self: self.target.tracking_uri)
    experiment = property(lambda self: self.target.experiment)
    artifact_root = property(lambda self: self.target.artifact_root)
    qdrant_url = property(lambda self: self.target.qdrant_url)
    qdrant_path = property(lambda self: self.target.qdrant_path)
    collection = property(lambda self: self.target.collection)
    run_id = property(lambda self: self.target.run_id)
    partition_range = property(lambda self: self.target.partition_range)
    tags = property(lambda self: self.target.tags)

    @property
    def partition_key(self) -> str | None:
        return self.target.partition_key

    @partition_key.setter
    def partition_key(self, value: str | None) -> None:
        self.target.partition_key = value

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("context_file")
        data["outputs_dir"] = str(self.outputs_dir) if self.outputs_dir else None
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], context_file: Path | None = None) -> NotebookContext:
        data = dict(data)
        data["target"] = RunTarget(**data["target"])
        data["outputs_dir"] = Path(data["outputs_dir"]) if data.get("outputs_dir") else None
        data.pop("mlflow_error", None)
        return cls(**data, context_file=context_file)

    @property
    def interactive(self) -> bool:
        """True when run by hand rather than by Dagster."""
        return self.outputs_dir is None

    def upstream(self, name: str) -> Any:
        """The value of upstream asset `name`."""
        path = self.upstream_paths.get(name)
        if path is None:
            raise NotebookContextError(
                f"{self.notebook}: {name!r} is not in this notebook's `upstream` list "
                f"({', '.join(self.upstream_paths) or 'empty'}). Add it to the parameters cell."
            )
        if isinstance(path, dict):  # the partitions a run maps to this one, e.g. a day's hours
            return {key: read_pickle(Path(p)) for key, p in path.items()}
        if Path(path).is_dir():
            # By hand, a partitioned upstream is its folder of partitions: read those that
            # match this notebook's partition (e.g. a day's hours), or all of them.
            prefix = self.partition_key or ""
            return {
                p.name: read_pickle(p)
                for p in sorted(Path(path).iterdir())
                if p.is_file() and p.name.startswith(prefix) and not p.name.startswith(".")
            }
        if not Path(path).is_file():
            raise NotebookContextError(
                f"{self.notebook}: upstream {name!r} has not been materialized yet ({path}). "
                f"Run `dagma run {name}` first."
            )
        return read_pickle(Path(path))

    def output(self, value: Any, *, name: str | None = None, metadata: dict | None = None) -> None:
        """Hand `value` to Dagster as the asset `name` (default: this notebook's asset)."""
        name = name or self.asset_names[0]
        if name not in self.asset_names:
            raise NotebookContextError(
                f"{self.notebook}: {name!r} is not one of its outputs {self.asset_names}. "
                "Declare it in `asset = {'outputs': [...]}`."
            )
        if self.outputs_dir is None:
            return
        # The one pickle of this value: the lab's IO manager moves this file into its storage.
        write_pickle(self.outputs_dir / f"{name}.pkl", value)
        meta = dict(metadata or {})
        preview = value_preview(value)
        if preview is not None:
            meta[VALUE_METADATA] = preview
        if meta:
            (self.outputs_dir / f"{name}.meta.json").write_text(json.dumps(meta, default=str))

    def lineage(self) -> dict[str, str]:
        """Tags that tie an MLflow run to this notebook, its Dagster run and the code."""
        from dagma.lib import tracking

        return (
            tracking.lineage_tags(
                notebook=self.notebook,
                asset_key=",".join(self.asset_names),
                dagster_run_id=self.run_id,
                partition=self.partition_key,
                code_version=self.code_version,
            )
            | self.tags
        )

    @contextlib.contextmanager
    def start_run(self, run_name: str | None = None) -> Iterator[Any]:
        """This materialization's MLflow run (created by Dagma before the kernel started).

        By hand, a new run tagged with the same lineage is started instead.
        """
        import mlflow

        from dagma.lib import tracking

        if "sklearn" in sys.modules:  # autolog only what the notebook already imported
            import mlflow.sklearn

            mlflow.sklearn.autolog(log_models=False, silent=True)
        run_id = self.mlflow_run_id or self.wait_for_run_id()
        if run_id:
            kwargs: dict[str, Any] = {"run_id": run_id}
            if run_name:
                kwargs["run_name"] = run_name
        else:
            experiment_id = tracking.setup_experiment(
                self.tracking_uri,
                self.experiment,
                Path(self.artifact_root) if self.artifact_root else None,
            )
            kwargs = {
                "experiment_id": experiment_id,
                "run_name": run_name or self.notebook,
                "tags": self.lineage(),
            }
        with mlflow.start_run(**kwargs) as run:
            yield run

    def wait_for_run_id(self, timeout: float = 120.0) -> str | None:
        """The run the bridge creates while the kernel starts: its id lands in the context."""
        if self.context_file is None:
            return None
        deadline = time.monotonic() + timeout
        while True:
            data = RunFolder(self.context_file.parent).read_context()
            if data.get("mlflow_error"):
                raise NotebookContextError(f"{self.notebook}: {data['mlflow_error']}")
            if data.get("mlflow_run_id"):
                self.mlflow_run_id = str(data["mlflow_run_id"])
                return self.mlflow_run_id
            if time.monotonic() > deadline:
                raise NotebookContextError(
                    f"{self.notebook}: the MLflow run was not created within {timeout:.0f} s; "
                    f"check MLFLOW_TRACKING_URI={self.tracking_uri}"
                )
            time.sleep(0.05)

    def load_model(self, uri: str) -> Any:
        """A model logged to this lab's MLflow, e.g. an upstream's `model_uri`."""
        import mlflow.sklearn

        return mlflow.sklearn.load_model(uri)

    def vector_store(self) -> Any:
        """The lab's vector store: the Qdrant server when configured, else the embedded one."""
        from dagma.lib.vectors import open_store
        from dagma.settings import get_settings

        # The run's target says where; the key comes from the environment, as every secret does.
        return open_store(
            url=self.qdrant_url, api_key=get_settings().qdrant_key(), root=Path(self.qdrant_path)
        )


def _user_ns() -> dict[str, Any]:
    try:
        from IPython import get_ipython
    except ImportError:
        return {}
    shell = get_ipython()
    return dict(shell.user_ns) if shell is not None else {}


def _interactive(notebook: str, upstream: list[str]) -> NotebookContext:
    from dagma.settings import get_settings

    s = get_settings()
    return NotebookContext(
        notebook=notebook,
        asset_names=[notebook],
        target=RunTarget(
            tracking_uri=s.tracking_uri,
            experiment=s.dagma_experiment,
            artifact_root=str(s.artifact_root),
            qdrant_url=s.qdrant_url,
            qdrant_path=str(s.qdrant_path),
            collection=s.dagma_collection,
        ),
        upstream_paths={name: str(s.storage_dir / name) for name in upstream},
        outputs_dir=None,
    )


def context(name: str | None = None) -> NotebookContext:
    """This notebook's context: injected by Dagma in a run, built from settings by hand.

    By hand, `upstream` is read from the notebook's parameters cell and the name from the
    file Jupyter reports (or `name`).
    """
    ns = _user_ns()
    path = ns.get(CONTEXT_VAR) or os.environ.get(CONTEXT_ENV)
    if not path:
        session = ns.get("__session__") or ns.get("__vsc_ipynb_file__") or ""
        notebook = name or (Path(str(session)).stem if session else "interactive")
        ctx = _interactive(notebook, list(ns.get("upstream") or []))
        ctx.partition_key = str(ns.get("partition_key") or "") or None
        os.environ.setdefault("MLFLOW_TRACKING_URI", ctx.tracking_uri)
        return ctx
    data = json.loads(Path(path).read_text())
    ctx = NotebookContext.from_json(data, context_file=Path(path))
    os.environ["MLFLOW_TRACKING_URI"] = ctx.tracking_uri
    return ctx
