"""`dagma backup` then `dagma restore` into an empty home brings back runs, models and vectors."""

import gzip
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import dagster as dg
import mlflow
import numpy as np
import pytest
from typer.testing import CliRunner

from dagma.cli import app
from dagma.lib.vectors import EmbeddedStore
from dagma.settings import Settings

pytestmark = pytest.mark.integration
runner = CliRunner()


def run_ids(dagster_home: Path) -> set[str]:
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        return {r.run_id for r in instance.get_runs()}


def mlflow_runs(settings: Settings) -> dict[str, str]:
    client = mlflow.MlflowClient(settings.tracking_uri)
    experiment = client.get_experiment_by_name(settings.dagma_experiment)
    return {
        r.info.run_id: r.info.artifact_uri for r in client.search_runs([experiment.experiment_id])
    }


def said(result) -> str:
    """The command's output on one line (paths are never wrapped: soft_wrap)."""
    return " ".join(result.output.split())


def cli(home: Path, *args: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DAGMA_HOME", str(home))
    for name in ("DAGSTER_HOME", "MLFLOW_TRACKING_URI"):  # the demo run exported its own
        monkeypatch.delenv(name, raising=False)
    return runner.invoke(app, list(args))


@pytest.fixture(scope="module")
def archive(demo, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("backup") / "lab.tar.gz"
    result = runner.invoke(app, ["backup", str(path)])
    assert result.exit_code == 0, result.output
    assert "Backed up" in said(result) and "dagma restore" in said(result)
    return path


@pytest.mark.parametrize("name", ["restored", "my restored lab"])
def test_restore_into_an_empty_home_brings_back_runs_models_and_vectors(
    demo, archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
):
    from urllib.parse import quote

    settings, run = demo
    home = tmp_path / name
    result = cli(home, "restore", str(archive), monkeypatch=monkeypatch)
    assert result.exit_code == 0, result.output
    restored = Settings()
    assert restored.home == home.resolve()

    assert run_ids(home / "dagster") == run_ids(settings.dagster_dir)

    before, after = mlflow_runs(settings), mlflow_runs(restored)
    assert before.keys() == after.keys()
    # MLflow's artifact URIs are percent-encoded: a home with a space is found in them too.
    assert all(uri.startswith(f"file://{quote(str(restored.home))}/") for uri in after.values())
    version = run.values["wine_model"]["model_version"]
    mlflow.set_tracking_uri(restored.tracking_uri)
    model = mlflow.sklearn.load_model(f"models:/dagma-wine/{version}")
    from dagma.lib.data import load_wine

    features = load_wine().drop(columns=["target"]).head(5)
    original = mlflow.sklearn.load_model(run.values["wine_model"]["model_uri"])
    assert (model.predict(features) == original.predict(features)).all()

    old, new = EmbeddedStore(settings.qdrant_path), EmbeddedStore(restored.qdrant_path)
    collection = settings.dagma_collection
    assert new.current_version(collection) == old.current_version(collection)
    query = np.random.default_rng(0).standard_normal(old.current_version(collection).dim)
    assert new.search(collection, query, k=5) == old.search(collection, query, k=5)

    # Judged at the same moment as the original: a new hour since the demo makes its latest
    # hourly partition missing in both labs alike.
    def stale(lab_home: Path) -> set[str]:
        report = json.loads(cli(lab_home, "status", "--json", monkeypatch=monkeypatch).output)
        return {a["key"] for a in report["assets"] if a["stale"]}

    assert stale(home) == stale(settings.home)


def test_restore_refuses_a_home_that_is_not_empty(
    archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    home = tmp_path / "busy"
    home.mkdir()
    (home / "keep.txt").write_text("mine")
    result = cli(home, "restore", str(archive), monkeypatch=monkeypatch)
    assert result.exit_code == 2
    assert f"DAGMA_HOME={home} is not empty" in said(result)
    assert [p.name for p in home.iterdir()] == ["keep.txt"]


def test_a_damaged_or_foreign_archive_restores_nothing(
    archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    damaged = tmp_path / "damaged.tar.gz"
    with tarfile.open(archive) as src, tarfile.open(damaged, "w:gz") as dst:
        changed = False
        for member in src.getmembers():
            data = src.extractfile(member).read() if member.isfile() else None
            if data and not changed and member.name.endswith(".db"):
                data, changed = data[:-1] + bytes([data[-1] ^ 1]), True
            dst.addfile(member, io.BytesIO(data) if data is not None else None)
    assert changed
    home = tmp_path / "home"
    result = cli(home, "restore", str(damaged), monkeypatch=monkeypatch)
    assert result.exit_code == 2 and "is damaged: 1 file(s) missing or changed" in said(result)
    assert not home.exists()

    foreign = tmp_path / "foreign.tar.gz"
    foreign.write_bytes(gzip.compress(b"not a tar"))
    result = cli(home, "restore", str(foreign), monkeypatch=monkeypatch)
    assert result.exit_code == 2 and "cannot be read" in said(result)
    assert not home.exists()


def test_a_dagster_home_outside_the_lab_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("DAGMA_HOME", str(tmp_path / "lab"))
    result = runner.invoke(app, ["backup", str(tmp_path / "x.tar.gz")])
    assert result.exit_code == 2 and "DAGSTER_HOME points outside DAGMA_HOME=" in said(result)


def test_backup_of_an_empty_home_or_during_a_publish_is_refused(
    demo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    settings, _ = demo
    result = cli(tmp_path / "empty", "backup", str(tmp_path / "x.tar.gz"), monkeypatch=monkeypatch)
    assert result.exit_code == 2 and "holds no lab. Run `make demo` first" in said(result)

    with EmbeddedStore(settings.qdrant_path).held(settings.dagma_collection):
        result = cli(settings.home, "backup", str(tmp_path / "y.tar.gz"), monkeypatch=monkeypatch)
    assert result.exit_code == 2 and "is being published right now" in said(result)
    assert not (tmp_path / "y.tar.gz").exists()


@pytest.mark.parametrize(
    ("text", "moved"),
    [
        ("/data/x.csv", "/srv/new lab/x.csv"),
        ("/database/x.csv", "/database/x.csv"),  # another folder that starts with the name
        ("/x/data/y", "/x/data/y"),  # the name deeper in another path
        ("file:///data/mlflow/artifacts/1", "file:///srv/new%20lab/mlflow/artifacts/1"),
        ("sqlite:////data/mlflow/mlflow.db", "sqlite:////srv/new lab/mlflow/mlflow.db"),
        ('{"path": "/data/runs/a.ipynb", "n": 1}', '{"path": "/srv/new lab/runs/a.ipynb", "n": 1}'),
        ("/data", "/srv/new lab"),
    ],
)
def test_restore_moves_whole_path_components_only(text: str, moved: str):
    from dagma.backup import rehome_text

    assert rehome_text(text, "/data", "/srv/new lab") == moved


def test_an_old_home_with_a_space_moves_in_percent_encoded_uris_too(tmp_path: Path):
    import sqlite3

    from dagma.backup import rehome_sqlite

    database = tmp_path / "mlflow.db"
    with sqlite3.connect(database) as db:
        db.execute("CREATE TABLE runs (id INTEGER, artifact_uri TEXT, other TEXT)")
        db.execute(
            "INSERT INTO runs VALUES (1, 'file:///old%20home/mlflow/artifacts/1', '/old home/x')"
        )
        db.execute("INSERT INTO runs VALUES (2, 'file:///old%20homework/a', '/old homework/x')")
    assert rehome_sqlite(database, "/old home", "/new") == 2  # two cells of the first row
    with sqlite3.connect(database) as db:
        rows = db.execute("SELECT artifact_uri, other FROM runs ORDER BY id").fetchall()
    assert rows == [
        ("file:///new/mlflow/artifacts/1", "/new/x"),
        ("file:///old%20homework/a", "/old homework/x"),
    ]


def test_the_archive_is_owner_only_and_backups_are_git_ignored(archive: Path):
    import stat
    import subprocess

    from dagma.settings import PROJECT_ROOT

    assert stat.S_IMODE(archive.stat().st_mode) == 0o600
    names = ["dagma-backup-20261202T000000Z.tar.gz", "lab.tar.gz.partial", ".dagma-restore-x/a"]
    ignored = subprocess.run(
        ["git", "-C", str(PROJECT_ROOT), "check-ignore", "--no-index", *names],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ignored.stdout.split() == names


# --- Restore trusts only data ---------------------------------------------------------------

KEY = "backup-key-for-tests-0123456789"  # pragma: allowlist secret
OTHER_KEY = "another-key-for-tests-987654321"  # pragma: allowlist secret


@pytest.fixture
def tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A new lab (its instance config) with one executed notebook's report."""
    home = tmp_path / "lab"
    monkeypatch.setenv("DAGMA_HOME", str(home))
    for name in ("DAGSTER_HOME", "MLFLOW_TRACKING_URI", "DAGMA_QDRANT_PATH", "DAGMA_BACKUP_KEY"):
        monkeypatch.delenv(name, raising=False)
    Settings().ensure_dirs()
    (home / "runs" / "r1").mkdir(parents=True)
    (home / "runs" / "r1" / "report.html").write_text("<p>the report</p>")
    return home


def backup_of(home: Path, path: Path, monkeypatch: pytest.MonkeyPatch, key: str | None) -> Path:
    with monkeypatch.context() as env:
        if key:
            env.setenv("DAGMA_BACKUP_KEY", key)
        result = cli(home, "backup", str(path), monkeypatch=env)
    assert result.exit_code == 0, result.output
    return path


def forged(archive: Path, out: Path, change, key: str | None = None) -> Path:
    """`archive` changed by `change(lab folder)` and packed again with checksums that match, as
    someone without the key would: the old signature is kept, or `key` signs it anew."""
    from dagma.backup import write_archive

    unpacked = out.with_suffix(".unpacked")
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(unpacked, filter="data")
    staging = unpacked / "lab"
    manifest = json.loads((staging / "manifest.json").read_text())
    (staging / "manifest.json").unlink()
    signature = staging / "manifest.sig"
    old = signature.read_bytes() if signature.exists() else None
    signature.unlink(missing_ok=True)
    del manifest["files"]
    change(staging)
    write_archive(staging, manifest, out, *([key.encode()] if key else []))
    if old is not None and key is None:
        with tarfile.open(out, "r:gz") as tar, tarfile.open(out.with_suffix(".x"), "w:gz") as new:
            for member in tar.getmembers():
                new.addfile(member, tar.extractfile(member) if member.isfile() else None)
            info = tarfile.TarInfo("lab/manifest.sig")
            info.size = len(old)
            new.addfile(info, io.BytesIO(old))
        out.with_suffix(".x").rename(out)
    return out


def restore_into(home: Path, archive: Path, monkeypatch: pytest.MonkeyPatch, key: str | None):
    with monkeypatch.context() as env:
        if key:
            env.setenv("DAGMA_BACKUP_KEY", key)
        return cli(home, "restore", str(archive), monkeypatch=env)


def test_restore_writes_dagster_yaml_afresh_and_never_takes_the_archives(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """dagster.yaml names modules and classes that Dagster imports: an archive's copy is code."""
    fresh = (tiny / "dagster" / "dagster.yaml").read_text()
    archive = backup_of(tiny, tmp_path / "lab.tar.gz", monkeypatch, None)
    evil = "run_launcher:\n  module: evil_module\n  class: Evil\n"

    def plant(lab: Path) -> None:
        (lab / "dagster" / "dagster.yaml").write_text(evil)
        (lab / "dagster" / "workspace.yaml").write_text("load_from:\n  - python_module: evil\n")

    changed = forged(archive, tmp_path / "changed.tar.gz", plant)
    home = tmp_path / "restored"
    result = restore_into(home, changed, monkeypatch, None)
    assert result.exit_code == 0, result.output
    assert (home / "dagster" / "dagster.yaml").read_text() == fresh
    assert not (home / "dagster" / "workspace.yaml").exists()
    assert "dagster/dagster.yaml, dagster/workspace.yaml in" in said(result)
    assert "were not restored" in said(result)
    assert (home / "runs" / "r1" / "report.html").read_text() == "<p>the report</p>"


def _symlink(lab: Path) -> None:
    (lab / "runs" / "r1" / "link.html").symlink_to("report.html")


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda lab: (lab / ".env").write_text("MLFLOW_TRACKING_URI=x\n"), "lab/.env"),
        (
            lambda lab: (
                (lab / "services").mkdir() or (lab / "services/secrets.json").write_text("{}")
            ),
            "lab/services",
        ),
        (_symlink, "lab/runs/r1/link.html"),
    ],
    ids=["env-file", "services-secrets", "symlink"],
)
def test_an_archive_with_what_no_backup_writes_restores_nothing(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change, named: str
):
    archive = backup_of(tiny, tmp_path / "lab.tar.gz", monkeypatch, None)
    changed = forged(archive, tmp_path / "changed.tar.gz", change)
    home = tmp_path / "restored"
    result = restore_into(home, changed, monkeypatch, None)
    assert result.exit_code == 2, result.output
    assert f"{changed} holds {named}" in said(result) and "which no Dagma backup writes" in said(
        result
    )
    assert not home.exists()


def test_a_member_whose_path_climbs_out_of_its_folder_is_refused(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """`lab/runs/../.env` starts in runs/ but unpacks beside it, where no backup writes."""
    import hashlib

    archive = backup_of(tiny, tmp_path / "lab.tar.gz", monkeypatch, None)
    data = b"MLFLOW_TRACKING_URI=http://elsewhere\n"
    changed = tmp_path / "changed.tar.gz"
    with tarfile.open(archive, "r:gz") as src, tarfile.open(changed, "w:gz") as dst:
        for member in src.getmembers():
            content = src.extractfile(member).read() if member.isfile() else None
            if member.name == "lab/manifest.json":
                manifest = json.loads(content)
                manifest["files"][".env"] = hashlib.sha256(data).hexdigest()
                content = json.dumps(manifest).encode()
                member.size = len(content)
            dst.addfile(member, io.BytesIO(content) if content is not None else None)
        climber = tarfile.TarInfo("lab/runs/../.env")
        climber.size = len(data)
        dst.addfile(climber, io.BytesIO(data))
    home = tmp_path / "restored"
    result = restore_into(home, changed, monkeypatch, None)
    assert result.exit_code == 2, result.output
    assert f"{changed} holds lab/runs/../.env, which no Dagma backup writes" in said(result)
    assert not home.exists()


def test_a_signed_archive_restores_with_its_key_and_is_refused_once_changed(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    archive = backup_of(tiny, tmp_path / "lab.tar.gz", monkeypatch, KEY)
    with tarfile.open(archive, "r:gz") as tar:
        assert "lab/manifest.sig" in tar.getnames()
    good = restore_into(tmp_path / "good", archive, monkeypatch, KEY)
    assert good.exit_code == 0, good.output
    assert f"{archive}: signature checked with DAGMA_BACKUP_KEY" in said(good)

    def swap_report(lab: Path) -> None:
        (lab / "runs" / "r1" / "report.html").write_text("<script>steal()</script>")

    home = tmp_path / "restored"
    changed = forged(archive, tmp_path / "changed.tar.gz", swap_report)  # checksums match
    resigned = forged(archive, tmp_path / "resigned.tar.gz", swap_report, key=OTHER_KEY)
    for bad in (changed, resigned):
        result = restore_into(home, bad, monkeypatch, KEY)
        assert result.exit_code == 2, result.output
        assert f"{bad}'s signature does not match DAGMA_BACKUP_KEY" in said(result)
        assert "Set DAGMA_BACKUP_KEY to the key the archive was signed with" in said(result)
        assert not home.exists()


def test_with_a_key_set_an_unsigned_archive_is_refused(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    archive = backup_of(tiny, tmp_path / "lab.tar.gz", monkeypatch, None)
    home = tmp_path / "restored"
    result = restore_into(home, archive, monkeypatch, KEY)
    assert result.exit_code == 2, result.output
    assert f"{archive} is not signed, and DAGMA_BACKUP_KEY is set" in said(result)
    assert not home.exists()


def test_without_a_key_restore_says_the_archive_was_not_checked(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    signed = backup_of(tiny, tmp_path / "signed.tar.gz", monkeypatch, KEY)
    result = restore_into(tmp_path / "a", signed, monkeypatch, None)
    assert result.exit_code == 0, result.output
    assert f"warning: {signed} is signed, but DAGMA_BACKUP_KEY is not set" in said(result)
    assert "signature was NOT checked" in said(result)

    unsigned = backup_of(tiny, tmp_path / "unsigned.tar.gz", monkeypatch, None)
    result = restore_into(tmp_path / "b", unsigned, monkeypatch, None)
    assert result.exit_code == 0, result.output
    assert f"note: {unsigned} is not signed: its checksums catch damage, not tampering" in said(
        result
    )


def test_a_short_backup_key_is_refused(tiny: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("DAGMA_BACKUP_KEY", "short")
    result = cli(tiny, "backup", str(tmp_path / "x.tar.gz"), monkeypatch=monkeypatch)
    assert result.exit_code == 2 and "DAGMA_BACKUP_KEY is 5 characters" in said(result)
    assert "secrets.token_urlsafe(32)" in said(result)
    assert not (tmp_path / "x.tar.gz").exists()


def test_the_next_restore_removes_what_a_killed_restore_left_and_keeps_a_running_ones(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A restore unpacks a whole copy of a lab beside the home; a killed one must not leave it."""
    from dagma.backup import RESTORE_PREFIX

    archive = backup_of(tiny, tmp_path / "lab.tar.gz", monkeypatch, None)
    holders = tmp_path / "homes"
    holders.mkdir()
    hold = (
        "import sys, time; from pathlib import Path; from dagma.lib.staging import staging_folder\n"
        f"with staging_folder(Path(sys.argv[1]), {RESTORE_PREFIX!r}) as tmp:\n"
        "    (tmp / 'lab').mkdir(); print(tmp, flush=True); time.sleep(120)\n"
    )
    killed, running = (
        subprocess.Popen(
            [sys.executable, "-c", hold, str(holders)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    )
    try:
        killed_dir, running_dir = (Path(p.stdout.readline().strip()) for p in (killed, running))
        killed.kill()
        killed.wait(10)
        assert killed_dir.is_dir()  # SIGKILL ran no cleanup
        result = restore_into(holders / "lab", archive, monkeypatch, None)
        assert result.exit_code == 0, result.output
        assert not killed_dir.exists()
        assert f"removed {killed_dir}, left by a restore that was killed" in said(result)
        assert running_dir.is_dir()  # its restore is still going
        assert sorted(p.name for p in holders.iterdir()) == sorted(["lab", running_dir.name])
    finally:
        for proc in (killed, running):
            proc.kill()
            proc.wait(10)
