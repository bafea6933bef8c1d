"""`--processes 2`: independent notebook steps overlap, and the results are what one process computes."""

import shutil
from pathlib import Path

import dagster as dg
import pytest

from dagma.lab import LabError, load_definitions, materialize, resolve_processes
from dagma.lab.patches import no_logging_reconfiguration
from dagma.lab.planning import can_overlap
from dagma.settings import PROJECT_ROOT, get_settings
from tests.conftest import QUIET
from tests.notebooks.test_spec import write_nb

FAN = ["fan_1", "fan_2", "fan_3", "fan_4"]
# Long enough that two steps started together are still running when the other starts.
BODY = (
    "import time\nfrom dagma import nb\ntime.sleep(pause)\n"
    "nb.context().output({'total': sum(i * seed for i in range(1000)), 'seed': seed})"
)
DAILY = (
    "from dagma import nb\nctx = nb.context()\n"
    "ctx.output({'day': partition_key, 'total': ctx.upstream('fan_1')['total']})"
)


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Four independent notebooks and a daily one downstream of the first, in a fresh home."""
    folder = tmp_path / "notebooks"
    shutil.copytree(PROJECT_ROOT / "notebooks", folder)
    for i, name in enumerate(FAN, 1):
        write_nb(folder / f"{name}.ipynb", params=f"seed: int = {i}\npause: float = 3.0", body=BODY)
    write_nb(
        folder / "fan_daily.ipynb",
        params='upstream = ["fan_1"]\nasset = {"partitions": {"daily": "2026-11-01"}}\n'
        'partition_key: str = ""',
        body=DAILY,
    )
    monkeypatch.setenv("DAGMA_NOTEBOOKS_DIR", str(folder))
    monkeypatch.setenv("DAGMA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DAGMA_PROCESSES", raising=False)
    return folder


def step_spans(run_id: str) -> dict[str, tuple[float, float]]:
    """(start, end) of each step of the run, from the instance's event log."""
    kind = dg.DagsterEventType
    starts: dict[str, float] = {}
    spans: dict[str, tuple[float, float]] = {}
    for entry in dg.DagsterInstance.get().all_logs(run_id):
        event = entry.dagster_event
        if event is None or entry.step_key is None:
            continue
        if event.event_type == kind.STEP_START:
            starts[entry.step_key] = entry.timestamp
        elif event.event_type == kind.STEP_SUCCESS:
            spans[entry.step_key] = (starts[entry.step_key], entry.timestamp)
    return spans


def most_at_once(spans: list[tuple[float, float]]) -> int:
    edges = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    now = peak = 0
    for _, step in edges:
        now += step
        peak = max(peak, now)
    return peak


@pytest.mark.integration
def test_two_processes_overlap_the_fan_out_and_match_one_process(lab: Path):
    selection = [*FAN, "fan_daily"]
    parallel = materialize(get_settings(), selection=selection, console=QUIET, processes=2)
    assert parallel.success, parallel.error
    fan_run, daily_run = parallel.run_ids
    spans = step_spans(fan_run)
    assert sorted(spans) == FAN
    assert most_at_once(list(spans.values())) == 2  # overlapping, and never more than asked
    # The partition run waited for its upstream, and not for the whole first run.
    fan_1_done = spans["fan_1"][1]
    [(daily_start, _)] = step_spans(daily_run).values()
    assert daily_start >= fan_1_done

    # The values one process computes (each notebook's closed form), not merely the same keys.
    assert sorted(parallel.materialized) == sorted(selection)
    for i, name in enumerate(FAN, 1):
        assert parallel.values[name] == {"total": i * 499500, "seed": i}
    assert parallel.values["fan_daily"]["total"] == parallel.values["fan_1"]["total"]


@pytest.mark.integration
def test_a_failing_step_fails_the_parallel_run_with_its_error(lab: Path):
    write_nb(lab / "fan_2.ipynb", params="seed: int = 2", body="raise ValueError('no luck')")
    run = materialize(get_settings(), selection=FAN[:2], console=QUIET, processes=2)
    assert not run.success
    assert "fan_2" in run.error and "ValueError: no luck" in run.error
    assert run.materialized == ["fan_1"]


def test_processes_come_from_the_argument_then_the_environment(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("DAGMA_PROCESSES", raising=False)
    assert resolve_processes() == 1
    assert resolve_processes(3) == 3
    monkeypatch.setenv("DAGMA_PROCESSES", "2")
    assert resolve_processes() == 2
    monkeypatch.setenv("DAGMA_PROCESSES", "two")
    with pytest.raises(LabError, match="DAGMA_PROCESSES='two'"):
        resolve_processes()
    with pytest.raises(LabError, match="at least 1"):
        resolve_processes(0)


def test_only_runs_with_independent_assets_use_step_processes():
    graph = load_definitions(get_settings()).resolve_asset_graph()

    def keys(*names: str) -> list[dg.AssetKey]:
        return [dg.AssetKey(n) for n in names]

    assert can_overlap(graph, keys("wine_table", "doc_corpus"))
    assert can_overlap(graph, keys("wine_model", "doc_vectors", "rag_eval"))
    assert not can_overlap(graph, keys("wine_table", "wine_model"))
    assert not can_overlap(graph, keys("doc_corpus", "doc_vectors", "rag_eval"))
    assert not can_overlap(graph, keys("rag_eval"))


def test_runs_never_reconfigure_logging_unless_dagster_yaml_asks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """dictConfig at a run's start deadlocks a run logging in another thread (CPython #96727)."""
    import logging.config

    real = logging.config.dictConfig
    calls: list[dict] = []
    monkeypatch.setattr(logging.config, "dictConfig", lambda conf: calls.append(conf) or real(conf))
    no_logging_reconfiguration()
    home = tmp_path / "dagster"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert len(instance.get_handlers()) == 1  # the event log's own handler
    assert calls == []

    (home / "dagster.yaml").write_text(
        "python_logs:\n  dagster_handler_config:\n    handlers:\n      mine:\n"
        "        class: logging.NullHandler\n"
    )
    with dg.DagsterInstance.from_config(str(home)) as instance:
        handlers = instance.get_handlers()
    assert any(isinstance(h, logging.NullHandler) for h in handlers)
    assert len(calls) == 1
