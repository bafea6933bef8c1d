"""Planning a `dagma run`: pure functions of the asset graph and of the state passed in.

What is stale, what runs with it downstream, the latest partitions, and the batches (one
Dagster run each, per partition) in upstream-first order, with whether a batch may start now.
Nothing here reads or writes: Dagster's state comes from `dagma.dagster_state`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from dagma.dagster_state import Staleness, latest_partitions
from dagma.errors import DagmaError

if TYPE_CHECKING:
    import dagster as dg
    from dagster._core.definitions.assets.graph.base_asset_graph import BaseAssetGraph

__all__ = [
    "Batch",
    "LabError",
    "Started",
    "and_downstream",
    "batches",
    "can_overlap",
    "gate",
    "groups",
    "latest_partitions",
    "select",
    "stale_keys",
    "upstream_first",
]

Gate = Literal["go", "wait", "skip"]


class LabError(DagmaError):
    """What was asked of the lab cannot be done as asked (an unknown asset, say)."""


def select(keys: Sequence[dg.AssetKey], selection: Sequence[str] | None) -> list[dg.AssetKey]:
    """The keys named in `selection` (user strings, in its order), or all `keys` when empty."""
    if not selection:
        return list(keys)
    known = {k.to_user_string(): k for k in keys}
    unknown = [s for s in selection if s not in known]
    if unknown:
        raise LabError(
            f"Unknown asset(s): {', '.join(unknown)}. Known: {', '.join(sorted(known))}."
        )
    return [known[s] for s in selection]


def stale_keys(
    keys: Sequence[dg.AssetKey], staleness: Mapping[dg.AssetKey, Staleness]
) -> list[dg.AssetKey]:
    """The keys that are not fresh (stale, missing or never run), in the order of `keys`."""
    return [k for k in keys if k not in staleness or not staleness[k].fresh]


def and_downstream(
    graph: BaseAssetGraph, candidates: Sequence[dg.AssetKey], stale: Sequence[dg.AssetKey]
) -> list[dg.AssetKey]:
    """`stale` plus the candidates downstream of it, whose inputs the run is about to change."""
    chosen = set(stale)
    grew = True
    while grew:
        grew = False
        for key in candidates:
            if key not in chosen and chosen & set(graph.get(key).parent_keys):
                chosen.add(key)
                grew = True
    return [k for k in candidates if k in chosen]


def groups(
    graph: BaseAssetGraph, keys: Sequence[dg.AssetKey], partitions: Mapping[dg.AssetKey, str]
) -> list[tuple[list[dg.AssetKey], str | None]]:
    """One run's keys per partition (unpartitioned first), upstream batches first."""
    found: list[tuple[list[dg.AssetKey], str | None]] = []
    plain = [k for k in keys if graph.get(k).partitions_def is None]
    if plain:
        found.append((plain, None))
    # Only the partitions of `keys`: `--stale` may leave a partitioned asset out.
    for last in sorted({partitions[k] for k in keys if k in partitions}):
        found.append(([k for k in keys if partitions.get(k) == last], last))
    return upstream_first(graph, found)


def upstream_first(
    graph: BaseAssetGraph, batches: list[tuple[list[dg.AssetKey], str | None]]
) -> list[tuple[list[dg.AssetKey], str | None]]:
    """Order batches so that one whose assets read another's comes after it.

    Partition keys do not sort by dependency: an hourly upstream ("2026-11-30-01:00") sorts
    after its daily downstream ("2026-11-30"). A cycle leaves the order as it is.
    """
    from graphlib import CycleError, TopologicalSorter

    where = {key: i for i, (keys, _) in enumerate(batches) for key in keys}
    order: TopologicalSorter[int] = TopologicalSorter()
    for i, (keys, _) in enumerate(batches):
        order.add(
            i, *{where[p] for k in keys for p in graph.get(k).parent_keys if p in where} - {i}
        )
    try:
        return [batches[i] for i in order.static_order()]
    except CycleError:
        return batches


def can_overlap(graph: BaseAssetGraph, keys: Sequence[dg.AssetKey]) -> bool:
    """Whether two of `keys` are independent, so that their steps could run at once."""
    chosen = set(keys)
    ancestors: dict[Any, set[Any]] = {}

    def up(key: Any) -> set[Any]:
        if key not in ancestors:
            ancestors[key] = set()
            for parent in graph.get(key).parent_keys:
                if parent in chosen:
                    ancestors[key] |= {parent} | up(parent)
        return ancestors[key]

    return any(a not in up(b) and b not in up(a) for i, a in enumerate(keys) for b in keys[i + 1 :])


@dataclass(frozen=True)
class Batch:
    """One Dagster run of `keys` (for `partition`), to start once `needs` are materialized.

    `fan_out`: on Dagster's multiprocess executor, else in one process.
    """

    keys: list[dg.AssetKey]
    partition: str | None
    needs: frozenset[dg.AssetKey]
    fan_out: bool


def batches(
    graph: BaseAssetGraph,
    keys: Sequence[dg.AssetKey],
    partitions: Mapping[dg.AssetKey, str],
    processes: int,
) -> list[Batch]:
    """The runs that materialize `keys`, upstream first.

    A batch fans out only with more than one process and when something can run beside its
    steps: another batch, or two of its own assets that are independent.
    """
    planned = groups(graph, keys, partitions)
    found: list[Batch] = []
    for batch_keys, partition in planned:
        earlier = {k for b in found for k in b.keys}
        needs = frozenset(p for k in batch_keys for p in graph.get(k).parent_keys if p in earlier)
        fan_out = processes > 1 and (len(planned) > 1 or can_overlap(graph, batch_keys))
        found.append(Batch(batch_keys, partition, needs, fan_out))
    return found


class Started(Protocol):
    """What `gate` reads of a batch planned before: whether and how it ran so far."""

    @property
    def keys(self) -> list[dg.AssetKey]: ...
    @property
    def started(self) -> bool: ...
    @property
    def skipped(self) -> bool: ...
    @property
    def finished(self) -> bool: ...
    @property
    def failed(self) -> bool: ...
    @property
    def made(self) -> set[str]: ...  # asset keys (user strings) it materialized so far
    @property
    def running(self) -> set[str]: ...  # its steps running now


def gate(batch: Batch, earlier: Sequence[Started], processes: int) -> Gate:
    """Whether a batch not started yet may "go", must "wait" or is to "skip".

    With one process a run waits for the one before it and is skipped after a failure. With
    more, it waits until its upstream assets are materialized and fewer than `processes` steps
    run, and is skipped when a finished run did not materialize one of its upstream assets.
    """
    if processes == 1:
        if any(b.skipped or b.failed for b in earlier):
            return "skip"
        return "wait" if earlier and not earlier[-1].finished else "go"
    made = {key for b in earlier for key in b.made}
    missing = {k for k in batch.needs if k.to_user_string() not in made}
    if missing:
        producers = [b for b in earlier if missing & set(b.keys)]
        return "skip" if all(b.finished for b in producers) else "wait"
    in_flight = sum(len(b.running) for b in earlier if b.started and not b.finished)
    return "wait" if in_flight >= processes else "go"
