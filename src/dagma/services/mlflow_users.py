"""MLflow's read-only login: the `reader` user that the app signs in with.

MLflow's basic-auth app creates only its admin. This creates (or resets) the reader in the same
user store before the server starts, the way MLflow creates its admin, and refuses to when the
store's `default_permission` would let a plain user write. It imports only MLflow and
`dagma.errors`, so the MLflow image runs it as its entrypoint (compose.yaml, deploy/k8s):

    python -m dagma.services.mlflow_users -- mlflow server --app-name basic-auth ...
"""

from __future__ import annotations

import os
import sys

from dagma.errors import DagmaError

READER = "reader"
READ_ONLY = ("READ", "NO_PERMISSIONS")


class MlflowUsersError(DagmaError):
    """The reader cannot be made read-only, or a setting it needs is missing."""


def ensure_reader(
    database_uri: str, password: str, default_permission: str, username: str = READER
) -> bool:
    """Create `username` in the auth store at `database_uri`, or reset its password; never an
    admin. True when it was created. The user gets no grant of its own: it reads through
    `default_permission`, which must be READ or NO_PERMISSIONS."""
    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

    if default_permission.upper() not in READ_ONLY:
        raise MlflowUsersError(
            f"MLflow's basic_auth.ini has default_permission = {default_permission}, so the "
            f"{username!r} user could write. Fix: set default_permission = READ in the file "
            "MLFLOW_AUTH_CONFIG_PATH names (docker/mlflow/basic_auth.ini)."
        )
    if not password:
        raise MlflowUsersError(
            f"No password for MLflow's {username!r} user. Fix: set MLFLOW_READER_PASSWORD "
            "(compose: in .env; Kubernetes: the `mlflow` Secret's reader-password)."
        )
    store = SqlAlchemyStore()
    store.init_db(database_uri)
    if store.has_user(username, use_primary=True):
        store.update_user(username, password=password, is_admin=False)
        return False
    store.create_user(username, password, is_admin=False)
    return True


def main(argv: list[str] | None = None) -> None:
    """Ensure the reader from MLflow's auth config and MLFLOW_READER_PASSWORD, then exec the
    command after `--` (the MLflow server)."""
    from mlflow.server.auth.config import read_auth_config

    args = sys.argv[1:] if argv is None else argv
    command = args[args.index("--") + 1 :] if "--" in args else []
    config = read_auth_config()
    try:
        created = ensure_reader(
            config.database_uri,
            os.environ.get("MLFLOW_READER_PASSWORD", ""),
            config.default_permission,
            os.environ.get("MLFLOW_READER_USERNAME", READER),
        )
    except MlflowUsersError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    print(f"mlflow_users: reader {'created' if created else 'password set'}", file=sys.stderr)
    if command:
        os.execvp(command[0], command)  # nosec B606 - the container's own command, after `--`


if __name__ == "__main__":
    main()
