"""Planning a run (`dagma.lab.planning`) on small real asset graphs, with Dagster's state read
by `dagma.dagster_state` from a real (SQLite) instance."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import dagster as dg
import pytest

from dagma import dagster_state
from dagma.lab import LabError, planning

HOURS = dg.HourlyPartitionsDefinition(start_date="2026-01-01-00:00")
DAYS = dg.DailyPartitionsDefinition(start_date="2026-01-01")


def graph_of(a_code: str = "1", a_data: str = "1") -> list[dg.AssetsDefinition]:
    """a -> b -> c and d alone; the hourly h feeds the daily p."""

    @dg.asset(code_version=a_code)
    def a() -> dg.Output[int]:
        return dg.Output(1, data_version=dg.DataVersion(a_data))

    @dg.asset(code_version="1")
    def b(a: int) -> int:
        return a + 1

    @dg.asset(code_version="1")
    def c(b: int) -> int:
        return b + 1

    @dg.asset(code_version="1")
    def d() -> int:
        return 0

    @dg.asset(code_version="1", partitions_def=HOURS)
    def h() -> int:
        return 1

    @dg.asset(code_version="1", partitions_def=DAYS)
    def p(h: dict[str, int]) -> int:
        return sum(h.values())

    return [a, b, c, d, h, p]


def asset_graph(assets: list[dg.AssetsDefinition]):  # type: ignore[no-untyped-def]
    return dg.Definitions(assets=assets).resolve_asset_graph()


def keys(*names: str) -> list[dg.AssetKey]:
    return [dg.AssetKey(n) for n in names]


def names(found: list[dg.AssetKey]) -> list[str]:
    return [k.to_user_string() for k in found]


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as instance:
        yield instance


def test_latest_partitions_are_the_last_complete_hour_and_day():
    graph = asset_graph(graph_of())
    now = datetime.now(UTC)
    latest = planning.latest_partitions(graph, keys("a", "h", "p"))
    hour = (now - timedelta(hours=1)).strftime("%Y-%m-%d-%H:00")
    day = (now - timedelta(days=1)).strftime("%Y-%m-%d")
    # Read after `now`: the clock may have moved on since, never back.
    assert set(latest) == set(keys("h", "p"))
    assert latest[dg.AssetKey("h")] >= hour and latest[dg.AssetKey("p")] >= day


@pytest.mark.filterwarnings("ignore::dagster.BetaWarning")  # Output(data_version=...)
def test_what_is_stale_follows_dagsters_state(instance: dg.DagsterInstance):
    assets = graph_of()
    graph = asset_graph(assets)
    everything = sorted(graph.get_all_asset_keys())
    latest = planning.latest_partitions(graph, everything)

    def stale(graph=graph) -> list[str]:  # type: ignore[no-untyped-def]
        found = dagster_state.staleness(instance, graph, everything, latest)
        return names(planning.stale_keys(everything, found))

    assert stale() == ["a", "b", "c", "d", "h", "p"]  # never materialized: missing
    assert dg.materialize(assets[:4], instance=instance).success
    assert stale() == ["h", "p"]
    # New data in a: b reads it and is stale; c only through b, so still fresh.
    assert dg.materialize(graph_of(a_data="2")[:1], instance=instance).success
    assert stale() == ["b", "h", "p"]
    statuses = dagster_state.staleness(instance, graph, keys("b"), latest, causes=True)
    assert statuses[dg.AssetKey("b")].causes and not statuses[dg.AssetKey("b")].fresh
    # An edited asset (new code version) is stale itself.
    assert stale(asset_graph(graph_of(a_code="2"))) == ["a", "b", "h", "p"]


def test_a_stale_asset_brings_what_reads_it_and_nothing_else():
    graph = asset_graph(graph_of())
    everything = sorted(graph.get_all_asset_keys())
    assert names(planning.and_downstream(graph, everything, keys("a"))) == ["a", "b", "c"]
    assert names(planning.and_downstream(graph, everything, keys("h"))) == ["h", "p"]
    assert names(planning.and_downstream(graph, everything, keys("d"))) == ["d"]
    # Only candidates run: a selection without c does not grow it.
    assert names(planning.and_downstream(graph, keys("a", "b"), keys("a"))) == ["a", "b"]


def test_batches_run_each_partition_after_what_it_reads():
    graph = asset_graph(graph_of())
    everything = sorted(graph.get_all_asset_keys())
    latest = planning.latest_partitions(graph, everything)
    day, hour = latest[dg.AssetKey("p")], latest[dg.AssetKey("h")]
    assert day < hour  # "2026-12-02" sorts before "2026-12-03-02:00"...
    found = planning.groups(graph, everything, latest)
    # ...yet the daily p reads the hourly h, so h's batch goes first.
    assert found == [(keys("a", "b", "c", "d"), None), (keys("h"), hour), (keys("p"), day)]
    # A batch for a partition only when one of its assets is chosen.
    assert planning.groups(graph, keys("a", "p"), latest) == [(keys("a"), None), (keys("p"), day)]


def test_batches_fan_out_only_when_something_can_run_beside_them():
    graph = asset_graph(graph_of())
    latest = planning.latest_partitions(graph, keys("h", "p"))
    assert planning.can_overlap(graph, keys("a", "d"))
    assert not planning.can_overlap(graph, keys("a", "b", "c"))
    assert not planning.can_overlap(graph, keys("a"))

    [chain] = planning.batches(graph, keys("a", "b", "c"), latest, processes=2)
    assert not chain.fan_out and chain.needs == frozenset()
    [pair] = planning.batches(graph, keys("a", "d"), latest, processes=2)
    assert pair.fan_out
    [alone] = planning.batches(graph, keys("a", "d"), latest, processes=1)
    assert not alone.fan_out

    hourly, daily = planning.batches(graph, keys("h", "p"), latest, processes=2)
    assert daily.needs == frozenset(keys("h")) and hourly.needs == frozenset()
    assert hourly.fan_out and daily.fan_out  # two runs: the daily one may start early


@dataclass
class Seen:
    """A batch planned earlier, as `gate` sees it."""

    keys: list[dg.AssetKey]
    started: bool = True
    skipped: bool = False
    finished: bool = False
    failed: bool = False
    made: set[str] = field(default_factory=set)
    running: set[str] = field(default_factory=set)


def test_one_process_runs_batches_one_after_the_other_and_stops_at_a_failure():
    later = planning.Batch(keys("p"), "2026-12-02", frozenset(keys("h")), fan_out=False)
    assert planning.gate(later, [], 1) == "go"
    assert planning.gate(later, [Seen(keys("h"))], 1) == "wait"
    assert planning.gate(later, [Seen(keys("h"), finished=True, made={"h"})], 1) == "go"
    assert planning.gate(later, [Seen(keys("h"), finished=True, failed=True)], 1) == "skip"


def test_more_processes_start_a_batch_once_its_inputs_exist_and_a_slot_is_free():
    later = planning.Batch(keys("p"), "2026-12-02", frozenset(keys("h")), fan_out=True)
    assert planning.gate(later, [Seen(keys("a", "h"), running={"a", "h"})], 2) == "wait"
    ready = Seen(keys("a", "h"), made={"h"}, running={"a"})
    assert planning.gate(later, [ready], 2) == "go"  # h is made while a still runs
    busy = Seen(keys("a", "d", "h"), made={"h"}, running={"a", "d"})
    assert planning.gate(later, [busy], 2) == "wait"  # both processes are taken
    failed = Seen(keys("h"), finished=True, failed=True)
    assert planning.gate(later, [failed], 2) == "skip"  # h will never be there


def test_an_unknown_asset_is_named_with_the_known_ones():
    everything = keys("a", "b")
    assert planning.select(everything, None) == everything
    assert planning.select(everything, ["b", "a"]) == keys("b", "a")
    with pytest.raises(LabError, match=r"Unknown asset\(s\): x\. Known: a, b\.") as error:
        planning.select(everything, ["a", "x"])
    assert error.value.exit_code == 1
