"""Runs and steps as spans and metrics, from the events every process already writes.

Whichever executor runs a step (in the run's process, a step process, a run worker forked by
the code server, `dagma run` in-process), its events pass through the instance of the process
that made them; `observe_runs()` watches them there. A step's span ends in the process that ran
it, and a run's in the process that saw it start; both carry the ids `tracing` derives from the
run id, so the notebook spans opened under `tracing.under_step` join the same trace.
"""

from __future__ import annotations

import threading
from typing import Any

from dagma.lib.telemetry import metrics, tracing

_RUN_END = {"RUN_SUCCESS": "success", "RUN_FAILURE": "failure", "RUN_CANCELED": "canceled"}
_STEP_END = {"STEP_SUCCESS": "success", "STEP_FAILURE": "failure"}
_lock = threading.Lock()
_started: dict[tuple[str, str], float] = {}  # (run id, step key or "") -> start timestamp
_blocked: dict[tuple[str, str], tuple[str, float]] = {}  # (run id, step) -> (pool, since)


def _ns(timestamp: float) -> int:
    return int(timestamp * 1e9)


def observe(entry: Any) -> None:
    """Account for one event: a run or step that starts, ends, or waits for its pool."""
    event = entry.dagster_event
    if event is None or not (metrics.enabled() or tracing.enabled()):
        return
    kind = event.event_type.name  # the member, not its stored value ("PIPELINE_START")
    run_id, step, at = entry.run_id, entry.step_key or "", entry.timestamp
    if kind in ("RUN_START", "STEP_START"):
        with _lock:
            _started[(run_id, step)] = at
            waited = _blocked.pop((run_id, step), None)
        if waited is not None:
            pool, since = waited
            metrics.record("dagma_concurrency_pool_wait_seconds", at - since, pool=pool)
        return
    if kind == "ENGINE_EVENT" and step:
        data = event.engine_event_data
        held = data.metadata.get("pool") if data is not None else None
        if held is not None:
            with _lock:
                _blocked.setdefault((run_id, step), (str(getattr(held, "value", held)), at))
        return
    outcome = _RUN_END.get(kind) or _STEP_END.get(kind)
    if outcome is None:
        return
    with _lock:
        started = _started.pop((run_id, step), None)
    if started is None:
        return  # it started in another process, which accounts for it
    seconds = max(at - started, 0.0)
    trace_id = tracing.run_trace_id(run_id)
    if step:
        metrics.record("dagma_asset_steps", asset=step, outcome=outcome)
        metrics.record("dagma_asset_step_duration_seconds", seconds, asset=step)
        tracing.emit(
            f"step {step}",
            trace_id=trace_id,
            span_id=tracing.step_span_id(run_id, step),
            parent_id=tracing.run_span_id(run_id),
            start_ns=_ns(started),
            end_ns=_ns(at),
            attributes={"dagster.run_id": run_id, "dagster.step_key": step},
            error=None if outcome == "success" else f"step {outcome}",
        )
    else:
        metrics.record("dagma_runs", outcome=outcome)
        metrics.record("dagma_run_duration_seconds", seconds, outcome=outcome)
        tracing.emit(
            "dagster run",
            trace_id=trace_id,
            span_id=tracing.run_span_id(run_id),
            parent_id=None,
            start_ns=_ns(started),
            end_ns=_ns(at),
            attributes={"dagster.run_id": run_id, "dagster.job": entry.job_name or ""},
            error=None if outcome == "success" else f"run {outcome}",
        )
    tracing.flush()  # a forked run worker or step process ends by os._exit


def observe_runs() -> None:
    """Watch every event this process's Dagster instances handle; applied once."""
    from dagster._core.instance.methods.event_methods import EventMethods

    original = EventMethods.handle_new_event
    if getattr(original, "_dagma_observed", False):
        return

    def handle_new_event(self: Any, event: Any, **kwargs: Any) -> None:
        original(self, event, **kwargs)
        observe(event)

    handle_new_event._dagma_observed = True  # type: ignore[attr-defined]
    EventMethods.handle_new_event = handle_new_event  # type: ignore[method-assign]
