"""The Postgres cluster of services mode: binaries, initdb, roles and databases."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess  # nosec B404 # we run argv lists we build, never a shell
from pathlib import Path

from dagma.services.procs import ServiceError

DEBIAN_ROOT = Path("/usr/lib/postgresql")
APP_ROLES = ("dagster", "mlflow")
# Each database and the one role that owns it; MLflow's basic-auth users live apart from runs.
DATABASES = {"dagster": "dagster", "mlflow": "mlflow", "mlflow_auth": "mlflow"}


def find_bin_dir(explicit: Path | None = None, root: Path = DEBIAN_ROOT) -> Path:
    """The newest installed server major's bin folder (or DAGMA_PG_BIN)."""
    if explicit is not None:
        if not (explicit / "initdb").is_file():
            raise ServiceError(f"Postgres: no initdb in DAGMA_PG_BIN={explicit}.")
        return explicit
    majors = sorted(
        (int(p.name), p / "bin")
        for p in (root.iterdir() if root.is_dir() else [])
        if re.fullmatch(r"\d+", p.name) and (p / "bin" / "initdb").is_file()
    )
    if not majors:
        on_path = shutil.which("initdb")
        if on_path:
            return Path(on_path).parent
        raise ServiceError(
            f"Postgres: no server binaries in {root}/<major>/bin and no initdb on PATH. "
            "Fix: install postgresql (apt-get install postgresql), or set DAGMA_PG_BIN."
        )
    return majors[-1][1]


def os_user(name: str) -> str | None:
    """The user Postgres runs as: ourselves, unless we are root (Postgres refuses root)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(name)
    except KeyError as exc:
        raise ServiceError(
            f"Postgres cannot run as root and the user {name!r} does not exist. "
            "Fix: install postgresql (it creates the user) or set DAGMA_PG_OS_USER."
        ) from exc
    return name


def _chown_tree(path: Path, user: str) -> None:
    entry = pwd.getpwnam(user)
    for folder, _, files in os.walk(path):
        os.chown(folder, entry.pw_uid, entry.pw_gid)
        for name in files:
            os.chown(Path(folder) / name, entry.pw_uid, entry.pw_gid)


def initdb(bin_dir: Path, pg_dir: Path, superuser_password: str, user: str | None) -> bool:
    """Create the cluster in `pg_dir/data` once; returns True when it was created now."""
    data = pg_dir / "data"
    if (data / "PG_VERSION").is_file():
        return False
    pg_dir.mkdir(parents=True, exist_ok=True)
    if user:
        _chown_tree(pg_dir, user)
        reachable = subprocess.run(  # nosec B603, B607 # fixed argv; `test` from PATH
            ["test", "-w", str(pg_dir)], user=user, check=False
        )
        if reachable.returncode != 0:
            raise ServiceError(
                f"Postgres: user {user!r} cannot write {pg_dir}. Fix: make every parent folder "
                "traversable (chmod o+x), or set DAGMA_HOME elsewhere."
            )
    pwfile = pg_dir / ".pwfile"
    fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(superuser_password + "\n")
    if user:
        _chown_tree(pg_dir, user)
    try:
        done = subprocess.run(  # nosec B603 # argv built here, no shell
            [
                str(bin_dir / "initdb"),
                "-D",
                str(data),
                "--username=postgres",
                f"--pwfile={pwfile}",
                "--auth-host=scram-sha-256",
                "--auth-local=scram-sha-256",
                "--encoding=UTF8",
                "--no-instructions",
            ],
            capture_output=True,
            text=True,
            user=user,
            check=False,
        )
    finally:
        pwfile.unlink(missing_ok=True)
    if done.returncode != 0:
        shutil.rmtree(data, ignore_errors=True)
        raise ServiceError(f"Postgres: initdb failed:\n{done.stdout}{done.stderr}")
    # Loopback only, password auth only: replace the generated rules with two explicit ones.
    (data / "pg_hba.conf").write_text(
        "# dagma services mode: TCP on loopback, scram passwords, no unix socket.\n"
        "host all all 127.0.0.1/32 scram-sha-256\n"
    )
    return True


def server_argv(bin_dir: Path, pg_dir: Path, port: int) -> list[str]:
    return [
        str(bin_dir / "postgres"),
        "-D",
        str(pg_dir / "data"),
        "-p",
        str(port),
        "-c",
        "listen_addresses=127.0.0.1",
        "-c",
        "unix_socket_directories=",
        "-c",
        "password_encryption=scram-sha-256",
    ]


def isready_argv(bin_dir: Path, port: int) -> list[str]:
    return [str(bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port), "-t", "2"]


def bootstrap(port: int, passwords: dict[str, str]) -> None:
    """Least-privilege login roles, each owning only its own database; idempotent."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(
        host="127.0.0.1",
        port=port,
        user="postgres",
        password=passwords["postgres"],
        dbname="postgres",
        autocommit=True,
        connect_timeout=10,
    ) as conn:
        for role in APP_ROLES:
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
            verb = sql.SQL("ALTER" if exists else "CREATE")
            conn.execute(
                sql.SQL(
                    "{} ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION PASSWORD {}"
                ).format(verb, sql.Identifier(role), sql.Literal(passwords[role]))
            )
        for db, owner in DATABASES.items():
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,)).fetchone():
                conn.execute(
                    sql.SQL("CREATE DATABASE {} OWNER {}").format(
                        sql.Identifier(db), sql.Identifier(owner)
                    )
                )
        for db in (*DATABASES, "postgres", "template1"):
            conn.execute(
                sql.SQL("REVOKE CONNECT, TEMPORARY ON DATABASE {} FROM PUBLIC").format(
                    sql.Identifier(db)
                )
            )
        for db, owner in DATABASES.items():
            conn.execute(
                sql.SQL("GRANT CONNECT, TEMPORARY ON DATABASE {} TO {}").format(
                    sql.Identifier(db), sql.Identifier(owner)
                )
            )


def database_url(
    role: str, password: str, port: int, driver: str = "psycopg", db: str | None = None
) -> str:
    from urllib.parse import quote

    return f"postgresql+{driver}://{role}:{quote(password, safe='')}@127.0.0.1:{port}/{db or role}"
