"""The app reads Dagster's state through `dagma.dagster_state`, as `dagma run` and `status` do:
a real (SQLite) instance and a small real asset graph."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from dagma import dagster_state
from dagma.app import data
from tests.test_planning import asset_graph, graph_of


@pytest.mark.filterwarnings("ignore::dagster.BetaWarning")  # Output(data_version=...)
def test_the_app_shows_each_assets_state_and_why(tmp_path: Path):
    home = tmp_path / "dagster"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert dg.materialize(graph_of()[:4], instance=instance).success
        assert dg.materialize(graph_of(a_data="2")[:1], instance=instance).success
        definitions = dg.Definitions(assets=graph_of())
        view = data.assets_from_instance(instance, definitions, home)
        events = dagster_state.last_materializations(instance, [dg.AssetKey("b")])
    states = {a.key: a for a in view.assets}
    assert view.mode == "embedded" and list(states) == ["a", "b", "c", "d", "h", "p"]
    assert {k: s.status for k, s in states.items()} == {
        "a": "fresh",
        "b": "stale",
        "c": "fresh",
        "d": "fresh",
        "h": "missing",
        "p": "missing",
    }
    assert states["b"].cause == "has a new data version"  # the root cause, in a
    assert states["h"].cause == "never materialized"
    assert states["b"].run_id == events[dg.AssetKey("b")].run_id
    latest = dagster_state.latest_partitions(asset_graph(graph_of()), [dg.AssetKey("h")])
    assert list(latest) == [dg.AssetKey("h")]
