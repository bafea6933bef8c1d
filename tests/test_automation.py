"""The lab keeps itself fresh: the inbox sensor, the nightly retrain and notebook automation,
each through Dagster's own test utilities against a real (SQLite) lab instance and its
definitions loaded from the real notebooks."""

from __future__ import annotations

import importlib
import json
import os
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
from dagster._utils.schedules import cron_string_iterator

from dagma import lab
from dagma.defs.core import sensors as core_sensors
from dagma.defs.data.arrivals import ARRIVAL_HOURS, inbox_arrivals, wine_arrivals
from dagma.defs.models import schedules
from dagma.lab import planning
from dagma.lib import arrivals
from dagma.settings import PROJECT_ROOT, Settings, get_settings


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """A fresh lab whose notebooks folder is a copy, so a test can edit a notebook."""
    notebooks = tmp_path / "notebooks"
    shutil.copytree(PROJECT_ROOT / "notebooks", notebooks)
    monkeypatch.setenv("DAGMA_HOME", str(tmp_path / "lab"))
    monkeypatch.setenv("DAGMA_NOTEBOOKS_DIR", str(notebooks))
    # The session's lab exports these; left set, this lab would use the session's instance.
    for name in ("DAGSTER_HOME", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    settings = get_settings()
    assert settings.dagster_dir == (tmp_path / "lab" / "dagster").resolve()
    settings.ensure_dirs()
    return settings


def _instance(home: Settings) -> dg.DagsterInstance:
    """The lab's own Dagster instance (SQLite storage under its home), as the daemon uses it."""
    return dg.DagsterInstance.from_config(str(home.dagster_dir))


def _land(inbox: Path, name: str, at: datetime, rows: int = 5, seed: int = 1) -> Path:
    path = arrivals.write_sample(inbox, rows=rows, seed=seed, name=name)
    stamp = at.timestamp()
    os.utime(path, (stamp, stamp))
    return path


def _tick(instance: dg.DagsterInstance, cursor: str | None) -> dg.SensorResult:
    with dg.build_sensor_context(instance=instance, cursor=cursor) as context:
        result = inbox_arrivals(context)
    assert isinstance(result, dg.SensorResult)
    return result


def test_inbox_sensor_requests_the_hour_each_file_landed_in(home: Settings):
    inbox = home.inbox_dir
    eight, nine = (
        datetime(2026, 11, 29, 8, 15, tzinfo=UTC),
        datetime(2026, 11, 29, 9, 5, tzinfo=UTC),
    )
    _land(inbox, "a.csv", eight, rows=4)
    _land(inbox, "b.csv", eight + timedelta(minutes=30), rows=6, seed=2)
    _land(inbox, "c.csv", nine, rows=3, seed=3)
    with _instance(home) as instance:
        first = _tick(instance, None)
        keys = {r.partition_key: r for r in first.run_requests or []}
        assert sorted(keys) == ["2026-11-29-08:00", "2026-11-29-09:00"]
        assert keys["2026-11-29-08:00"].tags["dagma/inbox_files"] == "a.csv,b.csv"
        assert all(r.asset_selection is None for r in keys.values())  # the sensor's own target
        job = lab.load_definitions(home).resolve_job_def(inbox_arrivals.job_name)
        assert job.asset_layer.executable_asset_keys == {wine_arrivals.key}

        again = _tick(instance, first.cursor)
        assert not again.run_requests and again.skip_reason is not None

        later = datetime(2026, 11, 29, 10, 40, tzinfo=UTC)
        os.utime(inbox / "c.csv", (later.timestamp(), later.timestamp()))  # `touch` re-ingests
        touched = _tick(instance, again.cursor)
        # Its new hour, and its old one again, which no longer holds it: no day counts it twice.
        asked = {r.partition_key: r for r in touched.run_requests or []}
        assert sorted(asked) == ["2026-11-29-09:00", "2026-11-29-10:00"]
        assert asked["2026-11-29-09:00"].tags["dagma/inbox_files_left"] == "c.csv"
        # A repeated tick (e.g. after a daemon restart) asks for the same run key: not re-run.
        assert (
            touched.run_requests[0].run_key == _tick(instance, again.cursor).run_requests[0].run_key
        )

        # What the sensor asked for, run for real: the hour holds exactly its files' rows.
        storage = dg.FilesystemIOManager(base_dir=str(home.home / "storage"))
        run = dg.materialize(
            [wine_arrivals],
            instance=instance,
            partition_key="2026-11-29-08:00",
            resources={"io_manager": storage},
        )
        frame = run.output_for_node("wine_arrivals")
        assert len(frame) == 10 and set(frame["source_file"]) == {"a.csv", "b.csv"}
        assert frame[arrivals.feature_columns()].notna().all().all()


def test_inbox_sensor_reports_what_it_ignores_once(
    home: Settings, capfd: pytest.CaptureFixture[str]
):
    inbox = home.inbox_dir
    (inbox / "notes.txt").write_text("not samples")
    _land(inbox, "old.csv", datetime(2025, 1, 1, tzinfo=UTC))
    assert ARRIVAL_HOURS.get_first_partition_key() == "2026-09-01-00:00"
    with _instance(home) as instance:
        capfd.readouterr()
        first = _tick(instance, None)
        assert not first.run_requests
        assert set(json.loads(first.cursor or "{}")) == {"notes.txt", "old.csv"}
        warned = capfd.readouterr().err
        assert "inbox: ignored notes.txt (not a .csv file)" in warned
        assert "inbox: ignored old.csv (landed 2025-01-01-00:00, before 2026-09-01-00:00" in warned
        _tick(instance, first.cursor)
        assert "inbox: ignored" not in capfd.readouterr().err  # said once, not every 15 s


def test_the_inbox_survives_future_times_and_names_that_are_not_text(
    home: Settings, capfd: pytest.CaptureFixture[str]
):
    inbox = home.inbox_dir
    now = datetime.now(UTC)
    _land(inbox, "good.csv", now)
    _land(inbox, "ahead.csv", now + timedelta(days=2), seed=2)
    raw = inbox / os.fsdecode(b"bad\xff.csv")
    raw.write_text("not read")
    with _instance(home) as instance:
        capfd.readouterr()
        first = _tick(instance, None)  # no exception: the tick and its cursor are saved
        assert [r.partition_key for r in first.run_requests or []] == [arrivals.hour_key(now)]
        warned = capfd.readouterr().err
        assert "inbox: ignored ahead.csv (modified in the future" in warned
        assert "its name is not UTF-8 text: rename it" in warned
        second = _tick(instance, first.cursor)
        assert not second.run_requests
        assert "inbox: ignored" not in capfd.readouterr().err  # said once, not every 15 s
        # Once its hour exists (here: touched to now), the file from the future is ingested.
        os.utime(inbox / "ahead.csv", (now.timestamp(), now.timestamp()))
        third = _tick(instance, second.cursor)
        assert [r.tags["dagma/inbox_files"] for r in third.run_requests or []] == ["ahead.csv"]
    assert raw.exists()  # reported, never moved or deleted


def test_inbox_sensor_without_an_inbox_says_where_to_drop_files(home: Settings):
    shutil.rmtree(home.inbox_dir)
    with _instance(home) as instance, dg.build_sensor_context(instance=instance) as context:
        result = inbox_arrivals(context)
    assert isinstance(result, dg.SkipReason)
    assert str(home.inbox_dir) in (result.skip_message or "")
    assert "create it" in (result.skip_message or "")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("alcohol,malic_acid\n13.2,1.7\n", "missing column(s) ash"),
        (None, "line 4, column 'hue' is 'n/a', not a number"),
        (",".join(["alcohol"]) + "\n", "missing column(s)"),
        ("", "not a readable CSV"),
        ("blank", "line 3, column 'ash' is empty"),
        ("big", "has more than 8 rows. Split it into smaller files, or raise DAGMA_INBOX_MAX_ROWS"),
    ],
)
def test_a_bad_inbox_file_is_skipped_and_named_and_the_good_ones_ingested(
    home: Settings, content: str | None, expected: str, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("DAGMA_INBOX_MAX_ROWS", "8")
    inbox = home.inbox_dir
    at = datetime(2026, 11, 29, 8, 0, tzinfo=UTC)
    good = _land(inbox, "good.csv", at)
    bad = inbox / "bad.csv"
    if content in (None, "blank"):
        frame = pd.read_csv(good).astype({"hue": object, "ash": object})
        if content is None:
            frame.loc[2, "hue"] = "n/a"
        else:
            frame.loc[1, "ash"] = None
        frame.to_csv(bad, index=False)
    elif content == "big":
        bad = _land(inbox, "bad.csv", at, rows=9, seed=2)
    else:
        bad.write_text(content)
    os.utime(bad, (at.timestamp(), at.timestamp()))
    with _instance(home) as instance:
        run = dg.materialize(
            [wine_arrivals],
            instance=instance,
            partition_key="2026-11-29-08:00",
            resources={"io_manager": dg.FilesystemIOManager(base_dir=str(home.home / "s"))},
        )
        event = instance.get_latest_materialization_event(wine_arrivals.key)
    frame = run.output_for_node("wine_arrivals")
    assert len(frame) == 5 and set(frame["source_file"]) == {"good.csv"}
    skipped = event.asset_materialization.metadata["skipped_files"].value
    assert list(skipped) == ["bad.csv"]
    assert str(bad) in skipped["bad.csv"] and expected in skipped["bad.csv"]
    assert bad.exists() and good.exists()  # nothing in the inbox is moved or lost


def test_a_header_only_file_is_named(tmp_path: Path):
    path = tmp_path / "empty.csv"
    path.write_text(",".join(arrivals.feature_columns()) + "\n")
    with pytest.raises(arrivals.ArrivalError, match="header but no rows"):
        arrivals.read_file(arrivals.Landed(path, path.stat().st_mtime_ns))


@pytest.fixture
def reload_schedules() -> Iterator[None]:
    yield
    os.environ.pop("DAGMA_RETRAIN_CRON", None)
    os.environ.pop("DAGMA_AUTOMATION", None)
    importlib.reload(schedules)


def test_nightly_schedule_retrains_the_model_and_runs_its_gate(home: Settings):
    definitions = lab.load_definitions(home)
    schedule = definitions.resolve_schedule_def("wine_model_nightly")
    assert (schedule.cron_schedule, schedule.execution_timezone) == ("0 2 * * *", "UTC")
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    with _instance(home) as instance:
        at = datetime(2026, 11, 30, 2, 0, tzinfo=UTC)
        with dg.build_schedule_context(instance=instance, scheduled_execution_time=at) as context:
            data = schedule.evaluate_tick(context)
    requests = data.run_requests or []
    assert len(requests) == 1
    assert requests[0].tags["dagma/trigger"] == "nightly"
    job = definitions.resolve_job_def(schedule.job_name)
    assert {k.to_user_string() for k in job.asset_layer.executable_asset_keys} == {"wine_model"}
    # Every nightly version faces the quality gate in the same run.
    assert {n.name for n in job.graph.nodes} == {"wine_model", "wine_model_wine_model_quality"}
    ticks = cron_string_iterator(
        datetime(2026, 11, 30, 1, 0, tzinfo=UTC).timestamp(), schedule.cron_schedule, "UTC"
    )
    assert next(ticks) == datetime(2026, 11, 30, 2, 0, tzinfo=UTC)


def test_retrain_cron_and_automation_switch_come_from_the_environment(reload_schedules: None):
    os.environ["DAGMA_RETRAIN_CRON"] = "30 3 * * 1"
    os.environ["DAGMA_AUTOMATION"] = "false"
    importlib.reload(schedules)
    assert schedules.wine_model_nightly.cron_schedule == "30 3 * * 1"
    assert schedules.wine_model_nightly.default_status == dg.DefaultScheduleStatus.STOPPED
    assert core_sensors.automation_status() == dg.DefaultSensorStatus.STOPPED
    os.environ["DAGMA_RETRAIN_CRON"] = "every night"
    with pytest.raises(ValueError, match=r"DAGMA_RETRAIN_CRON='every night' is not a cron"):
        importlib.reload(schedules)


def _report(instance: dg.DagsterInstance, key: str, partition: str | None = None) -> None:
    instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=key, partition=partition))


def _requested(result: dg.EvaluateAutomationConditionsResult) -> dict[str, set[str | None]]:
    out: dict[str, set[str | None]] = {}
    for r in result.results:
        if r.true_subset.size and isinstance(r.key, dg.AssetKey):
            out[r.key.to_user_string()] = result.get_requested_partitions(r.key)
    return out


def test_automation_runs_stale_notebooks_and_only_those(home: Settings):
    definitions = lab.load_definitions(home)
    now = datetime.now(UTC)
    today = now.strftime("%Y-%m-%d")
    yesterday = (now - timedelta(days=1)).strftime("%Y-%m-%d")
    hour = arrivals.hour_key(now)
    with _instance(home) as instance:

        def tick(cursor=None, defs=definitions):  # type: ignore[no-untyped-def]
            result = dg.evaluate_automation_conditions(
                defs=defs, instance=instance, cursor=cursor, evaluation_time=now
            )
            return result, _requested(result)

        result, asked = tick()
        assert asked == {}  # nothing to read yet: no notebook runs on missing inputs

        _report(instance, "wine_table")
        result, asked = tick(result.cursor)
        # Both engines: the dagstermill notebook is automated like the bridge's.
        assert asked == {"wine_model": {None}, "wine_clusters": {None}}

        _report(instance, "wine_model")
        _report(instance, "wine_clusters")
        result, asked = tick(result.cursor)
        # Daily scores: only the latest complete day. Arrivals: nothing has landed today yet.
        assert asked == {"wine_daily_scores": {yesterday}}
        _report(instance, "wine_daily_scores", yesterday)

        _report(instance, "wine_arrivals", hour)  # one hour of today's samples is enough
        result, asked = tick(result.cursor)
        assert asked == {"wine_arrival_scores": {today}}
        _report(instance, "wine_arrival_scores", today)

        result, asked = tick(result.cursor)
        assert asked == {}  # everything fresh: the daemon stays idle

        notebook = Path(os.environ["DAGMA_NOTEBOOKS_DIR"]) / "wine_model.ipynb"
        nb = json.loads(notebook.read_text())
        cell = next(c for c in nb["cells"] if c["cell_type"] == "code")
        cell["source"] = ["# edited: a new code version\n", *cell["source"]]
        notebook.write_text(json.dumps(nb))
        edited = lab.load_definitions(home)
        result, asked = tick(result.cursor, edited)
        assert asked == {"wine_model": {None}}  # its code changed; its downstream waits for it


def test_only_notebooks_are_automated_and_the_sensor_targets_them(home: Settings):
    definitions = lab.load_definitions(home)
    graph = definitions.resolve_asset_graph()
    automated = {
        k.to_user_string() for k in graph.get_all_asset_keys() if graph.get(k).automation_condition
    }
    assert automated == {
        "wine_model",
        "wine_clusters",
        "wine_daily_scores",
        "wine_arrival_scores",
        "doc_vectors",
    }
    sensor = definitions.resolve_sensor_def("notebook_automation")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    assert definitions.resolve_sensor_def("inbox_arrivals").default_status == (
        dg.DefaultSensorStatus.RUNNING
    )


def test_a_day_runs_after_its_hours_although_its_key_sorts_first(home: Settings):
    graph = lab.load_definitions(home).resolve_asset_graph()
    day = ([dg.AssetKey("wine_arrival_scores")], "2026-11-30")
    hour = ([dg.AssetKey("wine_arrivals")], "2026-11-30-01:00")
    plain = ([dg.AssetKey("wine_table"), dg.AssetKey("wine_model")], None)
    # "2026-11-30" sorts before "2026-11-30-01:00": ordered by key, the day would run first
    ordered = planning.upstream_first(graph, [plain, day, hour])
    assert ordered.index(hour) < ordered.index(day) and ordered.index(plain) < ordered.index(day)


def test_by_hand_a_partitioned_upstream_is_its_stored_partitions(tmp_path: Path):
    import pickle

    from dagma.nb import NotebookContext, RunTarget

    folder = tmp_path / "storage" / "wine_arrivals"
    folder.mkdir(parents=True)
    for key in ("2026-11-29-23:00", "2026-11-30-00:00", "2026-11-30-05:00"):
        (folder / key).write_bytes(pickle.dumps(key))
    ctx = NotebookContext(
        notebook="wine_arrival_scores",
        asset_names=["wine_arrival_scores"],
        target=RunTarget(
            tracking_uri="",
            experiment="dagma",
            artifact_root=None,
            qdrant_url=None,
            qdrant_path="",
            collection="c",
            partition_key="2026-11-30",
        ),
        upstream_paths={"wine_arrivals": str(folder)},
        outputs_dir=None,
    )
    assert ctx.upstream("wine_arrivals") == {
        "2026-11-30-00:00": "2026-11-30-00:00",
        "2026-11-30-05:00": "2026-11-30-05:00",
    }
    ctx.partition_key = None
    assert len(ctx.upstream("wine_arrivals")) == 3


def test_ingestion_without_an_hour_says_to_pick_one(home: Settings):
    """A run of every asset with no partition (a GraphQL "all assets" run) reaches the asset."""
    storage = dg.FilesystemIOManager(base_dir=str(home.home / "s"))
    with _instance(home) as instance:
        run = dg.materialize(
            [wine_arrivals],
            instance=instance,
            resources={"io_manager": storage},
            raise_on_error=False,
        )
    assert not run.success
    error = run.get_step_failure_events()[0].step_failure_data.error
    assert error is not None
    assert "partitioned by hour: materialize one hour" in error.message


def test_a_stale_run_batches_only_the_partitions_of_what_is_stale(home: Settings):
    graph = lab.load_definitions(home).resolve_asset_graph()
    everything = sorted(graph.get_all_asset_keys())
    latest = planning.latest_partitions(graph, everything)
    model = dg.AssetKey("wine_model")
    # Only the model is stale: no run for the partitioned assets' (empty) batches.
    assert planning.groups(graph, [model], latest) == [([model], None)]
    arrivals_key = dg.AssetKey("wine_arrivals")
    groups = planning.groups(graph, [model, arrivals_key], latest)
    assert groups == [([model], None), ([arrivals_key], latest[arrivals_key])]


def test_a_stale_run_includes_what_reads_the_stale_assets(home: Settings):
    graph = lab.load_definitions(home).resolve_asset_graph()
    everything = sorted(graph.get_all_asset_keys())
    hour = dg.AssetKey("wine_arrivals")
    chosen = {k.to_user_string() for k in planning.and_downstream(graph, everything, [hour])}
    assert chosen == {"wine_arrivals", "wine_arrival_scores"}  # a new hour re-scores the day
    model = {
        k.to_user_string()
        for k in planning.and_downstream(graph, everything, [dg.AssetKey("wine_model")])
    }
    assert model == {"wine_model", "wine_daily_scores", "wine_arrival_scores", "lab_scorecard"}
