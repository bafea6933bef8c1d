"""`dagma gc` and the nightly gc: prune runs/, never what a current materialization links."""

import json
import os
import time
from pathlib import Path

import dagster as dg
import pytest
from typer.testing import CliRunner

from dagma.cli import app
from dagma.lab import load_definitions, materialize
from dagma.lib import retention
from dagma.lib.run_folder import RunFolder
from dagma.settings import get_settings
from tests.conftest import QUIET
from tests.notebooks.test_spec import write_nb


def folders(tmp_path: Path, spec: list[tuple[str, str, float]]) -> list[RunFolder]:
    made = []
    for run_id, notebook, mtime in spec:
        path = tmp_path / run_id / notebook
        path.mkdir(parents=True)
        (path / f"{notebook}.ipynb").write_text("{}")
        os.utime(path, (mtime, mtime))
        made.append(RunFolder.of(tmp_path, run_id, notebook))
    return made


def test_the_newest_per_notebook_and_every_protected_run_are_kept(tmp_path: Path):
    made = folders(
        tmp_path,
        [("r1", "a", 1), ("r2", "a", 2), ("r3", "a", 3), ("r1", "b", 1), ("r2", "b", 2)],
    )
    doomed = retention.to_delete(made, protected={"r1"}, keep=1)
    # a: r3 is the newest, r1 protected, so r2 goes; b: r2 is the newest, r1 protected.
    assert [(f.run_id, f.notebook) for f in doomed] == [("r2", "a")]
    assert retention.to_delete(made, protected=set(), keep=2) == [made[0]]
    with pytest.raises(ValueError, match="keep must be 0 or more"):
        retention.to_delete(made, protected=set(), keep=-1)


def test_removal_hides_each_folder_first_and_a_killed_gc_is_finished_next_time(tmp_path: Path):
    made = folders(tmp_path, [("r1", "a", 1), ("r1", "b", 1), ("r2", "a", 2)])
    leftover = tmp_path / f"{retention.TRASH_PREFIX}r0-a"  # what a killed gc leaves
    leftover.mkdir()
    (leftover / "x.ipynb").write_text("{}" * 10)
    freed = retention.remove([made[0]], tmp_path)
    assert freed > 0 and not leftover.exists()
    assert not (tmp_path / "r1" / "a").exists() and (tmp_path / "r1" / "b").is_dir()
    retention.remove([made[1]], tmp_path)
    assert not (tmp_path / "r1").exists()  # its last notebook gone, the run folder goes too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r2"]


@pytest.mark.integration
def test_gc_keeps_what_materializations_link_and_prunes_the_rest(lab: Path):
    write_nb(lab / "tick.ipynb", params="n: int = 1", body="print(n)")
    partitioned = 'asset = {"partitions": {"static": ["a", "b"]}}\npartition_key: str = ""'
    write_nb(lab / "part.ipynb", params=partitioned, body="print(partition_key)")
    settings = get_settings()
    runs = []
    for _ in range(3):
        run = materialize(settings, selection=["tick"], console=QUIET)
        assert run.success, run.error
        runs.append(run.run_id)
        time.sleep(0.05)  # distinct folder times
    job = load_definitions(settings).resolve_implicit_global_asset_job_def()
    parts = []
    with dg.DagsterInstance.get() as instance:
        for key in ("a", "b", "b"):
            result = job.execute_in_process(
                instance=instance, partition_key=key, asset_selection=[dg.AssetKey("part")]
            )
            assert result.success
            parts.append(result.run_id)
            time.sleep(0.05)

    dry = CliRunner().invoke(app, ["gc", "--keep", "0", "--dry-run", "--json"])
    assert dry.exit_code == 0, dry.output
    report = json.loads(dry.output)
    # Only runs no current materialization points at: the first two ticks, the first "b".
    expected = {f"{runs[0]}/tick", f"{runs[1]}/tick", f"{parts[1]}/part"}
    assert set(report["deleted"]) == expected
    assert all((settings.runs_dir / item).is_dir() for item in expected)  # a dry run deletes none

    done = CliRunner().invoke(app, ["gc", "--keep", "0"])
    assert done.exit_code == 0, done.output
    assert "Deleted 3 executed notebooks" in done.output
    left = {(f.run_id, f.notebook) for f in retention.run_folders(settings.runs_dir)}
    assert left == {(runs[2], "tick"), (parts[0], "part"), (parts[2], "part")}
    with dg.DagsterInstance.get() as instance:
        for key in ("tick", "part"):  # what the UI links still opens
            event = instance.get_latest_materialization_event(dg.AssetKey(key))
            assert Path(event.asset_materialization.metadata["executed_notebook"].value).is_file()


@pytest.mark.integration
def test_the_nightly_gc_job_prunes_by_the_same_policy(lab: Path, monkeypatch):
    write_nb(lab / "tick.ipynb", params="n: int = 1", body="print(n)")
    settings = get_settings()
    for _ in range(2):
        assert materialize(settings, selection=["tick"], console=QUIET).success
    monkeypatch.setenv("DAGMA_KEEP_RUNS", "0")
    definitions = load_definitions(get_settings())
    assert definitions.resolve_schedule_def("runs_gc_nightly").cron_schedule == "0 3 * * *"
    with dg.DagsterInstance.get() as instance:
        result = definitions.resolve_job_def("runs_gc").execute_in_process(instance=instance)
    assert result.success
    assert len([f for f in retention.run_folders(settings.runs_dir) if f.notebook == "tick"]) == 1
