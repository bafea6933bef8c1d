"""OpenTelemetry traces: one trace per Dagster run, wherever its steps execute.

Off unless the standard variables name an exporter (`OTEL_EXPORTER_OTLP_ENDPOINT`,
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_TRACES_EXPORTER`, and `OTEL_SDK_DISABLED` is not
true); while off, `span()` imports nothing and connects to nothing. The exporter, its endpoint,
headers, timeouts and batching come from the same variables, read by OpenTelemetry itself.

A run's trace id is its Dagster run id, and the run's and each step's span ids are derived from
it: a step process, a run worker forked by the code server and the process that saw the run end
agree on them without talking to each other.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dagma.errors import DagmaError
from dagma.lib.telemetry import kernel

SCOPE = "dagma"
_ON_ENV = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


class TracingError(DagmaError):
    """An OTEL_* setting Dagma cannot honour."""


def enabled() -> bool:
    """Whether this process exports traces."""
    if _state is not None:
        return True
    env = os.environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return False
    return bool(exporter) or any(env.get(name, "").strip() for name in _ON_ENV)


@dataclass
class _State:
    provider: Any
    processor: Any  # every span, ours or handed back by a kernel, ends through it
    tracer: Any
    resource: Any


_state: _State | None = None


# OpenTelemetry's default export timeout is 10 s, spent in backoff when the collector is down:
# at every flush, and again as each process exits. Ours is shorter unless OTEL_* sets one.
_TIMEOUT_ENV = ("OTEL_EXPORTER_OTLP_TIMEOUT", "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT")
_DEFAULT_TIMEOUT = 2.0
_PAUSE_AFTER_FAILURE = 60.0


class _Breaker:
    """An exporter that, once an export failed, drops spans for a while instead of waiting
    for an unreachable collector again (at most one timeout per process and minute)."""

    def __init__(self, exporter: Any) -> None:
        self.exporter = exporter
        self.closed_until = 0.0

    def export(self, spans: Any) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        if time.monotonic() < self.closed_until:
            return SpanExportResult.FAILURE
        result = self.exporter.export(spans)
        if result is not SpanExportResult.SUCCESS:
            self.closed_until = time.monotonic() + _PAUSE_AFTER_FAILURE
        return result

    def shutdown(self) -> None:
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return bool(self.exporter.force_flush(timeout_millis))


def _exporters() -> list[Any]:
    names = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() or "otlp"
    made: list[Any] = []
    for name in filter(None, (n.strip() for n in names.split(","))):
        if name == "otlp":
            protocol = (
                os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf"
            )
            if protocol != "http/protobuf":
                raise TracingError(
                    f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol} is not supported here: Dagma ships "
                    "the OTLP/HTTP exporter. Set it to http/protobuf (the collector's port 4318)."
                )
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            timeout = None if any(os.environ.get(v) for v in _TIMEOUT_ENV) else _DEFAULT_TIMEOUT
            made.append(_Breaker(OTLPSpanExporter(timeout=timeout)))
        elif name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            made.append(ConsoleSpanExporter())
        else:
            raise TracingError(
                f"OTEL_TRACES_EXPORTER names {name!r}, which Dagma does not ship. Use otlp, "
                "console or none."
            )
    return made


def configure(exporter: Any = None) -> Any:
    """Start exporting: to `exporter` as each span ends (tests), else as OTEL_* says, batched.

    Returns the TracerProvider. The process's global provider is set once, for libraries that
    trace through it (the API's FastAPI instrumentation takes ours explicitly).
    """
    global _state
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import SynchronousMultiSpanProcessor, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    shutdown()
    defaults = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": "dagma"}
    resource = Resource.create(defaults)
    processor = SynchronousMultiSpanProcessor()
    if exporter is not None:
        processor.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        for made in _exporters():
            processor.add_span_processor(BatchSpanProcessor(made))
    provider = TracerProvider(resource=resource, active_span_processor=processor)
    if exporter is None:
        trace.set_tracer_provider(provider)
    _state = _State(provider, processor, provider.get_tracer(SCOPE), resource)
    return provider


def shutdown() -> None:
    """Flush and stop exporting (tests, and a process that ends on purpose)."""
    global _state
    if _state is not None:
        _state.provider.shutdown()
        _state = None


def _get() -> _State | None:
    if _state is None and enabled():
        configure()
    return _state


def tracer_provider() -> Any:
    """The SDK provider, or None while tracing is off."""
    state = _get()
    return state.provider if state else None


def flush() -> None:
    """Export what is pending now: a forked worker leaves by os._exit, skipping atexit."""
    if _state is not None:
        _state.provider.force_flush(timeout_millis=5000)


def _clean(attributes: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v if isinstance(v, str | bool | int | float) else str(v)
        for k, v in attributes.items()
        if v is not None
    }


@contextmanager
def span(name: str, **attributes: Any) -> Iterator[Any]:
    """A span under the current one; yields it, or None while tracing is off."""
    if kernel.active():
        with kernel.span(name, _clean(attributes)):
            yield None
        return
    state = _get()
    if state is None:
        yield None
        return
    with state.tracer.start_as_current_span(name, attributes=_clean(attributes)) as current:
        yield current


def run_trace_id(run_id: str) -> int:
    try:
        return uuid.UUID(run_id).int
    except ValueError:
        return int(hashlib.sha256(run_id.encode()).hexdigest()[:32], 16)


def _span_id(*parts: str) -> int:
    return int(hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16], 16) or 1


def run_span_id(run_id: str) -> int:
    return _span_id("run", run_id)


def step_span_id(run_id: str, step_key: str) -> int:
    return _span_id("step", run_id, step_key)


@contextmanager
def under_step(run_id: str, step_key: str) -> Iterator[None]:
    """Make the step's span (ended later, by `emit`) the parent of spans opened inside."""
    if _get() is None:
        yield
        return
    from opentelemetry import context, trace

    parent = trace.SpanContext(
        run_trace_id(run_id),
        step_span_id(run_id, step_key),
        is_remote=True,
        trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
    )
    token = context.attach(trace.set_span_in_context(trace.NonRecordingSpan(parent)))
    try:
        yield
    finally:
        context.detach(token)


def emit(
    name: str,
    *,
    trace_id: int,
    span_id: int,
    parent_id: int | None,
    start_ns: int,
    end_ns: int,
    attributes: dict[str, Any] | None = None,
    error: str | None = None,
) -> None:
    """End a span whose ids and times are already known (a run, a step, a kernel's cell)."""
    state = _get()
    if state is None:
        return
    from opentelemetry import trace
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.trace import Status, StatusCode

    flags = trace.TraceFlags(trace.TraceFlags.SAMPLED)
    finished = ReadableSpan(
        name,
        context=trace.SpanContext(trace_id, span_id, is_remote=False, trace_flags=flags),
        parent=trace.SpanContext(trace_id, parent_id, is_remote=True, trace_flags=flags)
        if parent_id
        else None,
        resource=state.resource,
        attributes=_clean(attributes or {}),
        status=Status(StatusCode.ERROR, error) if error else Status(StatusCode.UNSET),
        start_time=start_ns,
        end_time=max(end_ns, start_ns),
        instrumentation_scope=InstrumentationScope(SCOPE),
    )
    state.processor.on_end(finished)


def current_traceparent() -> str | None:
    """The W3C traceparent of the current span, if tracing is on and one is open."""
    if _get() is None:
        return None
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-01"


def kernel_install_code(trace_file: Path) -> str | None:
    """What a kernel runs, silently, to record its cells under the current span; None if off."""
    parent = current_traceparent()
    if parent is None:
        return None
    return (
        "__import__('dagma.lib.telemetry.kernel', fromlist=['install'])"
        f".install({parent!r}, {str(trace_file)!r})"
    )


def import_kernel_spans(trace_file: Path, cell_index: dict[int, int] | None = None) -> int:
    """Export the spans a kernel wrote to `trace_file`, then remove it; returns how many.

    `cell_index` maps an execution count to the cell's index in the notebook.
    """
    if not trace_file.is_file():
        return 0
    count = 0
    for line in trace_file.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            attributes = dict(record.get("attributes") or {})
            executed = attributes.get("dagma.cell.execution_count")
            if cell_index and executed in cell_index:
                attributes["dagma.cell.index"] = cell_index[executed]
            emit(
                record["name"],
                trace_id=int(record["trace_id"], 16),
                span_id=int(record["span_id"], 16),
                parent_id=int(record["parent_id"], 16),
                start_ns=int(record["start_ns"]),
                end_ns=int(record["end_ns"]),
                attributes=attributes,
                error=record.get("error"),
            )
            count += 1
        except (ValueError, KeyError, TypeError):
            continue  # the partial last line of a kernel killed mid-write
    trace_file.unlink(missing_ok=True)
    return count
