"""The lab's Prometheus metrics: one registry of names, bounded labels, one exposition.

A lab session (`dagma lab`, `dagma services up`) gives itself and every child one shared
multiprocess folder (`PROMETHEUS_MULTIPROC_DIR`), so a run worker's or a kernel's figures outlive
it and one `/metrics` shows them all. Elsewhere recording is a no-op unless the process serves
`/metrics` itself (`enable()`) or is asked to push (`DAGMA_METRICS_PUSH_URL`); prometheus_client
is imported on first use, after the folder is known.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dagma.errors import DagmaError

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
PUSH_ENV = "DAGMA_METRICS_PUSH_URL"
MAX_LABEL_VALUES = 100  # per label and process; more distinct values become "other"
OTHER = "other"

# Seconds: from a cell or a search (milliseconds) to a run or a generation (minutes).
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)


class MetricsError(DagmaError):
    """A metric that does not exist, or an exposition that cannot start or push."""


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: str  # counter | histogram | gauge
    help: str
    labels: tuple[str, ...]

    def series(self) -> set[str]:
        """The names Prometheus stores for it."""
        if self.kind == "counter":
            return {f"{self.name}_total"}
        if self.kind == "histogram":
            return {f"{self.name}_{part}" for part in ("bucket", "sum", "count")}
        return {self.name}


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("dagma_runs", "counter", "Dagster runs finished, by outcome.", ("outcome",)),
    MetricSpec(
        "dagma_run_duration_seconds", "histogram", "Wall time of finished runs.", ("outcome",)
    ),
    MetricSpec(
        "dagma_asset_steps", "counter", "Asset steps finished, by step.", ("asset", "outcome")
    ),
    MetricSpec(
        "dagma_asset_step_duration_seconds", "histogram", "Wall time of asset steps.", ("asset",)
    ),
    MetricSpec(
        "dagma_notebook_phase_duration_seconds",
        "histogram",
        "A notebook step's phases: kernel_start, execute, handover, render.",
        ("notebook", "phase"),
    ),
    MetricSpec(
        "dagma_notebook_cell_duration_seconds",
        "histogram",
        "Execution time of each code cell.",
        ("notebook",),
    ),
    MetricSpec(
        "dagma_kernel_pool_claims",
        "counter",
        "Kernels a notebook started on: a warm spare, or a cold start.",
        ("result",),
    ),
    MetricSpec(
        "dagma_concurrency_pool_wait_seconds",
        "histogram",
        "Time a step waited for a slot of its Dagster concurrency pool.",
        ("pool",),
    ),
    MetricSpec(
        "dagma_sensor_ticks", "counter", "Sensor evaluations, by result.", ("sensor", "result")
    ),
    MetricSpec("dagma_inbox_files", "gauge", "Files in the inbox at the last tick.", ("state",)),
    MetricSpec(
        "dagma_vector_search_duration_seconds",
        "histogram",
        "Vector searches, by store backend.",
        ("backend",),
    ),
    MetricSpec(
        "dagma_rag_duration_seconds",
        "histogram",
        "RAG answers by stage: retrieve, generate, parse, total.",
        ("stage",),
    ),
    MetricSpec("dagma_rag_tokens", "counter", "LLM tokens spent on answers.", ("kind",)),
    MetricSpec(
        "dagma_api_requests",
        "counter",
        "API requests by route template, method and status.",
        ("route", "method", "status"),
    ),
    MetricSpec(
        "dagma_api_request_duration_seconds",
        "histogram",
        "API request latency by route template.",
        ("route", "method"),
    ),
    MetricSpec(
        "dagma_build_info", "gauge", "1, labelled with the running version.", ("version", "commit")
    ),
)
_SPECS = {spec.name: spec for spec in METRICS}


def exported_series() -> set[str]:
    """Every series name the lab exports: all a dashboard or an alert may query."""
    return set().union(*(spec.series() for spec in METRICS))


_lock = threading.Lock()
_enabled = False
_objects: dict[str, Any] = {}
_seen: dict[tuple[str, str], set[str]] = {}
_LABEL_TEXT = re.compile(r"[^A-Za-z0-9_.:/\-]")


def enable() -> None:
    """Record in this process even without a shared folder (it serves `/metrics` itself)."""
    global _enabled
    _enabled = True


def enabled() -> bool:
    return _enabled or bool(os.environ.get(MULTIPROC_ENV) or os.environ.get(PUSH_ENV))


def bounded(metric: str, label: str, value: object) -> str:
    """`value` as a label value: sanitised, and "other" past MAX_LABEL_VALUES distinct ones."""
    text = _LABEL_TEXT.sub("_", str(value))[:80] or "none"
    seen = _seen.setdefault((metric, label), set())
    if text in seen:
        return text
    if len(seen) >= MAX_LABEL_VALUES:
        return OTHER
    seen.add(text)
    return text


def _metric(spec: MetricSpec) -> Any:
    found = _objects.get(spec.name)
    if found is not None:
        return found
    folder = os.environ.get(MULTIPROC_ENV)
    if folder:  # named by a session (or compose) that may not have made it yet
        Path(folder).mkdir(parents=True, exist_ok=True, mode=0o700)
    import prometheus_client as prom

    if spec.kind == "counter":
        made: Any = prom.Counter(spec.name, spec.help, spec.labels)
    elif spec.kind == "histogram":
        made = prom.Histogram(spec.name, spec.help, spec.labels, buckets=_BUCKETS)
    else:
        # The last value any process set: a gauge is a reading, not a sum over processes.
        made = prom.Gauge(spec.name, spec.help, spec.labels, multiprocess_mode="mostrecent")
    _objects[spec.name] = made
    return made


def record(name: str, value: float = 1.0, **labels: object) -> None:
    """Count, observe or set `name` (see METRICS); nothing at all while metrics are off."""
    if not enabled():
        return
    spec = _SPECS.get(name)
    if spec is None or set(labels) != set(spec.labels):
        raise MetricsError(
            f"No metric {name!r} with labels {sorted(labels)}: add it to METRICS in "
            "dagma.lib.telemetry.metrics, or use one of: " + ", ".join(sorted(_SPECS))
        )
    with _lock:
        values = [bounded(name, label, labels[label]) for label in spec.labels]
        child = _metric(spec).labels(*values)
    if spec.kind == "counter":
        child.inc(value)
    elif spec.kind == "histogram":
        child.observe(value)
    else:
        child.set(value)


def shared_dir_env(folder: Path, fresh: bool) -> dict[str, str]:
    """The environment that makes a process and its children share `folder`'s figures.

    `fresh` wipes what an earlier session left; only pass it when none of its processes lives.
    """
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    if fresh:
        for old in folder.glob("*.db"):
            old.unlink(missing_ok=True)
    return {MULTIPROC_ENV: str(folder)}


def exposition_registry() -> Any:
    """What `/metrics` shows: every process of the session, or this process alone."""
    import prometheus_client as prom
    from prometheus_client import multiprocess

    folder = os.environ.get(MULTIPROC_ENV)
    if not folder:
        return prom.REGISTRY
    registry = prom.CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=folder)
    return registry


def asgi_app() -> Any:
    """An ASGI app that serves the exposition, to mount at `/metrics`."""
    import prometheus_client as prom

    return prom.make_asgi_app(registry=exposition_registry())


def serve(host: str, port: int) -> Any:
    """Serve `/metrics` on host:port from a daemon thread; returns the server (`.shutdown()`)."""
    import prometheus_client as prom

    try:
        server, _thread = prom.start_http_server(port, addr=host, registry=exposition_registry())
    except OSError as exc:
        raise MetricsError(
            f"Cannot serve metrics on {host}:{port}: {exc.strerror or exc}. Stop what holds the "
            "port or choose another with --metrics-port (0 turns the endpoint off)."
        ) from exc
    return server


def push(url: str, job: str) -> None:
    """Push this process's figures to the Pushgateway at `url`."""
    import prometheus_client as prom

    try:
        prom.push_to_gateway(url, job=job, registry=exposition_registry(), timeout=10)
    except OSError as exc:
        raise MetricsError(
            f"Could not push metrics to the Pushgateway at {url}: {exc}. Check the URL "
            f"(--push-metrics or {PUSH_ENV}) and that the gateway is up."
        ) from exc


def build_info() -> None:
    """Label this process's series with the running version and commit (`dagma_build_info`)."""
    from dagma.version import commit, version

    record("dagma_build_info", 1, version=version(), commit=commit() or "none")
