"""Loading the project's Definitions for a run, and keeping them while nothing they read changed."""

from __future__ import annotations

from typing import Any

from dagma.settings import Settings, get_settings


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


def shared_definitions(settings: Settings | None = None, loaded: Any = None) -> Any:
    """The project's Definitions, loaded once per process while notebooks and environment stay
    (see `dagma.definitions.defs`). `loaded` was just loaded by the caller."""
    return loaded if loaded is not None else load_definitions(settings or get_settings())


def step_definitions() -> Any:
    """What step processes reconstruct their job from: `shared_definitions`, as loading the code
    location every time would cost each step seconds, twice (Dagster reconstructs it twice)."""
    return shared_definitions()
