"""MLflow helpers: one experiment per lab, lineage tags on every run, links to the UI."""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import subprocess  # nosec B404 # we run argv lists we build, never a shell
import tempfile
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

from dagma.errors import DagmaError

if TYPE_CHECKING:
    from mlflow import MlflowClient

PROJECT_ROOT = Path(__file__).resolve().parents[3]


class TrackingError(DagmaError, RuntimeError):
    """MLflow cannot be reached or used; the message names MLFLOW_TRACKING_URI and the fix."""


@lru_cache(maxsize=1)
def git_commit(root: Path = PROJECT_ROOT) -> str:
    """The checked-out commit (with `-dirty` when the tree has changes), or `unknown`."""
    try:
        sha = subprocess.run(  # nosec B603, B607 # argv built here, no shell; resolved on PATH on purpose
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=5,
        ).stdout.strip()
        dirty = subprocess.run(  # nosec B603, B607 # argv built here, no shell; resolved on PATH on purpose
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


@lru_cache(maxsize=1)
def lock_hash(root: Path = PROJECT_ROOT) -> str:
    """sha256 of uv.lock: which exact package set produced a result."""
    lock = root / "uv.lock"
    return hashlib.sha256(lock.read_bytes()).hexdigest()[:16] if lock.is_file() else "unknown"


def lineage_tags(**extra: str | None) -> dict[str, str]:
    """Tags that tie an MLflow run to the code, the packages and the Dagster run."""
    tags = {"dagma.git_commit": git_commit(), "dagma.uv_lock": lock_hash()}
    tags.update({f"dagma.{k}": str(v) for k, v in extra.items() if v is not None})
    return tags


def check_server(tracking_uri: str, timeout: float = 5.0) -> None:
    """Fail at once when an MLflow server does not answer: its client retries for minutes."""
    import urllib.error
    import urllib.request

    url = tracking_uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout):  # nosec B310 # http(s) checked above
            return
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            return  # it answers; the credentials are checked by the first real call
        reason = f"HTTP {exc.code}"
    except (OSError, ValueError) as exc:
        reason = str(getattr(exc, "reason", exc))
    raise TrackingError(
        f"MLflow at MLFLOW_TRACKING_URI={tracking_uri} does not answer ({url}: {reason}). "
        "Start it (`dagma services up`), fix the URL, or unset MLFLOW_TRACKING_URI to use the "
        "embedded store."
    )


def local_store(tracking_uri: str) -> Path | None:
    """The file or folder of a local MLflow store (sqlite, file or a bare path); None for a server."""
    parsed = urlparse(tracking_uri)
    if parsed.scheme == "sqlite":
        return Path(unquote(tracking_uri.removeprefix("sqlite:///")))
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" and tracking_uri:
        return Path(tracking_uri)
    return None


def setup_experiment(tracking_uri: str, experiment: str, artifact_root: Path | None) -> str:
    """Point MLflow at `tracking_uri` and return the id of `experiment`, creating it if needed.

    Local stores get an explicit artifact folder; MLflow's default is `./mlruns` under the cwd.
    """
    import mlflow

    if tracking_uri.startswith(("http://", "https://")):
        check_server(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    if tracking_uri.startswith("sqlite:///"):
        seed_sqlite_store(Path(tracking_uri.removeprefix("sqlite:///")), artifact_root)
    try:
        found = mlflow.get_experiment_by_name(experiment)
        if found is not None:
            return str(found.experiment_id)
        location = None
        if artifact_root is not None and not tracking_uri.startswith(("http://", "https://")):
            artifact_root.mkdir(parents=True, exist_ok=True)
            location = (artifact_root / experiment).as_uri()
        try:
            return str(mlflow.create_experiment(experiment, artifact_location=location))
        except mlflow.exceptions.MlflowException as exc:
            # Parallel steps race to create it; the loser reads the winner's experiment.
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            winner = mlflow.get_experiment_by_name(experiment)
            if winner is None:
                raise
            return str(winner.experiment_id)
    except Exception as exc:
        raise TrackingError(
            f"MLflow at MLFLOW_TRACKING_URI={tracking_uri} cannot be used ({exc}). "
            "Start the server or unset MLFLOW_TRACKING_URI to use the embedded store."
        ) from exc


def _template_path() -> Path:
    import mlflow

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "dagma" / f"mlflow-{mlflow.__version__}.db"


def seed_sqlite_store(db: Path, artifact_root: Path | None) -> None:
    """Start a new sqlite store as a copy of an empty migrated one, cached per MLflow version.

    MLflow's migrations take about 5 s; a copy takes a millisecond. An existing store is left as
    it is, and a failing cache falls back to MLflow creating the store itself.
    """
    if db.exists():
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    try:
        template = _template_path()
        if not template.is_file():
            _build_template(template)
        fd, tmp = tempfile.mkstemp(dir=db.parent, prefix=".mlflow-", suffix=".db")
        os.close(fd)
        shutil.copyfile(template, tmp)
        default = (artifact_root or db.parent / "artifacts") / "0"
        with sqlite3.connect(tmp) as conn:
            conn.execute(
                "UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                (default.as_uri(),),
            )
        conn.close()
        try:
            os.link(tmp, db)  # never replaces a store another process just created
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    except (OSError, sqlite3.Error):
        return


def _build_template(template: Path) -> None:
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    template.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=template.parent) as tmp:
        path = Path(tmp) / "mlflow.db"
        store = SqlAlchemyStore(f"sqlite:///{path}", str(Path(tmp) / "artifacts"))
        store.engine.dispose()
        os.replace(path, template)


def client(tracking_uri: str) -> MlflowClient:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def end_notebook_run(
    tracking_uri: str, run_id: str, files: Iterable[Path | None], failed: bool = False
) -> None:
    """Attach an executed notebook's files under `notebook/`, then end its run."""
    mlflow_client = client(tracking_uri)
    for path in files:
        if path is not None and path.is_file():
            mlflow_client.log_artifact(run_id, str(path), artifact_path="notebook")
    mlflow_client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")


def kill_runs_of(tracking_uri: str, experiment: str, dagster_run_id: str) -> list[str]:
    """Mark KILLED the MLflow runs of a Dagster run that still say RUNNING; returns their ids."""
    mlflow_client = client(tracking_uri)
    found = mlflow_client.get_experiment_by_name(experiment)
    if found is None:
        return []
    runs = mlflow_client.search_runs(
        [found.experiment_id],
        filter_string=f"tags.`dagma.dagster_run_id` = '{dagster_run_id}' and "
        "attributes.status = 'RUNNING'",
    )
    for run in runs:
        mlflow_client.set_terminated(run.info.run_id, status="KILLED")
    return [run.info.run_id for run in runs]


CHAMPION = "champion"


def alias_version(tracking_uri: str, name: str, alias: str = CHAMPION) -> str | None:
    """The version of registered model `name` that `alias` points at, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client(tracking_uri).get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def promote(tracking_uri: str, name: str, version: str, alias: str = CHAMPION) -> str | None:
    """Point `alias` at `version`; returns the version it pointed at before (None if none)."""
    previous = alias_version(tracking_uri, name, alias)
    client(tracking_uri).set_registered_model_alias(name, alias, version)
    return previous


def run_url(ui: str, experiment_id: str, run_id: str) -> str:
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def model_url(ui: str, name: str, version: str | int) -> str:
    return f"{ui.rstrip('/')}/#/models/{name}/versions/{version}"
