"""Traces: one run is one trace (run -> step -> notebook phases -> the kernel's cells), over
OTLP/HTTP from a separate `dagma run` as in memory, and nothing at all while OTEL_* is unset."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from dagma.lab import materialize
from dagma.lib.telemetry import tracing
from dagma.services.procs import free_port
from dagma.settings import get_settings
from tests.conftest import QUIET
from tests.notebooks.test_spec import write_nb

pytestmark = pytest.mark.integration

BODY = "total = sum(range(size))\nprint(total)"
OTEL_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


@pytest.fixture
def traced(lab: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in [*OTEL_VARS, "OTEL_TRACES_EXPORTER", "OTEL_SDK_DISABLED"]:
        monkeypatch.delenv(name, raising=False)
    return write_nb(lab / "traced.ipynb", params="size: int = 4", body=BODY)


@pytest.fixture
def exported() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tracing.configure(exporter)
    yield exporter
    tracing.shutdown()


def test_one_run_is_one_trace_down_to_the_kernels_cells(traced: Path, exported):
    run = materialize(get_settings(), selection=["traced"], console=QUIET)
    assert run.success, run.error
    spans = exported.get_finished_spans()
    assert {s.context.trace_id for s in spans} == {int(run.run_id.replace("-", ""), 16)}
    by_name: dict[str, list] = {}
    for s in spans:
        by_name.setdefault(s.name, []).append(s)
    (root,) = by_name["dagster run"]
    assert root.parent is None
    (step,) = by_name["step traced"]
    assert step.parent.span_id == root.context.span_id
    (notebook,) = by_name["notebook"]
    assert notebook.parent.span_id == step.context.span_id
    assert notebook.attributes["mlflow.run_id"]  # the MLflow run this step logged to
    # a spare kernel claimed from the pool, or (none spare) an attempt and a cold start
    kernel = [*by_name.get("notebook.kernel_claim", []), *by_name.get("notebook.kernel_start", [])]
    for phase in ("notebook.execute", "notebook.handover", "notebook.render"):
        (part,) = by_name[phase]
        kernel.append(part)
    assert len(kernel) >= 4
    for part in kernel:
        assert part.parent.span_id == notebook.context.span_id, part.name
    (execute,) = by_name["notebook.execute"]
    cells = sorted(by_name["notebook.cell"], key=lambda s: s.attributes["dagma.cell.index"])
    # import math, the parameters, papermill's injected parameters, the body; not markdown
    assert [c.attributes["dagma.cell.index"] for c in cells] == [1, 2, 3, 4]
    for cell in cells:
        assert cell.parent.span_id == execute.context.span_id
        assert execute.start_time <= cell.start_time <= cell.end_time <= execute.end_time
    assert root.start_time <= step.start_time <= notebook.start_time
    assert notebook.end_time <= step.end_time <= root.end_time


def test_a_failing_cell_marks_its_span_and_the_steps(traced: Path, exported):
    write_nb(traced, params="size: int = 4", body="1 / 0")
    run = materialize(get_settings(), selection=["traced"], console=QUIET)
    assert not run.success
    spans = {s.name: s for s in exported.get_finished_spans()}
    failed = [
        s for s in exported.get_finished_spans() if s.name == "notebook.cell" and not s.status.is_ok
    ]
    assert len(failed) == 1 and "ZeroDivisionError" in (failed[0].status.description or "")
    assert not spans["step traced"].status.is_ok
    assert not spans["dagster run"].status.is_ok


class _Collector(BaseHTTPRequestHandler):
    """A real OTLP/HTTP endpoint: what a collector receives, decoded."""

    received: ClassVar[list[ExportTraceServiceRequest]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        type(self).received.append(request)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_a_dagma_run_exports_its_trace_over_otlp_http(traced: Path, tmp_path: Path):
    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), _Collector)
    _Collector.received = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {
        **os.environ,
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_SERVICE_NAME": "dagma-test",
    }
    try:
        done = subprocess.run(
            [sys.executable, "-m", "dagma.cli", "run", "traced"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )  # nosec B603
    finally:
        server.shutdown()
    assert done.returncode == 0, done.stdout + done.stderr
    names: dict[str, set[bytes]] = {}
    services = set()
    for request in _Collector.received:
        for resource in request.resource_spans:
            for attribute in resource.resource.attributes:
                if attribute.key == "service.name":
                    services.add(attribute.value.string_value)
            for scope in resource.scope_spans:
                for span in scope.spans:
                    names.setdefault(span.name, set()).add(span.trace_id)
    assert services == {"dagma-test"}
    assert {"dagster run", "step traced", "notebook", "notebook.execute", "notebook.cell"} <= set(
        names
    )
    assert len(set().union(*names.values())) == 1  # all one trace


def test_with_otel_unset_nothing_is_exported_and_nothing_connects(traced: Path):
    listeners = []
    for port in (4317, 4318):  # OTLP's default ports, where an exporter would try
        sock = socket.socket()
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            pytest.fail(f"port {port} is taken: this test needs OTLP's default ports free")
        sock.listen()
        sock.setblocking(False)
        listeners.append(sock)
    try:
        run = materialize(get_settings(), selection=["traced"], console=QUIET)
        assert run.success, run.error
        for sock in listeners:
            with pytest.raises(BlockingIOError):
                sock.accept()
    finally:
        for sock in listeners:
            sock.close()
    assert not tracing.enabled() and tracing.tracer_provider() is None
    assert not list((get_settings().runs_dir / run.run_id).rglob("kernel-spans.jsonl"))


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "does not ship. Use otlp, console or none"),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            "Set it to http/protobuf",
        ),
    ],
)
def test_an_exporter_dagma_cannot_honour_is_named(variables, message, monkeypatch):
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert tracing.enabled()
    with pytest.raises(tracing.TracingError, match=message):
        tracing.configure()
    tracing.shutdown()


def test_off_switches_win(monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert not tracing.enabled()
    monkeypatch.setenv("OTEL_SDK_DISABLED", "false")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert not tracing.enabled()


def test_an_unreachable_collector_costs_one_short_timeout_not_one_per_flush(monkeypatch):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: every connection is refused
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{closed.getsockname()[1]}")
    for name in ("OTEL_EXPORTER_OTLP_TIMEOUT", "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    try:
        tracing.configure()
        waits = []
        for _ in range(3):
            with tracing.span("work"):
                pass
            started = time.monotonic()
            tracing.flush()
            waits.append(time.monotonic() - started)
        started = time.monotonic()
        tracing.shutdown()
        waits.append(time.monotonic() - started)
    finally:
        tracing.shutdown()
        closed.close()
    assert waits[0] < 4.0, waits  # OpenTelemetry's own default spends about 7 s in backoff
    assert max(waits[1:]) < 0.5, waits  # then spans are dropped at once, for a minute
