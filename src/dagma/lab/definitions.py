"""Loading the project's Definitions for a run, and keeping them while nothing they read changed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dagma.settings import Settings, get_settings

# Environment variables the loaded code location may depend on.
_ENV_PREFIXES = ("DAGMA_", "DAGSTER_", "MLFLOW_", "QDRANT_", "OPENAI_", "OLLAMA_")


def load_definitions(settings: Settings) -> Any:
    """The project's Definitions, loaded after the environment points at `settings`."""
    settings.ensure_dirs()
    settings.export_env()
    from dagma.definitions import defs
    from dagma.notebooks.spec import NotebookError

    try:
        return defs()
    except Exception as exc:
        # Dagster wraps errors raised while loading defs/; surface ours, which name the file.
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, NotebookError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise cause from None
        raise


_DEFINITIONS: dict[tuple[Any, ...], Any] = {}


def _definitions_key(settings: Settings) -> tuple[Any, ...]:
    """What the loaded code location depends on besides Python code: environment, notebooks."""
    notebooks = []
    for path in sorted(settings.notebooks_dir.rglob("*.ipynb")):
        stat = path.stat()
        notebooks.append((str(path), stat.st_mtime_ns, stat.st_size))
    team = settings.dagma_defs_dir
    # The team's definitions and the notebooks beside them (their code versions).
    team_files = [*team.rglob("*.py"), *team.rglob("*.ipynb")] if team and team.is_dir() else []
    for path in sorted(team_files):
        notebooks.append((str(path), path.stat().st_mtime_ns, path.stat().st_size))
    dotenv = Path(".env")
    env_file = dotenv.stat().st_mtime_ns if dotenv.is_file() else None
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES))
    return (os.getcwd(), env_file, tuple(env), tuple(notebooks))


def shared_definitions(settings: Settings | None = None, loaded: Any = None) -> Any:
    """The project's Definitions, loaded once per process while notebooks and environment stay.

    `loaded` (just loaded by the caller) is kept instead of loading again.
    """
    settings = settings or get_settings()
    settings.ensure_dirs()
    settings.export_env()
    key = _definitions_key(settings)
    if loaded is not None or key not in _DEFINITIONS:
        _DEFINITIONS.clear()
        _DEFINITIONS[key] = loaded if loaded is not None else load_definitions(settings)
    return _DEFINITIONS[key]


def step_definitions() -> Any:
    """What step processes reconstruct their job from: `shared_definitions`, as loading the code
    location every time would cost each step seconds, twice (Dagster reconstructs it twice)."""
    return shared_definitions()
