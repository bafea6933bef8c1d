"""Two process-wide changes to Dagster and papermill, so that runs of this process stay quiet
and never deadlock each other; each is applied once."""

from __future__ import annotations

from typing import Any


def no_logging_reconfiguration() -> None:
    """Stop Dagster from calling `logging.config.dictConfig` at each run's start when the
    instance configures no Python log handlers.

    dictConfig holds logging's module lock while it closes every handler, and a run going on in
    another thread holds a handler's lock while it logs, so two runs of one process deadlock
    (CPython #96727; seen here as a hung `dagma run -j 2`). It would also close the other
    run's handlers. A `python_logs: dagster_handler_config:` in dagster.yaml still applies.
    """
    from dagster._core.instance.methods.event_methods import EventMethods

    original = EventMethods.get_yaml_python_handlers
    if getattr(original, "_dagma_guard", False):
        return

    def get_yaml_python_handlers(self: Any) -> Any:
        if not self._instance.get_python_log_dagster_handler_config():
            return []
        return original(self)

    get_yaml_python_handlers._dagma_guard = True  # type: ignore[attr-defined]
    EventMethods.get_yaml_python_handlers = get_yaml_python_handlers  # type: ignore[method-assign]


def quiet_notebook_engines() -> None:
    """Keep dagstermill's papermill bar and its kernel's stderr off the lab's progress display.

    dagstermill calls papermill with its default tqdm bar and logs the kernel's output as
    papermill warnings; the executed notebook keeps all of it, and failures still reach the
    summary. Only calls for dagstermill's engine change.
    """
    import functools
    import logging
    import warnings

    import dagster as dg
    import papermill

    logging.getLogger("papermill").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=dg.BetaWarning)  # dagstermill's, at each step
    execute = papermill.execute_notebook
    if getattr(execute, "_dagma_quiet", False):
        return

    @functools.wraps(execute)
    def quiet(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("engine_name") == "dagstermill":
            kwargs.setdefault("progress_bar", False)
        return execute(*args, **kwargs)

    quiet._dagma_quiet = True  # type: ignore[attr-defined]
    papermill.execute_notebook = quiet
