"""A span and a latency metric for one piece of work, in one line at the call site."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from dagma.lib.telemetry import metrics, tracing


@contextmanager
def timed(
    span: str, metric: str, attributes: dict[str, Any] | None = None, **labels: str
) -> Iterator[Any]:
    """Trace `span` and observe its seconds in histogram `metric` (labels as METRICS names)."""
    started = time.perf_counter()
    with tracing.span(span, **{**(attributes or {}), **labels}) as current:
        try:
            yield current
        finally:
            metrics.record(metric, time.perf_counter() - started, **labels)
