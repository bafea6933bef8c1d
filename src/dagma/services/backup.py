"""Back up and restore a services-mode lab: its Postgres databases (pg_dump's custom format),
MLflow's artifacts, the vectors and the executed notebooks, in the archive `dagma backup` writes.

A restore goes into an empty DAGMA_HOME: a new cluster with new role passwords, each database
restored owned by its role, then the row counts compared with the ones recorded at backup.
"""

from __future__ import annotations

import shutil
import subprocess  # nosec B404 # we run argv lists we build, never a shell
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from dagma.backup import (
    FORMAT,
    BackupError,
    Report,
    _copy_tree,
    archive_path,
    check_target,
    copy_collections,
    unpack_verified,
    write_archive,
)
from dagma.services import postgres
from dagma.services.config import LOOPBACK, ServicesConfig
from dagma.services.supervisor import Topology

# Copied as files; the vector collections are copied apart, each under its writer lock.
FILES = ("mlflow/artifacts", "runs", "reports", "dagster-services/storage")
# What a restore must bring back, counted at backup and again after pg_restore.
COUNTED = {"dagster": ("runs", "event_logs"), "mlflow": ("runs", "metrics", "model_versions")}


def _pg(config: ServicesConfig, tool: str, *args: str) -> list[str]:
    bin_dir = postgres.find_bin_dir(config.dagma_pg_bin)
    return [
        str(bin_dir / tool),
        "-h",
        LOOPBACK,
        "-p",
        str(config.dagma_pg_port),
        "-U",
        "postgres",
        *args,
    ]


def _run(argv: list[str], password: str, what: str) -> None:
    import os

    env = {**os.environ, "PGPASSWORD": password, "PGCONNECT_TIMEOUT": "10"}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)  # nosec B603
    if done.returncode != 0:
        raise BackupError(f"{what} failed: {(done.stderr or done.stdout).strip()[-600:]}")


def counts(config: ServicesConfig, password: str) -> dict[str, int]:
    """Rows of the tables a lab cannot lose, e.g. {"dagster.runs": 12, "mlflow.runs": 7}."""
    import psycopg

    found = {}
    for db, tables in COUNTED.items():
        with psycopg.connect(
            host=LOOPBACK,
            port=config.dagma_pg_port,
            user="postgres",
            password=password,
            dbname=db,
            connect_timeout=10,
        ) as conn:
            for table in tables:
                row = conn.execute(f'SELECT count(*) FROM "{table}"').fetchone()  # nosec B608
                found[f"{db}.{table}"] = int(row[0]) if row else 0
    return found


def _reset_mlflow_admin(config: ServicesConfig) -> None:
    """The restored MLflow users keep their passwords, except the admin: it takes this home's
    password (DAGMA_MLFLOW_ADMIN_PASSWORD or secrets.json), which the pipelines log in with."""
    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

    from dagma.services.supervisor import MLFLOW_ADMIN

    passwords = config.passwords()
    url = postgres.database_url(
        "mlflow", passwords["mlflow"], config.dagma_pg_port, db="mlflow_auth"
    )
    store = SqlAlchemyStore()
    store.init_db(url)
    try:
        if store.has_user(MLFLOW_ADMIN, use_primary=True):
            store.update_user(MLFLOW_ADMIN, password=passwords["mlflow_admin"])
    finally:
        store.engine.dispose()


def _postgres_up(topology: Topology) -> bool:
    """Postgres's own health check only: pg_dump needs nothing else of the topology."""
    services = topology.services(topology.config.passwords())
    ok, _ = next(s for s in services if s.name == "postgres").check()
    return ok


def backup(config: ServicesConfig, archive: Path | None = None) -> Report:
    """Dump every database of the running services-mode Postgres and copy the lab's files."""
    from dagma.lib.vectors import EmbeddedStore

    started = time.perf_counter()
    topology = Topology(config)
    if not _postgres_up(topology):
        raise BackupError(
            f"the services-mode Postgres of {config.home} is not running; pg_dump needs it. "
            "Start it with `dagma services up`, then back up again."
        )
    password = config.passwords()["postgres"]
    archive, stamp = archive_path(archive)
    with tempfile.TemporaryDirectory(prefix="dagma-backup-") as tmp:
        staging = Path(tmp) / "lab"
        (staging / "postgres").mkdir(parents=True)
        recorded = counts(config, password)
        for db in postgres.DATABASES:
            dump = staging / "postgres" / f"{db}.dump"
            _run(
                _pg(config, "pg_dump", "-Fc", "-d", db, "-f", str(dump)), password, f"pg_dump {db}"
            )
        for part in FILES:
            if (config.home / part).is_dir():
                _copy_tree(config.home / part, staging / part)
        collections = copy_collections(EmbeddedStore(config.home / "qdrant"), staging / "qdrant")
        manifest = {
            "format": FORMAT,
            "mode": "services",
            "created": stamp,
            "home": str(config.home),
            "collections": collections,
            "databases": list(postgres.DATABASES),
            "counts": recorded,
        }
        files = write_archive(staging, manifest, archive)
    return Report(
        archive, files, archive.stat().st_size, time.perf_counter() - started, collections
    )


def restore(
    config: ServicesConfig, archive: Path, progress: Callable[[str], None] = print
) -> tuple[Report, dict[str, int]]:
    """Restore into an empty DAGMA_HOME: files, a new cluster, every database; then stop it."""
    started = time.perf_counter()
    home = config.home
    archive = check_target(archive, home)
    home.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".dagma-restore-", dir=home.parent) as tmp:
        staging, manifest = unpack_verified(archive, Path(tmp))
        if manifest.get("mode") != "services":
            raise BackupError(
                f"{archive} is an embedded-lab backup; restore it with `dagma restore`."
            )
        dumps = staging / "postgres"
        home.mkdir(exist_ok=True)
        for part in staging.iterdir():
            if part.name != "postgres":
                shutil.move(str(part), home / part.name)
        topology = Topology(config)
        try:
            topology.up(progress, only={"postgres"})
            password = config.passwords()["postgres"]
            for db in manifest["databases"]:
                owner = postgres.DATABASES[db]
                argv = _pg(
                    config,
                    "pg_restore",
                    "--no-owner",
                    "--no-privileges",
                    "--no-comments",
                    f"--role={owner}",
                    "--exit-on-error",
                    "-d",
                    db,
                    str(dumps / f"{db}.dump"),
                )
                _run(argv, password, f"pg_restore {db}")
                progress(f"postgres: restored {db}")
            _reset_mlflow_admin(config)
            restored = counts(config, password)
        finally:
            topology.down(progress=lambda _: None)
    if restored != manifest["counts"]:
        raise BackupError(
            f"the restored databases differ from the backup: {restored} != {manifest['counts']}"
        )
    report = Report(
        archive,
        len(manifest["files"]),
        archive.stat().st_size,
        time.perf_counter() - started,
        manifest["collections"],
    )
    return report, restored
