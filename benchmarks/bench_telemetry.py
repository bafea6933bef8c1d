"""Issue 21: the cost of tracing and metrics, on against off, for the trivial notebook
(`dagma run trivial`) and for `GET /v1/search` through a real `dagma serve`; each mode
interleaved with the others, reported as medians, spreads and ratios on / off.

    uv run python benchmarks/bench_telemetry.py [--repeat 5] [--requests 200] [--home DIR]
        [--only notebook,api] [--quick] [--write-docs [--allow-dirty]]
"""

from __future__ import annotations

import argparse
import datetime
import os
import secrets
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import _report  # beside this script: `python benchmarks/<this>.py` finds it
import bench_api
import bench_notebook
import httpx
import psutil

MARK_START, MARK_END = "<!-- bench_telemetry:start -->", "<!-- bench_telemetry:end -->"
PARTS = ("notebook", "api")
ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"
MULTIPROC = "PROMETHEUS_MULTIPROC_DIR"  # dagma.lib.telemetry.metrics.MULTIPROC_ENV
# mode -> how it is set up, for the tables; "off" first: every ratio is over it
MODES = {
    "off": "off: no `OTEL_*`, no `PROMETHEUS_MULTIPROC_DIR`",
    "no_collector": "on, no collector: `OTEL_EXPORTER_OTLP_ENDPOINT` a closed loopback port",
    "collector": "on, with a collector: `OTEL_EXPORTER_OTLP_ENDPOINT` this script's receiver",
}
API_MODES = {
    "off": "off: no `OTEL_*` (metrics on, as always)",
    "no_collector": "traces on, no collector: a closed loopback port",
    "collector": "traces on, with a collector: this script's receiver",
}


class Receiver:
    """A minimal OTLP/HTTP collector on a loopback port: 200 to every `POST /v1/traces`."""

    def __init__(self) -> None:
        self.posts = 0
        self.bytes = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a real collector

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                ok = self.path == "/v1/traces"
                if ok:
                    with receiver._lock:
                        receiver.posts += 1
                        receiver.bytes += len(body)
                self.send_response(200 if ok else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")  # an empty ExportTraceServiceResponse
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@contextmanager
def closed_port() -> Iterator[str]:
    """The URL of a loopback port held bound but not listening: every connection is refused."""
    from dagma.services.procs import free_port

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", free_port()))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


def telemetry_off(env: dict[str, str]) -> dict[str, str]:
    """`env` without any tracing or metrics setting (the caller's shell may have some)."""
    return {k: v for k, v in env.items() if not k.startswith("OTEL_") and k != MULTIPROC}


# ---------------------------------------------------------------------------------------------
# The trivial notebook: bench_notebook's `trivial_dagma_run`, once per mode.


def notebook_alternative(
    mode: str, endpoint: str | None, receiver: Receiver
) -> bench_notebook.Alternative:
    """`dagma run trivial` in a fresh lab (bench_notebook's), with `mode`'s telemetry; verified
    untimed: the notebook ran, and when on, metrics were written and (collector) spans sent."""
    posts_before = [0]

    def prepare(work: Path) -> tuple[list[str], dict[str, str]]:
        cmd, env = bench_notebook.prep_trivial_run(work)
        env = telemetry_off(env)
        if endpoint is not None:
            env[ENDPOINT] = endpoint
            env[MULTIPROC] = str(work / "metrics")
            (work / "metrics").mkdir(mode=0o700)
        posts_before[0] = receiver.posts
        return cmd, env

    def verify(work: Path, stdout: str) -> str | None:
        problem = bench_notebook.verify_trivial_lab(work, stdout)
        if problem or endpoint is None:
            return problem
        if not any((work / "metrics").glob("*.db")):
            return f"metrics were on, but {work / 'metrics'} holds no *.db file"
        if mode == "collector" and receiver.posts == posts_before[0]:
            return "tracing was on, but the receiver got no POST /v1/traces"
        return None

    label = MODES[mode] + ("" if endpoint is None else ", `PROMETHEUS_MULTIPROC_DIR` a temp folder")
    return bench_notebook.Alternative(mode, label, prepare, verify=verify)


def run_notebook(repeat: int, receiver: Receiver, closed: str) -> list[bench_notebook.Alternative]:
    endpoints = {"off": None, "no_collector": closed, "collector": receiver.url}
    alts = [notebook_alternative(m, endpoints[m], receiver) for m in MODES]
    with tempfile.TemporaryDirectory(prefix="bench_telemetry-") as tmp:
        # Untimed, so that the first timed run does not pay for a cold disk cache alone.
        warm = notebook_alternative("off", None, receiver)
        bench_notebook.run_once(warm, Path(tmp), -1)
        if warm.failures:
            sys.exit(f"the untimed warm-up `dagma run trivial` failed: {warm.failures[0]}")
        for rep in range(repeat):  # ABC, BCA, CAB, ...
            shift = rep % len(alts)
            for alt in alts[shift:] + alts[:shift]:
                bench_notebook.run_once(alt, Path(tmp), rep)
    return alts


# ---------------------------------------------------------------------------------------------
# GET /v1/search through `dagma serve`: one server per mode, all up at once, rounds rotated.


@dataclass
class Series:
    """One API mode's timed requests: pooled latencies, each round's p50, server CPU."""

    latencies: list[float] = field(default_factory=list)
    round_p50: list[float] = field(default_factory=list)
    cpu_server: float = 0.0
    traced: str = ""  # what shows that this server exported traces, or failed to


def run_api(
    args: argparse.Namespace, receiver: Receiver, closed: str
) -> tuple[dict[str, Series], list[str]]:
    """The API's series per mode, and what went wrong with a mode's tracing (on or off)."""
    home = args.home.resolve() if args.home else Path(tempfile.mkdtemp(prefix="bench-telemetry-"))
    logs = Path(tempfile.mkdtemp(prefix="bench-telemetry-logs-"))
    secret = secrets.token_urlsafe(32)
    env = telemetry_off(_report.clean_env(DAGMA_HOME=str(home), DAGMA_API_SECRET=secret))
    os.environ.update({"DAGMA_HOME": str(home), "DAGMA_API_SECRET": secret})
    endpoints = {"off": None, "no_collector": closed, "collector": receiver.url}
    try:
        if not args.home:
            bench_api._build_lab(home, env)
        with ExitStack() as stack:
            servers = {}
            for mode, endpoint in endpoints.items():  # each in its own folder: its log, no .env
                (logs / mode).mkdir()
                mode_env = env if endpoint is None else {**env, ENDPOINT: endpoint}
                servers[mode] = stack.enter_context(bench_api._serving(logs / mode, mode_env))
            posts = receiver.posts
            series = _measure_api(servers, args, receiver)
            return series, _check_exports(series, logs, receiver, posts)
    finally:
        shutil.rmtree(logs, ignore_errors=True)
        if not args.home:
            shutil.rmtree(home, ignore_errors=True)


def _measure_api(
    servers: dict[str, tuple[str, int]], args: argparse.Namespace, receiver: Receiver
) -> dict[str, Series]:
    from dagma.api.auth import issue_token
    from dagma.settings import get_settings

    token = issue_token(get_settings(), ["search"], datetime.timedelta(hours=2), "bench")
    headers = {"Authorization": f"Bearer {token}"}

    def worker(url: str) -> bench_api.Worker:
        def make() -> tuple[bench_api.Call, Callable[[], None]]:
            client = httpx.Client(base_url=url, headers=headers, timeout=120)

            def call(i: int) -> None:
                query = bench_api.QUERIES[i % len(bench_api.QUERIES)]
                response = client.get("/v1/search", params={"q": query, "k": 4})
                if response.status_code != 200:
                    raise RuntimeError(f"/v1/search: {response.status_code} {response.text}")

            return call, client.close

        return make

    procs = {mode: psutil.Process(pid) for mode, (_, pid) in servers.items()}
    for mode, (url, _) in servers.items():  # warm-up: the embedder, the store, caches
        bench_api._run(worker(url), 1, args.warmup, procs[mode])
        print(f"  warmed up the server {mode}", file=sys.stderr, flush=True)
    series = {mode: Series() for mode in servers}
    order = list(servers)
    for rnd in range(args.repeat):
        shift = rnd % len(order)
        for mode in order[shift:] + order[:shift]:
            latencies, _, _, cpu = bench_api._run(
                worker(servers[mode][0]), 1, args.requests, procs[mode]
            )
            one = series[mode]
            one.latencies += latencies
            one.round_p50.append(statistics.median(latencies))
            one.cpu_server += cpu
            print(
                f"  round {rnd + 1} {mode}: p50 {one.round_p50[-1] * 1e3:.2f} ms",
                file=sys.stderr,
                flush=True,
            )
    return series


def _check_exports(
    series: dict[str, Series], logs: Path, receiver: Receiver, posts: int
) -> list[str]:
    """Fill each server's `traced`: the receiver's POSTs (collector), the refused exports in the
    log (no collector), none (off). The batch processor exports every 5 s, so wait up to 20 s."""

    def log(mode: str) -> str:
        path = logs / mode / "bench-serve.log"  # where bench_api._serving writes it
        return path.read_text(errors="replace") if path.is_file() else ""

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if receiver.posts > posts and "/v1/traces" in log("no_collector"):
            break
        time.sleep(0.5)
    got = receiver.posts - posts
    series["collector"].traced = f"{got} POST{'' if got == 1 else 's'} to the receiver"
    refused = "/v1/traces" in log("no_collector")
    series["no_collector"].traced = "refused, as its log shows" if refused else "none logged"
    leaked = "/v1/traces" in log("off")
    series["off"].traced = "its log names /v1/traces" if leaked else "none"
    return [
        problem
        for problem, bad in (
            ("the server with a collector sent the receiver no traces", not got),
            ("the server with no collector logged no failed export to /v1/traces", not refused),
            ("the server meant to be off tried to export traces", leaked),
        )
        if bad
    ]


# ---------------------------------------------------------------------------------------------
# Report.


def _range(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    if not values:
        return "n/a"
    return f"{min(values) * scale:.{digits}f}-{max(values) * scale:.{digits}f}"


def _iqr(values: list[float]) -> str:
    if len(values) < 4:
        return "n/a"
    q1, _, q3 = statistics.quantiles(values, n=4)
    return f"{q1:.2f}-{q3:.2f}"


def _noise(on: float, off: list[float]) -> str:
    """Whether `on` (a median) lies within the off runs' own min-max range."""
    if len(off) < 2:
        return "n/a (one off run)"
    low, high = min(off), max(off)
    if low <= on <= high:
        return "yes"
    beyond = (on - high) / high if on > high else (on - low) / low
    return f"no ({beyond:+.1%} beyond the off runs' range)"


def notebook_tables(alts: list[bench_notebook.Alternative], receiver_posts: int) -> list[str]:
    by_mode = {a.key: a for a in alts}
    lines = [
        "| `dagma run trivial`, fresh home | Median s | Min-max s | IQR s | Runs |",
        "|---|---|---|---|---|",
    ]
    for alt in alts:
        lines.append(
            f"| {alt.label} | {_report.fmt(bench_notebook.median(alt))} | {_range(alt.times)} | "
            f"{_iqr(alt.times)} | {len(alt.times)}{' (+failed)' if alt.failures else ''} |"
        )
    off = by_mode["off"].times
    lines += [
        "",
        "| On / off | Ratio of medians | Per-repetition ratios (min-max) | "
        "On median within the off runs' range? |",
        "|---|---|---|---|",
    ]
    for mode in ("no_collector", "collector"):
        on = by_mode[mode].times
        if not on or not off:
            lines.append(f"| {mode} | failed | | |")
            continue
        ratio = statistics.median(on) / statistics.median(off)
        # a repetition's two runs ran back to back: their ratio cancels slow drifts of the load
        paired = [a / b for a, b in zip(on, off, strict=True)] if len(on) == len(off) else []
        lines.append(
            f"| {MODES[mode].split(':')[0]} | {ratio:.3f}x | "
            f"{_range(paired, digits=3) if paired else 'n/a (a run failed)'} | "
            f"{_noise(statistics.median(on), off)} |"
        )
    lines += ["", f"The receiver got {receiver_posts} OTLP POSTs from the notebook runs."]
    return lines


def api_tables(series: dict[str, Series], args: argparse.Namespace) -> list[str]:
    lines = [
        f"`GET /v1/search` (k=4), 1 client, {args.requests} requests per round and server, "
        f"{args.repeat} round(s), after {args.warmup} untimed:",
        "",
        "| `dagma serve` | p50 ms | p95 ms | Per-round p50 min-max ms | Server CPU ms/req | "
        "Traces exported |",
        "|---|---|---|---|---|---|",
    ]
    stats = {}
    for mode, one in series.items():
        p50, p95 = statistics.median(one.latencies), bench_api._pct(one.latencies, 0.95)
        cpu = one.cpu_server / len(one.latencies)
        stats[mode] = (p50, p95, cpu)
        lines.append(
            f"| {API_MODES[mode]} | {p50 * 1e3:.2f} | {p95 * 1e3:.2f} | "
            f"{_range(one.round_p50, 1e3)} | {cpu * 1e3:.2f} | {one.traced} |"
        )
    lines += [
        "",
        "| On / off | p50 | p95 | Server CPU/req | On p50 within the off rounds' p50 range? |",
        "|---|---|---|---|---|",
    ]
    off = stats["off"]
    for mode in ("no_collector", "collector"):
        on = stats[mode]
        lines.append(
            f"| {API_MODES[mode].split(':')[0]} | {on[0] / off[0]:.3f}x | {on[1] / off[1]:.3f}x "
            f"| {on[2] / off[2]:.3f}x | {_noise(on[0], series['off'].round_p50)} |"
        )
    return lines


INTRO = (
    "Command: `uv run python benchmarks/bench_telemetry.py --write-docs` (`--repeat N` notebook "
    "runs per mode and API rounds, default 5; `--requests N` per API round, default 200; "
    "`--home DIR` reuses a lab with the collection). Three modes: off (no `OTEL_*`, no "
    "`PROMETHEUS_MULTIPROC_DIR`); on with no collector (`OTEL_EXPORTER_OTLP_ENDPOINT` a "
    "loopback port held bound but not listening, so every export is refused); and on with a "
    "collector (a minimal OTLP/HTTP receiver in the benchmark's process answering 200 to `POST "
    "/v1/traces`). The notebook is bench_notebook's trivial one (`n = 1000`, one cell that "
    "prints), run by `dagma run trivial` in a fresh home each time; in the on modes "
    "`PROMETHEUS_MULTIPROC_DIR` is a fresh temp folder, and each run is checked, untimed, for "
    "its metrics files and (collector) the spans it sent. One untimed run (off) warms the disk "
    "cache; the runs then interleave ABC, BCA, CAB, ... "
    "A per-repetition ratio divides the two runs of one repetition, which ran close together. "
    "For the API, bench_api's lab (`dagma run --local ...`, the collection) is served by three "
    "`dagma serve` processes at once, one per mode, queried by one keep-alive client in rounds, "
    "the order rotated. `dagma serve` always serves `/metrics`, so its metrics are on in every "
    "mode: metrics off is not a mode of the API, and its rows measure tracing alone. 'Within "
    "noise' means the on median lies within the off runs' (or off rounds' p50s') min-max range."
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per mode and API rounds (5)")
    parser.add_argument("--requests", type=int, default=200, help="per API round and mode (200)")
    parser.add_argument("--warmup", type=int, default=30, help="untimed requests per server (30)")
    parser.add_argument("--home", type=Path, help="reuse this lab home (it needs the collection)")
    parser.add_argument("--only", help=f"comma-separated parts: {', '.join(PARTS)}")
    parser.add_argument("--quick", action="store_true", help="1 repetition, 20 requests: a smoke")
    _report.add_docs_flags(parser)
    args = parser.parse_args()
    _report.check_docs_flags(parser, args, "only", "quick")
    parts = args.only.split(",") if args.only else list(PARTS)
    if unknown := set(parts) - set(PARTS):
        parser.error(f"unknown parts in --only: {', '.join(sorted(unknown))}; known: notebook, api")
    if args.quick:
        args.repeat, args.requests, args.warmup = 1, 20, 5
    tree = _report.start(args.write_docs, args.allow_dirty)
    load_start, started = os.getloadavg(), time.perf_counter()
    receiver = Receiver()
    body: list[str] = []
    problems: list[str] = []
    alts: list[bench_notebook.Alternative] = []
    try:
        with closed_port() as closed:
            if "notebook" in parts:
                before = receiver.posts
                alts = run_notebook(args.repeat, receiver, closed)
                body += [*notebook_tables(alts, receiver.posts - before), ""]
            if "api" in parts:
                series, problems = run_api(args, receiver, closed)
                body += [*api_tables(series, args), ""]
    finally:
        receiver.close()
    total = time.perf_counter() - started
    packages = ("opentelemetry-sdk", "opentelemetry-exporter-otlp-proto-http", "prometheus-client")
    header = _report.machine(load_start, os.getloadavg(), packages, tree)
    text = "\n".join([*header, "", f"The whole run took {total:.0f} s.", "", *body]).rstrip()
    print(text)
    print("\nReproduce: uv run python benchmarks/bench_telemetry.py --write-docs")
    failed = [a.key for a in alts if a.failures]
    if args.write_docs:
        _report.write_titled_section(
            "(i) Telemetry on against off (issue 21)",
            INTRO,
            text,
            MARK_START,
            MARK_END,
            tree,
            args.allow_dirty,
        )
    if failed:
        problems.insert(0, f"notebook modes {', '.join(failed)} failed (their errors are above)")
    if problems:
        sys.exit("FAILED: " + "; ".join(problems))


if __name__ == "__main__":
    main()
