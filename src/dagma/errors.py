"""The root of every error Dagma raises on purpose. Its message names the thing and the fix."""


class DagmaError(Exception):
    """An error the user can act on; the CLI prints its message and exits with `exit_code`."""

    exit_code = 1
