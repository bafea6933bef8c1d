"""The lab's Dagster state, read in one place: staleness, last materializations, latest partitions.

`dagma run --stale` and `dagma status` (`dagma.lab`) and the app (`dagma.app.data`) read it
here. Staleness comes from Dagster's private `CachingStaleStatusResolver`, the one its UI uses:
this is the only module that touches it. Dagster is imported lazily (the app and the CLI start
without it).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import dagster as dg
    from dagster._core.definitions.assets.graph.base_asset_graph import BaseAssetGraph

FRESH = "FRESH"


@dataclass(frozen=True)
class Staleness:
    """Dagster's stale status of one asset (its latest partition when partitioned)."""

    status: str  # Dagster's StaleStatus name: FRESH, STALE or MISSING
    causes: tuple[str, ...] = ()  # why it is STALE, first the root causes (when asked for)

    @property
    def fresh(self) -> bool:
        return self.status == FRESH


def latest_partitions(graph: BaseAssetGraph, keys: Iterable[dg.AssetKey]) -> dict[dg.AssetKey, str]:
    """The latest partition of each partitioned key, as its partitions definition says now."""
    latest = {}
    for key in keys:
        partitions_def = graph.get(key).partitions_def
        if partitions_def is not None:
            last = partitions_def.get_last_partition_key()
            if last is not None:
                latest[key] = last
    return latest


def staleness(
    instance: dg.DagsterInstance,
    graph: BaseAssetGraph,
    keys: Iterable[dg.AssetKey],
    partitions: dict[dg.AssetKey, str],
    *,
    causes: bool = False,
) -> dict[dg.AssetKey, Staleness]:
    """Each key's stale status (code version, upstream data or never run), judged for its
    partition in `partitions`; with `causes`, the root causes of a stale key too."""
    from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView, TemporalContext
    from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
    from dagster._time import get_current_datetime

    view = AssetGraphView(
        temporal_context=TemporalContext(effective_dt=get_current_datetime(), last_event_id=None),
        instance=instance,
        asset_graph=graph,
    )
    resolver = CachingStaleStatusResolver(instance, graph, loading_context=view)
    found = {}
    for key in keys:
        partition = partitions.get(key)
        status = resolver.get_status(key, partition)
        why: tuple[str, ...] = ()
        if causes and status == StaleStatus.STALE:
            why = tuple(c.reason for c in resolver.get_stale_root_causes(key, partition))
        found[key] = Staleness(status.name, why)
    return found


def last_materializations(
    instance: dg.DagsterInstance, keys: Iterable[dg.AssetKey]
) -> dict[dg.AssetKey, dg.EventLogEntry | None]:
    """Each key's latest materialization event, or None when it was never materialized."""
    return {key: instance.get_latest_materialization_event(key) for key in keys}
