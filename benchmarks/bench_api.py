"""Issue 20's API rows: `GET /v1/search` and `POST /v1/predict` through a real `dagma serve`
beside the same calls made in-process, at 1, 4 and 16 concurrent clients: requests per second,
p50 and p95 latency, CPU per request, and the API's overhead as ratios.

    uv run python benchmarks/bench_api.py [--requests 200] [--repeat 3] [--home DIR] [--write-docs]
"""

from __future__ import annotations

import argparse
import datetime
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _report  # beside this script: `python benchmarks/<this>.py` finds it
import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MARK_START, MARK_END = "<!-- bench_api:start -->", "<!-- bench_api:end -->"
CONCURRENCY = (1, 4, 16)
BUILD = ["wine_table", "wine_model", "doc_corpus", "doc_vectors"]  # the champion, the collection
QUERIES = (
    "How do I catch an exception and still run clean-up code?",
    "What does a with statement do?",
    "How do I read a file line by line?",
    "What is a list comprehension?",
    "How are default argument values evaluated?",
    "What does the yield keyword do in a function?",
    "How do I format a string with variables?",
    "What is the difference between a tuple and a list?",
)
# name -> what it measures, for the tables
TARGETS = {
    "search": "`GET /v1/search?q=...&k=4`",
    "predict": "`POST /v1/predict`, one row",
    "healthz": "`GET /healthz` (no token, no work): the HTTP floor",
}
DIRECT = {
    "search": "`StoreRetriever(search=make_search(store, ...), k=4).invoke(q)`",
    "predict": "champion pyfunc `model.predict(pd.DataFrame(rows))`",
}
HANDLER = {  # what the route calls, in this process: the API's own code without HTTP
    "search": "`Collection.search(q, 4, None, False)`",
    "predict": '`Champions.get(name).predict({"rows": rows}, max_rows)`',
}
Call = Callable[[int], None]  # one request or call; the argument picks the query
Worker = Callable[[], tuple[Call, Callable[[], None]]]  # a worker's call and its cleanup


@dataclass
class Cell:
    """Every round of one (target, mode, concurrency): latencies, walls, CPU seconds."""

    latencies: list[float] = field(default_factory=list)
    rps: list[float] = field(default_factory=list)
    requests: int = 0
    cpu_client: float = 0.0  # this process
    cpu_server: float = 0.0  # the `dagma serve` process (API rows only)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="per cell and round (200)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds, order rotated (3)")
    parser.add_argument("--warmup", type=int, default=50, help="untimed requests per target (50)")
    parser.add_argument(
        "--home", type=Path, help="reuse this lab home (it needs a champion and a collection)"
    )
    parser.add_argument("--quick", action="store_true", help="20 requests, 1 round: a smoke run")
    _report.add_docs_flags(parser)
    args = parser.parse_args()
    _report.check_docs_flags(parser, args, "quick")
    if args.quick:
        args.requests, args.repeat, args.warmup = 20, 1, 5
    tree = _report.start(args.write_docs, args.allow_dirty)
    load_start, started = os.getloadavg(), time.perf_counter()

    home = args.home.resolve() if args.home else Path(tempfile.mkdtemp(prefix="bench-api-"))
    secret = secrets.token_urlsafe(32)
    env = _report.clean_env(DAGMA_HOME=str(home), DAGMA_API_SECRET=secret)
    os.environ.clear()
    os.environ.update(env)  # the in-process calls read the same lab as the server
    try:
        build = 0.0 if args.home else _build_lab(home, env)
        with _serving(home, env) as (url, pid):
            cells = _measure(url, pid, args)
    finally:
        if not args.home:
            shutil.rmtree(home, ignore_errors=True)
    total = time.perf_counter() - started
    body = _report_body(cells, args, build, total, load_start, tree)
    print(body)
    print("\nReproduce: uv run python benchmarks/bench_api.py --write-docs")
    if args.write_docs:
        intro = (
            "Command: `uv run python benchmarks/bench_api.py --write-docs` (`--requests N` per "
            "cell and round, default 200; `--repeat N` rounds, default 3; `--home DIR` reuses a "
            "lab). A fresh home gets the champion and the collection from `dagma run --local "
            f"{' '.join(BUILD)}`. One `dagma serve` (uvicorn, one process, its access log on, as "
            "shipped; `DAGMA_API_MODEL_TTL` 1 s) runs on a free loopback port; a token with the "
            "`search` and `predict` scopes is issued. Each client is a thread with its own "
            "keep-alive `httpx.Client`, checking only the status; the direct rows call the same "
            "library functions in this process on as many threads: the retriever the API "
            "builds over the read-only store, and the champion's pyfunc model. The in-process "
            "handler rows call what the routes call (`Collection.search`, `Champions.get(...)"
            ".predict`), so API - handler is HTTP, auth and FastAPI, and handler - direct is "
            "the API's own code (the collection's version looked up per search, the rows "
            "validated against the signature, the response model). Untimed warm-up "
            "first, which also checks that the API and the direct call return the same hits "
            "and predictions. Each round runs every cell, the order rotated; rps is the median "
            "over rounds, p50/p95 pool every round's latencies, CPU is per request (the server "
            "process's, and this process's: the clients, or the direct calls). The machine has "
            "2 cores shared by the server and its clients, so 4 and 16 clients measure "
            "queueing, not parallelism, and their ratios compare two different queues: "
            "requests waiting for the server's one event loop and its thread pool, against "
            "threads waiting for one process's GIL. The cost of the layer itself is the "
            "1-client rows and the CPU columns, the least load-sensitive figures."
        )
        _report.write_titled_section(
            "(h) The API layer: `dagma serve` against the direct call (issue 20)",
            intro,
            body,
            MARK_START,
            MARK_END,
            tree,
            args.allow_dirty,
        )


def _build_lab(home: Path, env: dict[str, str]) -> float:
    print(f"building the lab in {home}: dagma run --local {' '.join(BUILD)}", flush=True)
    begun = time.perf_counter()
    proc = subprocess.run(
        [str(BIN / "dagma"), "run", "--local", *BUILD],
        env=env,
        cwd=home,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"building the lab failed:\n{proc.stdout}\n{proc.stderr}")
    return time.perf_counter() - begun


@contextmanager
def _serving(home: Path, env: dict[str, str]) -> Iterator[tuple[str, int]]:
    """`dagma serve` on a free loopback port until the block ends; its URL and pid."""
    from dagma.services.procs import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = home / "bench-serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dagma.cli", "serve", "--port", str(port)],
            env=env,
            cwd=home,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 120
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"dagma serve exited {proc.returncode}:\n{log.read_text()}")
                try:
                    if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit(f"dagma serve did not answer in 120 s:\n{log.read_text()}")
                time.sleep(0.3)
            yield url, proc.pid
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _rows() -> list[dict[str, Any]]:
    from dagma.lib.data import load_wine

    frame = load_wine().drop(columns=["target"]).head(1)
    return [{str(k): float(v) for k, v in row.items()} for row in frame.to_dict("records")]


def _measure(url: str, pid: int, args: argparse.Namespace) -> dict[tuple[str, str, int], Cell]:
    import mlflow
    import pandas as pd

    from dagma.api.auth import issue_token
    from dagma.api.predict import Champions
    from dagma.api.search import Collection
    from dagma.lib import tracking
    from dagma.lib.embeddings import get_embedder
    from dagma.lib.models import REGISTERED_MODEL
    from dagma.lib.rag import StoreRetriever
    from dagma.lib.retrieval import make_search
    from dagma.settings import get_settings

    settings = get_settings()
    if tracking.alias_version(settings.tracking_uri, REGISTERED_MODEL) is None:
        raise SystemExit(
            f"{settings.home} has no champion of {REGISTERED_MODEL!r}: "
            f"run `dagma run {' '.join(BUILD)}` there, or drop --home"
        )
    token = issue_token(settings, ["search", "predict"], datetime.timedelta(hours=2), "bench")
    headers = {"Authorization": f"Bearer {token}"}
    rows = _rows()
    store = settings.open_vector_store(read_only=True)
    embedder = get_embedder()
    search = make_search(store, settings.dagma_collection, embedder)
    mlflow.set_tracking_uri(settings.tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{REGISTERED_MODEL}@{tracking.CHAMPION}")

    def direct_search(i: int) -> list[Any]:
        return StoreRetriever(search=search, k=4).invoke(QUERIES[i % len(QUERIES)])

    def direct_predict(i: int) -> Any:
        return model.predict(pd.DataFrame(rows))

    collection = Collection(settings)
    champions = Champions(
        settings.tracking_uri,
        ttl=settings.dagma_api_model_ttl,
        max_rows=settings.dagma_api_max_rows,
    )

    def handler_search(i: int) -> Any:
        return collection.search(QUERIES[i % len(QUERIES)], 4, None, False)

    def handler_predict(i: int) -> Any:
        return champions.get(REGISTERED_MODEL).predict({"rows": rows}, champions.max_rows)

    def api(target: str) -> Worker:
        def worker() -> tuple[Call, Callable[[], None]]:
            client = httpx.Client(base_url=url, headers=headers, timeout=120)
            send: dict[str, Callable[[int], httpx.Response]] = {
                "search": lambda i: client.get(
                    "/v1/search", params={"q": QUERIES[i % len(QUERIES)], "k": 4}
                ),
                "predict": lambda i: client.post("/v1/predict", json={"rows": rows}),
                "healthz": lambda i: client.get("/healthz"),
            }

            def call(i: int) -> None:
                response = send[target](i)
                if response.status_code != 200:
                    raise RuntimeError(f"{target}: {response.status_code} {response.text}")

            return call, client.close

        return worker

    def direct(fn: Callable[[int], Any]) -> Worker:
        def call(i: int) -> None:
            fn(i)

        return lambda: (call, lambda: None)

    _check_same(url, headers, rows, direct_search, direct_predict)
    plans: dict[tuple[str, str], Worker] = {
        ("search", "api"): api("search"),
        ("search", "direct"): direct(direct_search),
        ("search", "handler"): direct(handler_search),
        ("predict", "api"): api("predict"),
        ("predict", "direct"): direct(direct_predict),
        ("predict", "handler"): direct(handler_predict),
        ("healthz", "api"): api("healthz"),
    }
    server = psutil.Process(pid)
    for (target, mode), worker in plans.items():  # warm-up: caches, the champion loaded
        _run(worker, 4, args.warmup, server)
        print(f"  warmed up {target} ({mode})", flush=True)
    cells = {(t, m, c): Cell() for (t, m) in plans for c in CONCURRENCY}
    order = list(cells)
    for rnd in range(args.repeat):
        shift = rnd * len(order) // max(args.repeat, 1)
        for target, mode, clients in order[shift:] + order[:shift]:
            cell = cells[(target, mode, clients)]
            latencies, wall, cpu_client, cpu_server = _run(
                plans[(target, mode)], clients, args.requests, server
            )
            cell.cpu_client += cpu_client
            cell.cpu_server += cpu_server
            cell.latencies += latencies
            cell.rps.append(len(latencies) / wall)
            cell.requests += len(latencies)
            print(
                f"  round {rnd + 1} {target} {mode} x{clients}: {len(latencies) / wall:,.0f} rps, "
                f"p50 {statistics.median(latencies) * 1e3:.2f} ms",
                flush=True,
            )
    store.close()
    collection.close()
    return cells


def _check_same(
    url: str,
    headers: dict[str, str],
    rows: list[dict[str, Any]],
    direct_search: Callable[[int], list[Any]],
    direct_predict: Callable[[int], Any],
) -> None:
    """The API and the direct call answer alike: the same hits in order, the same predictions."""
    with httpx.Client(base_url=url, headers=headers, timeout=300) as client:
        for i in range(len(QUERIES)):
            got = client.get("/v1/search", params={"q": QUERIES[i], "k": 4})
            got.raise_for_status()
            api_ids = [hit["id"] for hit in got.json()["hits"]]
            ids = [str(doc.metadata.get("id", "")) for doc in direct_search(i)]
            if api_ids != ids:
                raise SystemExit(f"search {QUERIES[i]!r}: the API gave {api_ids}, direct {ids}")
        got = client.post("/v1/predict", json={"rows": rows})
        got.raise_for_status()
        expected = list(direct_predict(0).tolist())
        if got.json()["predictions"] != expected:
            raise SystemExit(f"predict: the API gave {got.json()}, direct {expected}")


def _cpu(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def _run(
    worker: Worker, clients: int, total: int, server: psutil.Process
) -> tuple[list[float], float, float, float]:
    """`total` calls spread over `clients` threads started together: the latencies, the wall,
    and the CPU seconds of this process and of the server from the start to the last call (the
    clients are made before it)."""
    shares = [total // clients + (1 if i < total % clients else 0) for i in range(clients)]
    gate = threading.Barrier(clients + 1)
    latencies: list[list[float]] = [[] for _ in range(clients)]
    failures: list[BaseException] = []

    def work(n: int) -> None:
        try:
            call, close = worker()
        except BaseException as exc:
            failures.append(exc)
            gate.abort()
            return
        try:
            gate.wait(timeout=120)
            own = latencies[n]
            for i in range(shares[n]):
                begun = time.perf_counter()
                call(n * 1000 + i)
                own.append(time.perf_counter() - begun)
        except BaseException as exc:
            failures.append(exc)
        finally:
            close()

    threads = [threading.Thread(target=work, args=(n,), daemon=True) for n in range(clients)]
    for thread in threads:
        thread.start()
    with suppress(threading.BrokenBarrierError):  # a worker failed: reported below
        gate.wait(timeout=120)
    begun, cpu_client, cpu_server = time.perf_counter(), time.process_time(), _cpu(server)
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - begun
    cpu_client, cpu_server = time.process_time() - cpu_client, _cpu(server) - cpu_server
    if failures:
        raise SystemExit(f"a client failed: {failures[0]!r}")
    return [x for own in latencies for x in own], wall, cpu_client, cpu_server


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _report_body(
    cells: dict[tuple[str, str, int], Cell],
    args: argparse.Namespace,
    build: float,
    total: float,
    load_start: tuple[float, ...],
    tree: _report.Tree,
) -> str:
    packages = ("fastapi", "uvicorn", "starlette", "pydantic", "httpx", "mlflow")
    lines = [*_report.machine(load_start, os.getloadavg(), packages, tree), ""]
    built = f", {build:.0f} s of it building the lab" if build else " (a reused lab)"
    lines.append(
        f"{args.requests} requests per cell and round, {args.repeat} rounds, after "
        f"{args.warmup} untimed ones per target; the whole run took {total:.0f} s{built}."
    )
    lines += [
        "",
        "| What | Clients | Requests/s | p50 ms | p95 ms | Server CPU ms/req | Client CPU ms/req |",
        "|---|---|---|---|---|---|---|",
    ]
    stats: dict[tuple[str, str, int], tuple[float, float, float]] = {}
    for (target, mode, clients), cell in cells.items():
        rps = statistics.median(cell.rps)
        p50, p95 = _pct(cell.latencies, 0.5) * 1e3, _pct(cell.latencies, 0.95) * 1e3
        stats[(target, mode, clients)] = (rps, p50, p95)
        label = {
            "api": f"API {TARGETS[target]}",
            "direct": f"direct: {DIRECT.get(target)}",
            "handler": f"in-process handler: {HANDLER.get(target)}",
        }[mode]
        server = f"{cell.cpu_server / cell.requests * 1e3:.2f}" if mode == "api" else ""
        lines.append(
            f"| {label} | {clients} | {rps:,.0f} | {p50:.2f} | {p95:.2f} | {server} | "
            f"{cell.cpu_client / cell.requests * 1e3:.2f} |"
        )
    lines += [
        "",
        "| The API's overhead | Clients | p50 API / direct | Requests/s API / direct | "
        "p50 API - direct ms | of which in the handler's code ms | "
        "CPU/req API server / direct |",
        "|---|---|---|---|---|---|---|",
    ]
    for target in DIRECT:
        for clients in CONCURRENCY:
            rps_a, p50_a, _ = stats[(target, "api", clients)]
            rps_d, p50_d, _ = stats[(target, "direct", clients)]
            p50_h = stats[(target, "handler", clients)][1]
            api, direct = cells[(target, "api", clients)], cells[(target, "direct", clients)]
            cpu = (api.cpu_server / api.requests) / (direct.cpu_client / direct.requests)
            lines.append(
                f"| {target} | {clients} | {p50_a / p50_d:.2f}x | {rps_a / rps_d:.2f}x | "
                f"{p50_a - p50_d:.2f} | {p50_h - p50_d:.2f} | {cpu:.2f}x |"
            )
    return "\n".join([*lines, "", *_summary(cells, stats)])


def _summary(
    cells: dict[tuple[str, str, int], Cell],
    stats: dict[tuple[str, str, int], tuple[float, float, float]],
) -> list[str]:
    """The overhead in words, from this run's numbers."""

    def cpu(target: str, mode: str) -> float:  # ms per request over every concurrency
        own = [cells[(target, mode, c)] for c in CONCURRENCY]
        spent = sum(c.cpu_server if mode == "api" else c.cpu_client for c in own)
        return spent / sum(c.requests for c in own) * 1e3

    floor = cpu("healthz", "api")
    lines = ["The API's overhead, from this run:", ""]
    for target in DIRECT:
        one = {mode: stats[(target, mode, 1)] for mode in ("api", "direct", "handler")}
        best = {
            mode: max(stats[(target, mode, c)][0] for c in CONCURRENCY)
            for mode in ("api", "direct")
        }
        lines.append(
            f"- {target}: at 1 client the API's p50 is {one['api'][1]:.2f} ms against "
            f"{one['direct'][1]:.2f} ms for the direct call ({one['api'][1] / one['direct'][1]:.1f}x, "
            f"{one['api'][1] - one['direct'][1]:+.2f} ms; the handler's own code "
            f"{one['handler'][1] - one['direct'][1]:+.2f} ms of it). The server spends "
            f"{cpu(target, 'api'):.2f} ms of CPU per request against {cpu(target, 'direct'):.2f} "
            f"ms for the direct call ({cpu(target, 'api') / cpu(target, 'direct'):.1f}x; an "
            f"unauthenticated `/healthz` costs it {floor:.2f} ms). Best throughput "
            f"{best['api']:,.0f} requests/s through the API against {best['direct']:,.0f} "
            f"direct ({best['api'] / best['direct']:.2f}x)."
        )
    return lines


if __name__ == "__main__":
    main()
