"""Back up and restore a lab's embedded state: Dagster's runs, MLflow's runs and models, vectors.

A backup is one `.tar.gz` with a `manifest.json` of every file's sha256. SQLite databases are
copied with SQLite's online backup, so a lab in use is copied consistently; each vector
collection is copied while its writer lock is held. A restore checks every checksum before it
writes anything, goes only into an empty `DAGMA_HOME`, and rewrites the absolute paths that
MLflow and Dagster keep (artifact locations, executed notebooks) to the new home.

With `DAGMA_BACKUP_KEY` set, a backup signs its manifest (HMAC-SHA256, `manifest.sig`) and a
restore refuses an archive whose signature is missing or wrong. A restore takes only data:
files of the parts a backup writes, never `dagster.yaml` (regenerated), nothing else.

Longer than 450 lines because the archive format (manifest, signature, the parts it may hold)
sits beside the embedded backup and restore that write and read it.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import posixpath
import re
import shutil
import sqlite3
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from dagma.errors import DagmaError
from dagma.lib.run_folder import RunFolder
from dagma.lib.staging import abandoned, staging_folder
from dagma.settings import Settings

FORMAT = 1
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
PARTS = ("dagster", "mlflow", "qdrant", "runs", "reports")
# Configuration that names code to import: regenerated on restore, never taken from an archive.
REGENERATED = ("dagster/dagster.yaml", "dagster/workspace.yaml")
KEY_VARIABLE = "DAGMA_BACKUP_KEY"
# Restores unpack beside the home; `.dagma-restore-` alone is services mode's, whose sweep
# (which also stops a killed restore's Postgres) finds both.
RESTORE_PREFIX = ".dagma-restore-lab-"
MIN_KEY_LENGTH = 16


class BackupError(DagmaError, RuntimeError):
    """A backup or restore that cannot proceed; the message names the thing and the fix."""

    exit_code = 2


class UntrustedArchiveError(BackupError):
    """An archive whose signature is missing or wrong, or that holds what no backup writes."""


@dataclass
class Report:
    archive: Path
    files: int
    bytes: int
    seconds: float
    collections: list[str]
    signed: bool = False

    def summary(self, restore: str) -> str:
        """What was written, and the command (`restore`) that brings it back."""
        return (
            f"Backed up {self.files} files ({self.bytes / 1e6:.1f} MB, collections: "
            f"{', '.join(self.collections) or 'none'}) to {self.archive} in {self.seconds:.1f} s."
            + ("\nSigned with " if self.signed else "\nNot signed: no ")
            + f"{KEY_VARIABLE}.\nRestore with: DAGMA_HOME=<empty folder> {restore} {self.archive}"
        )


def signing_key(settings: Settings) -> bytes | None:
    """The key backups are signed and checked with (`DAGMA_BACKUP_KEY`), or None when unset."""
    secret = settings.dagma_backup_key.get_secret_value() if settings.dagma_backup_key else ""
    if not secret:
        return None
    if len(secret) < MIN_KEY_LENGTH:
        raise BackupError(
            f"{KEY_VARIABLE} is {len(secret)} characters; a signing key needs at least "
            f"{MIN_KEY_LENGTH}. Make one with: python -c 'import secrets; "
            "print(secrets.token_urlsafe(32))'"
        )
    return secret.encode()


def _signature(key: bytes, manifest: bytes) -> str:
    return "hmac-sha256:" + hmac.new(key, manifest, hashlib.sha256).hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_sqlite(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(16) == b"SQLite format 3\x00"


def _copy_sqlite(src: Path, dst: Path) -> None:
    """SQLite's online backup: a consistent copy even while another process writes."""
    with sqlite3.connect(f"file:{src}?mode=ro", uri=True) as source, sqlite3.connect(dst) as copy:
        source.backup(copy)


def copy_tree(src: Path, dst: Path) -> None:
    """`src` copied into `dst` as a backup holds it: SQLite databases through the online backup,
    without their -wal/-shm/-journal files and without writer locks."""
    for path in sorted(src.rglob("*")):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif path.name.endswith(("-wal", "-shm", "-journal")) or path.name == ".lock":
            continue  # folded into the database by the online backup, or runtime-only
        elif path.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            if path.suffix == ".db" and _is_sqlite(path):
                _copy_sqlite(path, target)
            else:
                shutil.copy2(path, target)


def _check_embedded(settings: Settings) -> None:
    if settings.tracking_uri.startswith(("http://", "https://")) or settings.qdrant_url:
        raise BackupError(
            "dagma backup copies the embedded state under DAGMA_HOME; this lab uses servers "
            f"(MLFLOW_TRACKING_URI={settings.tracking_uri}, QDRANT_URL={settings.qdrant_url}). "
            "For `dagma services up` labs use `dagma services backup`; back up other servers "
            "with their own tools (docs/production.md)."
        )
    places = (("DAGSTER_HOME", settings.dagster_dir), ("DAGMA_QDRANT_PATH", settings.qdrant_path))
    outside = [name for name, path in places if not path.is_relative_to(settings.home)]
    if outside:
        raise BackupError(
            f"{' and '.join(outside)} {'point' if len(outside) > 1 else 'points'} outside "
            f"DAGMA_HOME={settings.home}; unset {'them' if len(outside) > 1 else 'it'} so the "
            "whole lab lives under one folder."
        )


@contextlib.contextmanager
def _held(store: Any, collection: str) -> Iterator[Path]:
    from dagma.lib.vectors import VectorStoreError

    try:
        with store.held(collection) as folder:
            yield folder
    except VectorStoreError as exc:
        raise BackupError(
            f"collection {collection!r} is being published right now ({exc}). Run the backup "
            "again when that run has finished; nothing was written."
        ) from None


def backup(settings: Settings, archive: Path | None = None) -> Report:
    """Write the lab under `settings.home` to `archive` (default: a timestamped file here)."""
    from dagma.lib.vectors import EmbeddedStore

    started = time.perf_counter()
    _check_embedded(settings)
    home = settings.home
    if not (home / "dagster").is_dir() and not (home / "mlflow").is_dir():
        raise BackupError(f"nothing to back up: {home} holds no lab. Run `make demo` first.")
    archive, stamp = archive_path(archive)
    with tempfile.TemporaryDirectory(prefix="dagma-backup-") as tmp:
        staging = Path(tmp) / "lab"
        staging.mkdir()
        for part in ("dagster", "mlflow", "runs", "reports"):
            if (home / part).is_dir():
                copy_tree(home / part, staging / part)
        collections = copy_collections(EmbeddedStore(settings.qdrant_path), staging / "qdrant")
        manifest = {
            "format": FORMAT,
            "created": stamp,
            "home": str(home),
            "collections": collections,
        }
        key = signing_key(settings)
        files = write_archive(staging, manifest, archive, key)
    seconds = time.perf_counter() - started
    return Report(archive, files, archive.stat().st_size, seconds, collections, key is not None)


def archive_path(archive: Path | None) -> tuple[Path, str]:
    """Where the backup goes (refusing to overwrite), and its UTC timestamp."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    archive = (archive or Path(f"dagma-backup-{stamp}.tar.gz")).expanduser().resolve()
    if archive.exists():
        raise BackupError(f"{archive} exists already; choose another file or remove it.")
    return archive, stamp


def copy_collections(store: Any, target: Path) -> list[str]:
    """Each collection's current version, copied while its writer lock is held."""
    collections = []
    for info in store.collections():
        with _held(store, info.collection) as folder:
            current = (folder / "CURRENT").read_text().strip()
            copy_tree(folder / current, target / info.collection / current)
            shutil.copy2(folder / "CURRENT", target / info.collection / "CURRENT")
        collections.append(info.collection)
    return collections


def write_archive(
    staging: Path, manifest: dict[str, Any], archive: Path, key: bytes | None = None
) -> int:
    """Checksum every file of `staging` into the manifest, sign it with `key` if given, and pack
    it; returns the file count."""
    files = {
        str(p.relative_to(staging)): _sha256(p) for p in sorted(staging.rglob("*")) if p.is_file()
    }
    text = json.dumps({**manifest, "files": files}, indent=1).encode()
    (staging / MANIFEST).write_bytes(text)
    if key is not None:
        (staging / SIGNATURE).write_text(_signature(key, text) + "\n")
    partial = archive.with_name(archive.name + ".partial")
    partial.unlink(missing_ok=True)  # left by a backup that was killed
    # Owner-only from the first byte: the archive holds the lab's databases.
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz", compresslevel=1) as tar:
        tar.add(staging, arcname="lab")
    partial.rename(archive)  # a backup that stopped halfway never looks complete
    return len(files)


def _member(tar: tarfile.TarFile, name: str) -> bytes | None:
    try:
        member = tar.extractfile("lab/" + name)
    except KeyError:
        return None
    return None if member is None else member.read()


def _check_signature(text: bytes, signature: bytes | None, key: bytes | None, archive: Path) -> str:
    """Refuse an archive the key does not vouch for; returns what was checked, to tell the user."""
    if key is None:
        if signature is not None:
            return (
                f"warning: {archive} is signed, but {KEY_VARIABLE} is not set, so its signature "
                f"was NOT checked. Set {KEY_VARIABLE} on every machine that restores."
            )
        return (
            f"note: {archive} is not signed: its checksums catch damage, not tampering. Restore "
            f"only archives you made; set {KEY_VARIABLE} to sign and check them."
        )
    if signature is None:
        raise UntrustedArchiveError(
            f"{archive} is not signed, and {KEY_VARIABLE} is set, so only archives signed with "
            "it are restored; nothing was restored. Restore a backup written with "
            f"{KEY_VARIABLE} set; restore this one only if you made it, with {KEY_VARIABLE} unset."
        )
    if not hmac.compare_digest(signature.strip(), _signature(key, text).encode()):
        raise UntrustedArchiveError(
            f"{archive}'s signature does not match {KEY_VARIABLE}: it was changed after it was "
            f"signed, or signed with another key; nothing was restored. Set {KEY_VARIABLE} to "
            "the key the archive was signed with; if that is the key, do not restore it."
        )
    return f"{archive}: signature checked with {KEY_VARIABLE}."


def _read_manifest(tar: tarfile.TarFile, archive: Path, key: bytes | None) -> tuple[dict, str]:
    text = _member(tar, MANIFEST)
    if text is None:
        raise BackupError(f"{archive} is not a Dagma backup (no {MANIFEST}); pick another file.")
    checked = _check_signature(text, _member(tar, SIGNATURE), key, archive)
    manifest = json.loads(text)
    if manifest.get("format") != FORMAT:
        raise BackupError(
            f"{archive} has backup format {manifest.get('format')!r}; this Dagma reads {FORMAT}."
        )
    return manifest, checked


def rehome_text(text: str, old: str, new: str) -> str:
    """`text` with every path under `old` moved under `new`, whole path components only.

    A path counts where it starts a value, follows `file://`, `sqlite:///` or a non-path
    character (a quote in JSON, `=` in a URI), and ends at `/`, a quote, white space or the
    end: an old home `/data` moves `/data/x.csv` but not `/database/x.csv` or `/x/data/y`. The
    percent-encoded form MLflow writes in artifact URIs (`/my%20home`) moves too.
    """
    start = r"(?:(?<=file://)|(?<=sqlite:///)|(?<![\w./%~-]))"

    def moved(match: re.Match[str]) -> str:
        in_uri = match.string[: match.start()].endswith("file://") or match.group(0) != old
        return quote(new) if in_uri else new

    for before in dict.fromkeys((old, quote(old))):
        text = re.sub(start + re.escape(before) + r"(?=/|$|[\"'\s,}\]])", moved, text)
    return text


def rehome_sqlite(database: Path, old: str, new: str) -> int:
    """Move the paths under the old home in every text column of a SQLite file; cells changed."""
    changed = 0
    with sqlite3.connect(database) as db:
        db.execute("PRAGMA trusted_schema = OFF")  # an archive's triggers call no side effects
        tables = [
            r[0]
            for r in db.execute(
                "SELECT name FROM sqlite_master WHERE type='table' "
                "AND sql NOT LIKE '%WITHOUT ROWID%'"
            )
        ]
        for table in tables:
            columns = [r[1] for r in db.execute(f'PRAGMA table_info("{table}")')]  # nosec B608
            for column in columns:
                rows: dict[int, str] = {}
                for needle in {old, quote(old)}:
                    # Identifiers come from sqlite_master, values are bound parameters.
                    rows.update(
                        db.execute(
                            f'SELECT rowid, "{column}" FROM "{table}" '  # nosec B608
                            f"WHERE typeof(\"{column}\") = 'text' "
                            f'AND instr("{column}", ?) > 0',
                            (needle,),
                        ).fetchall()
                    )
                for rowid, value in rows.items():
                    moved = rehome_text(value, old, new)
                    if moved != value:
                        db.execute(
                            f'UPDATE "{table}" SET "{column}" = ? WHERE rowid = ?',  # nosec B608
                            (moved, rowid),
                        )
                        changed += 1
    return changed


def check_target(archive: Path, home: Path) -> Path:
    """The archive exists and the home it goes into is empty or missing."""
    archive = archive.expanduser().resolve()
    if not archive.is_file():
        raise BackupError(f"{archive} does not exist; pass the .tar.gz that `dagma backup` wrote.")
    if home.exists() and any(home.iterdir()):
        raise BackupError(
            f"DAGMA_HOME={home} is not empty; restore into an empty folder "
            "(e.g. DAGMA_HOME=/path/to/new dagma restore ...), so nothing there is overwritten."
        )
    return archive


def _unexpected(archive: Path, name: str) -> UntrustedArchiveError:
    return UntrustedArchiveError(
        f"{archive} holds {name}, which no Dagma backup writes; nothing was restored. It was "
        "changed by hand or by someone else: use a backup you made."
    )


def _check_members(tar: tarfile.TarFile, archive: Path, parts: tuple[str, ...]) -> None:
    """Plain files under `parts` and the manifest, and their folders: anything else is refused."""
    folders = {"lab/" + p.rsplit("/", i)[0] for p in parts for i in range(p.count("/") + 1)}
    for member in tar.getmembers():
        name = member.name
        if posixpath.normpath(name) != name:  # `lab/runs/../.env` would land outside the parts
            raise _unexpected(archive, name)
        under = any(name.startswith(f"lab/{part}/") or name == f"lab/{part}" for part in parts)
        if not (
            (member.isfile() and (under or name in (f"lab/{MANIFEST}", f"lab/{SIGNATURE}")))
            or (member.isdir() and (under or name in folders or name == "lab"))
        ):
            raise _unexpected(archive, name)


def unpack_verified(
    archive: Path, tmp: Path, key: bytes | None, mode: str, parts: tuple[str, ...]
) -> tuple[Path, dict[str, Any], str]:
    """Check the signature, the mode and that every member is a plain file under `parts` (the
    folders a backup writes), unpack into `tmp` and check every file against the manifest;
    returns (lab folder, manifest, what was checked of the signature)."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            manifest, checked = _read_manifest(tar, archive, key)
            found_mode = manifest.get("mode", "embedded")
            if found_mode != mode:
                command = {"embedded": "dagma restore", "services": "dagma services restore"}
                raise BackupError(
                    f"{archive} is a {found_mode}-mode backup; restore it with "
                    f"`{command.get(found_mode, found_mode)}`."
                )
            _check_members(tar, archive, parts)
            tar.extractall(tmp, filter="data")  # "data" refuses links and paths outside tmp
    except (tarfile.TarError, OSError, EOFError, json.JSONDecodeError) as exc:
        raise BackupError(
            f"{archive} cannot be read ({exc}); it is truncated or not a backup."
        ) from exc
    staging = tmp / "lab"
    found = {str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file()}
    found -= {MANIFEST, SIGNATURE}
    expected = manifest["files"]
    bad = sorted(set(expected) ^ found) + sorted(
        name for name in set(expected) & found if _sha256(staging / name) != expected[name]
    )
    if bad:
        raise BackupError(
            f"{archive} is damaged: {len(bad)} file(s) missing or changed, e.g. {bad[0]}. "
            "Nothing was restored; use another backup."
        )
    (staging / MANIFEST).unlink()
    (staging / SIGNATURE).unlink(missing_ok=True)
    return staging, manifest, checked


def restore(settings: Settings, archive: Path, progress: Callable[[str], None] = print) -> Report:
    """Restore `archive` into `settings.home`, which must be empty or missing."""
    started = time.perf_counter()
    _check_embedded(settings)
    home = settings.home
    archive = check_target(archive, home)
    key = signing_key(settings)
    home.parent.mkdir(parents=True, exist_ok=True)
    for left in abandoned(home.parent, RESTORE_PREFIX):  # a killed restore's copy of a lab
        shutil.rmtree(left, ignore_errors=True)
        progress(f"removed {left}, left by a restore that was killed")
    # Unpacked beside the home, so the final move is a rename on the same file system.
    with staging_folder(home.parent, RESTORE_PREFIX) as tmp:
        staging, manifest, checked = unpack_verified(archive, tmp, key, "embedded", PARTS)
        progress(checked)
        if any((staging / name).is_dir() for name in REGENERATED):
            raise _unexpected(archive, f"a folder named {' or '.join(REGENERATED)}")
        taken = {n: (staging / n).read_bytes() for n in REGENERATED if (staging / n).is_file()}
        for name in taken:
            (staging / name).unlink()
        # The same code that writes a new lab's instance config writes this one.
        Settings(dagma_home=staging, dagster_home=None, dagma_qdrant_path=None).ensure_dirs()
        fresh = {n: (staging / n).read_bytes() for n in REGENERATED if (staging / n).is_file()}
        changed = [name for name, text in taken.items() if fresh.get(name) != text]
        if changed:
            progress(
                f"note: {', '.join(changed)} in {archive} differ from a new lab's and were not "
                "restored (they name code to run); add your own settings there again by hand."
            )
        expected = manifest["files"]
        for database in staging.rglob("*.db"):
            if _is_sqlite(database):
                rehome_sqlite(database, manifest["home"], str(home))
        for folder in RunFolder.every(staging / "runs"):
            folder.rehome(manifest["home"], str(home))
        if home.exists():
            home.rmdir()
        shutil.move(str(staging), home)
    seconds, size = time.perf_counter() - started, archive.stat().st_size
    return Report(archive, len(expected), size, seconds, manifest["collections"], key is not None)
