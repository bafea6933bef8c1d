"""A services-mode restore takes only data: its signature and its parts are checked before a
cluster is started or a file of the archive is used."""

from __future__ import annotations

from pathlib import Path

import pytest

from dagma.backup import UntrustedArchiveError, write_archive
from dagma.services.backup import restore
from dagma.services.config import ServicesConfig
from dagma.services.procs import free_port

KEY = "backup-key-for-tests-0123456789"  # pragma: allowlist secret


def services_archive(tmp_path: Path, extra: dict[str, str], key: str | None) -> Path:
    """An archive as `dagma services backup` writes one, plus the files in `extra`."""
    number = len(list(tmp_path.glob("lab-*")))
    staging = tmp_path / f"staging-{number}" / "lab"
    for name, text in {
        "postgres/dagster.dump": "not a dump",
        "postgres/mlflow.dump": "not a dump",
        "runs/r1/report.html": "<p>the report</p>",
        **extra,
    }.items():
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        (staging / name).write_text(text)
    manifest = {
        "format": 1,
        "mode": "services",
        "created": "20261203T000000Z",
        "home": "/old/home",
        "collections": [],
        "databases": ["dagster", "mlflow"],
        "counts": {},
    }
    archive = tmp_path / f"lab-{number}.tar.gz"
    write_archive(staging, manifest, archive, key.encode() if key else None)
    return archive


def restored(tmp_path: Path, archive: Path, monkeypatch: pytest.MonkeyPatch, key: str | None):
    if key:
        monkeypatch.setenv("DAGMA_BACKUP_KEY", key)
    else:
        monkeypatch.delenv("DAGMA_BACKUP_KEY", raising=False)
    config = ServicesConfig(dagma_home=tmp_path / "home", dagma_pg_port=free_port())
    return restore(config, archive, progress=lambda _: None)


@pytest.mark.parametrize(
    "name",
    ["dagster-services/dagster.yaml", "services/secrets.json", "services/mlflow-auth.ini"],
)
def test_a_services_archive_with_config_in_it_is_refused_before_anything_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
):
    """A backup writes none of these: each names code to run or the passwords to use."""
    archive = services_archive(tmp_path, {name: "run_launcher: {module: evil}"}, None)
    with pytest.raises(UntrustedArchiveError) as refused:
        restored(tmp_path, archive, monkeypatch, None)
    folder = name.split("/")[0]  # named: the folder or the file, whichever comes first
    assert f"{archive} holds lab/{folder}" in str(refused.value)
    assert "which no Dagma backup writes" in str(refused.value)
    assert not (tmp_path / "home").exists()
    assert not list(tmp_path.glob(".dagma-restore-*"))


def test_a_services_archive_signed_with_another_key_or_unsigned_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """With DAGMA_BACKUP_KEY set, only archives it signed are restored (the live round trip in
    test_services_mode restores one that it signed)."""
    other = services_archive(tmp_path, {}, "another-key-for-tests-987654321")
    with pytest.raises(UntrustedArchiveError, match="signature does not match") as refused:
        restored(tmp_path, other, monkeypatch, KEY)
    assert str(other) in str(refused.value)
    unsigned = services_archive(tmp_path, {}, None)
    with pytest.raises(UntrustedArchiveError, match="is not signed, and DAGMA_BACKUP_KEY is set"):
        restored(tmp_path, unsigned, monkeypatch, KEY)
    assert not (tmp_path / "home").exists()
    assert not list(tmp_path.glob(".dagma-restore-*"))
