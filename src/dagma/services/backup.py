"""Back up and restore a services-mode lab: its Postgres databases (pg_dump's custom format),
MLflow's artifacts, the vectors and the executed notebooks, in the archive `dagma backup` writes.

A backup counts the tables a lab cannot lose inside the very snapshot pg_dump then dumps, so
the counts match the dump even while runs write. A restore builds the whole home (files, a new
cluster with new role passwords, each database restored owned by its role, the old home's paths
moved to the new one, the counts compared with the backup's) in a temporary folder beside the
target, stops that cluster, and only then renames the folder into place: a restore that fails
leaves nothing, and the leftovers of a killed one are removed by the next restore.

MLflow's users and their password hashes (the `mlflow_auth` database) are never backed up or
restored: the restored lab's MLflow creates its admin from this home's password on first start.
Signing and the parts a restore takes are as in `dagma.backup`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess  # nosec B404 # we run argv lists we build, never a shell
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

from dagma.backup import (
    FORMAT,
    BackupError,
    Report,
    archive_path,
    check_target,
    copy_collections,
    copy_tree,
    rehome_text,
    signing_key,
    unpack_verified,
    write_archive,
)
from dagma.lib.run_folder import RunFolder
from dagma.lib.staging import abandoned, staging_folder
from dagma.services import postgres
from dagma.services.config import LOOPBACK, ServicesConfig
from dagma.services.procs import MARKER, ServiceError, marked_pids, terminate
from dagma.services.supervisor import Topology
from dagma.settings import Settings

# Copied as files; the vector collections are copied apart, each under its writer lock.
FILES = ("mlflow/artifacts", "runs", "reports", "dagster-services/storage")
# The folders a restore takes from an archive; the rest of the home is regenerated.
PARTS = (*FILES, "qdrant", "postgres")
# Dumped and restored; not `mlflow_auth`, whose users and password hashes stay with their lab.
DUMPED = ("dagster", "mlflow")
# What a restore must bring back, counted at backup and again after pg_restore.
COUNTED = {"dagster": ("runs", "event_logs"), "mlflow": ("runs", "metrics", "model_versions")}
# A restore's temporary folder (beside the target home) holds this lock while the restore runs.
RESTORE_PREFIX = ".dagma-restore-"


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


def _run(argv: list[str], password: str, what: str, marker: Path | None = None) -> None:
    """Run a Postgres client tool; `marker` tags it as one of that home's processes."""
    env = {**os.environ, "PGPASSWORD": password, "PGCONNECT_TIMEOUT": "10"}
    if marker is not None:
        env[MARKER] = str(marker)
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)  # nosec B603
    if done.returncode != 0:
        raise BackupError(f"{what} failed: {(done.stderr or done.stdout).strip()[-600:]}")


def _connect(config: ServicesConfig, password: str, db: str, autocommit: bool = False) -> Any:
    import psycopg

    return psycopg.connect(
        host=LOOPBACK,
        port=config.dagma_pg_port,
        user="postgres",
        password=password,
        dbname=db,
        connect_timeout=10,
        autocommit=autocommit,
    )


def _count(conn: Any, db: str) -> dict[str, int]:
    found = {}
    for table in COUNTED.get(db, ()):
        row = conn.execute(f'SELECT count(*) FROM "{table}"').fetchone()  # nosec B608
        found[f"{db}.{table}"] = int(row[0]) if row else 0
    return found


def counts(config: ServicesConfig, password: str) -> dict[str, int]:
    """Rows of the tables a lab cannot lose, e.g. {"dagster.runs": 12, "mlflow.runs": 7}."""
    found = {}
    for db in COUNTED:
        with _connect(config, password, db) as conn:
            found.update(_count(conn, db))
    return found


def _dump(config: ServicesConfig, password: str, db: str, target: Path) -> dict[str, int]:
    """pg_dump `db` and count its tables in one snapshot: the counts describe the dump exactly,
    whatever runs write meanwhile. The exporting transaction stays open until pg_dump is done."""
    with _connect(config, password, db, autocommit=True) as conn:
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        row = conn.execute("SELECT pg_export_snapshot()").fetchone()
        assert row is not None  # nosec B101 # a SELECT of a function returns one row
        found = _count(conn, db)
        argv = _pg(config, "pg_dump", "-Fc", f"--snapshot={row[0]}", "-d", db, "-f", str(target))
        _run(argv, password, f"pg_dump of database {db!r}")
        conn.execute("ROLLBACK")
    return found


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
        recorded: dict[str, int] = {}
        for db in DUMPED:
            try:
                recorded.update(_dump(config, password, db, staging / "postgres" / f"{db}.dump"))
            except BackupError as exc:
                raise BackupError(
                    f"{exc}\nNothing was written. See `dagma services logs postgres`, then back "
                    "up again."
                ) from exc
        for part in FILES:
            if (config.home / part).is_dir():
                copy_tree(config.home / part, staging / part)
        collections = copy_collections(EmbeddedStore(config.home / "qdrant"), staging / "qdrant")
        manifest = {
            "format": FORMAT,
            "mode": "services",
            "created": stamp,
            "home": str(config.home),
            "collections": collections,
            "databases": list(DUMPED),
            "counts": recorded,
        }
        key = signing_key(Settings())
        files = write_archive(staging, manifest, archive, key)
    seconds = time.perf_counter() - started
    return Report(archive, files, archive.stat().st_size, seconds, collections, key is not None)


def rehome_databases(config: ServicesConfig, password: str, old: str, new: str) -> int:
    """Move the paths under the old home in every text and JSON column of the restored
    databases (Dagster's events name executed notebooks and stored outputs); cells changed."""
    from psycopg import sql

    if old == new:
        return 0
    changed = 0
    for db in DUMPED:
        with _connect(config, password, db) as conn:  # one transaction per database
            columns = conn.execute(
                "SELECT c.table_schema, c.table_name, c.column_name "
                "FROM information_schema.columns c JOIN information_schema.tables t "
                "USING (table_schema, table_name) WHERE t.table_type = 'BASE TABLE' "
                "AND c.table_schema NOT IN ('pg_catalog', 'information_schema') "
                "AND c.data_type IN ('text', 'character varying', 'json', 'jsonb')"
            ).fetchall()
            for schema, table, column in columns:
                names = {"t": sql.Identifier(schema, table), "c": sql.Identifier(column)}
                select = sql.SQL(
                    "SELECT ctid::text, {c}::text FROM {t} WHERE strpos({c}::text, %s) > 0"
                ).format(**names)
                rows: dict[str, str] = {}
                for needle in dict.fromkeys((old, quote(old))):
                    rows.update(conn.execute(select, (needle,)).fetchall())
                moved = [(rehome_text(v, old, new), ctid) for ctid, v in rows.items()]
                moved = [(value, ctid) for value, ctid in moved if value != rows[ctid]]
                if moved:
                    update = sql.SQL("UPDATE {t} SET {c} = %s WHERE ctid = %s::tid").format(**names)
                    with conn.cursor() as cursor:
                        cursor.executemany(update, moved)
                    changed += len(moved)
    return changed


@contextmanager
def _restore_folder(parent: Path) -> Iterator[Path]:
    """A new temporary folder beside the target home, locked while this restore runs and
    removed when it ends; a killed restore's folder is found by its free lock."""
    with staging_folder(parent, RESTORE_PREFIX) as tmp:
        try:
            yield tmp
        finally:
            _stop(tmp)


def _stop(tmp: Path) -> list[int]:
    """Stop what a restore started in `tmp` (its Postgres, pg_restore)."""
    pids = marked_pids(str(tmp / "home"))
    if pids:
        terminate(pids, sig=signal.SIGINT, timeout=20)  # SIGINT: Postgres' fast shutdown
    return pids


def sweep_killed_restores(parent: Path, progress: Callable[[str], None] = print) -> list[Path]:
    """Remove the folders (and stop the Postgres) of restores into `parent` that were killed,
    embedded or services: their lock is free. A running restore holds its lock."""
    removed = []
    for tmp in abandoned(parent, RESTORE_PREFIX):
        pids = _stop(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        progress(
            f"removed {tmp}, left by a restore that was killed"
            + (f" (stopped its processes {pids})" if pids else "")
        )
        removed.append(tmp)
    return removed


def _relocated(config: ServicesConfig, home: Path) -> ServicesConfig:
    """`config` with another DAGMA_HOME (same ports and passwords)."""
    return ServicesConfig(**{**config.model_dump(), "dagma_home": home})


def _build(
    config: ServicesConfig,
    staging: Path,
    manifest: dict[str, Any],
    home: Path,
    archive: Path,
    progress: Callable[[str], None],
) -> dict[str, int]:
    """Build the restored lab at `config.home`: files, a new cluster, every database, the
    paths moved to `home`, the counts checked; its Postgres is stopped however this ends."""
    building = config.home
    for part in staging.iterdir():
        if part.name != "postgres":
            shutil.move(str(part), building / part.name)
    topology = Topology(config)
    try:
        topology.up(progress, only={"postgres"})
        password = config.passwords()["postgres"]
        for db in DUMPED:
            argv = _pg(
                config,
                "pg_restore",
                "--no-owner",
                "--no-privileges",
                "--no-comments",
                f"--role={postgres.DATABASES[db]}",
                "--exit-on-error",
                "-d",
                db,
                str(staging / "postgres" / f"{db}.dump"),
            )
            _run(argv, password, f"pg_restore of database {db!r} from {archive}", building)
            progress(f"postgres: restored {db}")
        moved = rehome_databases(config, password, manifest["home"], str(home))
        progress(f"postgres: moved {moved} path(s) from {manifest['home']} to {home}")
        for folder in RunFolder.every(building / "runs"):
            folder.rehome(manifest["home"], str(home))
        restored = counts(config, password)
    finally:
        topology.down(progress=lambda _: None)
    if restored != manifest["counts"]:
        differ = {
            k: (manifest["counts"].get(k), restored.get(k))
            for k in sorted(set(restored) | set(manifest["counts"]))
            if restored.get(k) != manifest["counts"].get(k)
        }
        raise BackupError(
            f"the databases restored from {archive} differ from the backup "
            f"(table: rows at backup, rows restored): {differ}"
        )
    return restored


def restore(
    config: ServicesConfig, archive: Path, progress: Callable[[str], None] = print
) -> tuple[Report, dict[str, int]]:
    """Restore into an empty DAGMA_HOME: the whole lab is built and checked in a temporary
    folder beside it, its cluster stopped, then renamed into place. On any error nothing is
    left: no home, no temporary folder, no Postgres."""
    import psycopg

    started = time.perf_counter()
    home = config.home
    archive = check_target(archive, home)
    home.parent.mkdir(parents=True, exist_ok=True)
    key = signing_key(Settings())
    sweep_killed_restores(home.parent, progress)
    with _restore_folder(home.parent) as tmp:
        staging, manifest, checked = unpack_verified(archive, tmp, key, "services", PARTS)
        progress(checked)
        missing = [db for db in DUMPED if db not in manifest["databases"]]
        if missing:
            raise BackupError(f"{archive} holds no dump of {missing}; use another backup.")
        if "mlflow_auth" in manifest["databases"]:
            progress(
                f"note: MLflow's users in {archive} (an older backup) are not restored: the "
                "restored MLflow creates its admin with this home's password; add other users "
                "again (docs/production.md)."
            )
        staging.chmod(0o700)  # the dumps: readable by us alone, whatever `tmp` allows
        try:
            if postgres.os_user(config.dagma_pg_os_user):
                tmp.chmod(0o711)  # Postgres runs unprivileged and must traverse to its folder
            building = _relocated(config, tmp / "home")
            building.home.mkdir()
            restored = _build(building, staging, manifest, home, archive, progress)
            try:
                os.rename(building.home, home)  # replaces an empty folder, refuses a filled one
            except OSError as exc:
                raise BackupError(
                    f"DAGMA_HOME={home} was filled while the restore ran ({exc.strerror}); "
                    "restore into an empty folder."
                ) from exc
        except (BackupError, ServiceError, OSError, psycopg.Error) as exc:
            raise BackupError(
                f"{exc}\nNothing was restored: {home} is as it was. Fix what is named above "
                "(or use another backup), then run the restore again."
            ) from exc
    report = Report(
        archive,
        len(manifest["files"]),
        archive.stat().st_size,
        time.perf_counter() - started,
        manifest["collections"],
        key is not None,
    )
    return report, restored
