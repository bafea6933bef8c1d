"""A 60-partition backfill of the daily notebook through services mode (issue 9, item 3).

For each run limit N (the queue's `max_concurrent_runs`), a fresh services lab (Postgres, MLflow
server, webserver, daemon, gRPC code server) seeds `wine_model`, then a backfill of 60 daily
partitions of `wine_daily_scores` is launched through GraphQL. Reported: wall time, partitions
per minute, the most runs seen in progress at once (must not exceed N), and, as the plain
alternative, the same 60 partitions run by a `papermill` loop in one process.

    uv run python benchmarks/bench_backfill.py [--limits 1,2] [--partitions 60] [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _report  # beside this script: `python benchmarks/<this>.py` finds it
from _report import clean_env, fmt

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ASSET = "wine_daily_scores"
LOCATION, REPOSITORY, JOB = "dagma", "__repository__", "__ASSET_JOB"
MARK_START, MARK_END = "<!-- bench_backfill:start -->", "<!-- bench_backfill:end -->"
DONE = {"COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED"}


@dataclass
class Result:
    limit: int
    partitions: int
    seconds: float
    succeeded: int
    failed: int
    max_in_progress: int
    mean_run_seconds: float
    up_seconds: float

    @property
    def per_minute(self) -> float:
        return 60 * self.partitions / self.seconds


def partition_keys(count: int) -> list[str]:
    import dagster as dg

    days = dg.DailyPartitionsDefinition(start_date="2026-09-01").get_partition_keys()
    if len(days) < count:
        raise SystemExit(f"only {len(days)} daily partitions exist; ask for at most that many")
    return days[-count:]


class ServicesLab:
    def __init__(self, limit: int) -> None:
        from dagma.services.config import ServicesConfig
        from dagma.services.procs import free_port

        self.home = Path(tempfile.mkdtemp(prefix=f"dagma-backfill-{limit}-"))
        self.home.chmod(0o755)  # Postgres runs unprivileged when this runs as root
        ports = {n: free_port() for n in ("PG", "MLFLOW", "DAGSTER", "GRPC")}
        self.env = clean_env(
            DAGMA_HOME=str(self.home),
            DAGMA_AUTOMATION="false",  # only the backfill's runs, none from sensors
            DAGSTER_MAX_CONCURRENT_RUNS=str(limit),
            **{f"DAGMA_{n}_PORT": str(p) for n, p in ports.items()},
        )
        for name in [k for k in self.env if k.startswith(("DAGSTER_HOME", "MLFLOW_"))]:
            self.env.pop(name)
        self.config = ServicesConfig(
            dagma_home=self.home,
            dagma_pg_port=ports["PG"],
            dagma_mlflow_port=ports["MLFLOW"],
            dagma_dagster_port=ports["DAGSTER"],
            dagma_grpc_port=ports["GRPC"],
            dagster_max_concurrent_runs=limit,
        )

    def cli(self, *args: str) -> None:
        proc = subprocess.run(
            [sys.executable, "-m", "dagma.services.cli", *args],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
            timeout=900,
        )
        if proc.returncode != 0:
            raise SystemExit(f"dagma services {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}")

    def client(self) -> Any:
        from dagster_graphql import DagsterGraphQLClient

        return DagsterGraphQLClient(
            "127.0.0.1", port_number=self.config.dagma_dagster_port, timeout=60
        )

    def gql(self, query: str, variables: dict[str, Any] | None = None) -> Any:
        return self.client()._execute(query, variables or {})

    def seed(self) -> None:
        client = self.client()
        run_id = client.submit_job_execution(
            JOB,
            repository_location_name=LOCATION,
            repository_name=REPOSITORY,
            asset_selection=["wine_table", "wine_model"],
        )
        while (status := client.get_run_status(run_id).value) not in {"SUCCESS", "FAILURE"}:
            time.sleep(1)
        if status != "SUCCESS":
            raise SystemExit(f"seeding wine_model failed: run {run_id}")

    def backfill(self, keys: list[str]) -> str:
        result = self.gql(
            """mutation($p: LaunchBackfillParams!) {
              launchPartitionBackfill(backfillParams: $p) {
                __typename ... on LaunchBackfillSuccess { backfillId }
                ... on PythonError { message } ... on InvalidSubsetError { message }
              }
            }""",
            {"p": {"partitionNames": keys, "assetSelection": [{"path": [ASSET]}]}},
        )["launchPartitionBackfill"]
        if result["__typename"] != "LaunchBackfillSuccess":
            raise SystemExit(f"backfill not launched: {result}")
        return str(result["backfillId"])

    def backfill_runs(self, backfill_id: str) -> tuple[str, list[dict[str, Any]]]:
        data = self.gql(
            """query($id: String!, $tags: [ExecutionTag!]) {
              partitionBackfillOrError(backfillId: $id) {
                ... on PartitionBackfill { status }
              }
              runsOrError(filter: {tags: $tags}) {
                ... on Runs { results { runId status startTime endTime } }
              }
            }""",
            {"id": backfill_id, "tags": [{"key": "dagster/backfill", "value": backfill_id}]},
        )
        return data["partitionBackfillOrError"]["status"], data["runsOrError"]["results"]


def run_backfill(limit: int, keys: list[str]) -> tuple[Result, ServicesLab]:
    lab = ServicesLab(limit)
    started = time.monotonic()
    lab.cli("up")
    up_seconds = time.monotonic() - started
    try:
        lab.seed()
        print(f"  N={limit}: services up in {up_seconds:.0f} s, wine_model seeded", flush=True)
        launched = time.time()
        backfill_id = lab.backfill(keys)
        max_in_progress, last = 0, -1
        while True:
            status, runs = lab.backfill_runs(backfill_id)
            active = sum(r["status"] in {"STARTING", "STARTED", "CANCELING"} for r in runs)
            max_in_progress = max(max_in_progress, active)
            finished = [r for r in runs if r["status"] in {"SUCCESS", "FAILURE", "CANCELED"}]
            if len(finished) != last:
                last = len(finished)
                print(f"  N={limit}: {last}/{len(keys)} partitions done", flush=True)
            if status in DONE and len(finished) == len(runs):
                break
            time.sleep(1)
        end = max((r["endTime"] or time.time()) for r in runs)
        # Overlap from the runs' own start/end times, which no poll can miss.
        edges = sorted(
            [(r["startTime"], 1) for r in runs if r["startTime"]]
            + [(r["endTime"], -1) for r in runs if r["endTime"]]
        )
        level = 0
        for _, step in edges:
            level += step
            max_in_progress = max(max_in_progress, level)
        durations = [r["endTime"] - r["startTime"] for r in runs if r["startTime"] and r["endTime"]]
        result = Result(
            limit=limit,
            partitions=len(keys),
            seconds=end - launched,
            succeeded=sum(r["status"] == "SUCCESS" for r in runs),
            failed=sum(r["status"] != "SUCCESS" for r in runs),
            max_in_progress=max_in_progress,
            mean_run_seconds=sum(durations) / max(len(durations), 1),
            up_seconds=up_seconds,
        )
        return result, lab
    except BaseException:
        lab.cli("down")
        raise


def papermill_loop(lab: ServicesLab, keys: list[str]) -> float:
    """The plain alternative: the same notebook, one partition after another, in one process."""
    from dagma.services.supervisor import Topology

    env = {**Topology(lab.config).env(lab.config.passwords()), "DAGMA_HOME": str(lab.home)}
    out = lab.home / "papermill"
    out.mkdir()
    code = (
        "import sys, papermill as pm\n"
        "for key in sys.argv[2:]:\n"
        f"    pm.execute_notebook(sys.argv[1], '{out}/' + key + '.ipynb',"
        " parameters={'partition_key': key}, progress_bar=False)\n"
    )
    started = time.monotonic()
    subprocess.run(
        [sys.executable, "-c", code, str(ROOT / "notebooks" / f"{ASSET}.ipynb"), *keys],
        env=env,
        cwd=lab.home,
        check=True,
        capture_output=True,
        timeout=3600,
    )
    return time.monotonic() - started


def report(
    results: list[Result],
    papermill: float | None,
    keys: list[str],
    machine: list[str],
    papermill_count: int,
) -> str:
    one = next((r for r in results if r.limit == 1), results[0])
    lines = [
        MARK_START,
        "## `bench_backfill.py`: 60 daily partitions through services mode (issue 9)",
        "",
        f"A backfill of {len(keys)} partitions of `{ASSET}` ({keys[0]} to {keys[-1]}) launched "
        "through GraphQL on a fresh services lab per run limit N (`DAGSTER_MAX_CONCURRENT_RUNS`).",
        "Each partition is its own run: queue, daemon, run worker, step process, kernel and the "
        'MLflow server. "Most at once" is the peak of overlapping runs, from their own start and '
        "end times.",
        "",
        "| Run limit N | Wall time | Partitions/min | Speed-up vs N=1 | Most at once | Mean run | "
        "Succeeded |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.limit} | {fmt(r.seconds)} s | {r.per_minute:.1f} | "
            f"{one.seconds / r.seconds:.2f}x | {r.max_in_progress} | {fmt(r.mean_run_seconds)} s | "
            f"{r.succeeded}/{r.partitions} |"
        )
    if papermill is not None:
        best = min(results, key=lambda r: r.seconds)
        rate = 60 * min(papermill_count, len(keys)) / papermill
        lines += [
            "",
            f"The plain alternative, a `papermill` loop over the first {papermill_count} of these "
            f"partitions in one process against the same lab: {fmt(papermill)} s, "
            f"{rate:.1f} partitions/min. The best backfill (N={best.limit}) ran "
            f"{best.per_minute / rate:.2f}x that rate, with every partition its own run: queued, "
            "retried, tracked in MLflow and visible in the UI.",
        ]
    lines += [
        "",
        "```bash",
        "uv run python benchmarks/bench_backfill.py --limits 1,2 --write-docs",
        "```",
        "",
        *machine,
        MARK_END,
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limits", default="1,2", help="run limits to measure, e.g. 1,2")
    parser.add_argument("--partitions", type=int, default=60)
    parser.add_argument(
        "--papermill-partitions",
        type=int,
        default=12,
        help="partitions the papermill loop runs (0: skip); its rate is per partition",
    )
    _report.add_docs_flags(parser)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    _report.check_docs_flags(parser, args)
    tree = _report.start(args.write_docs, args.allow_dirty)
    keys = partition_keys(args.partitions)
    load_start = os.getloadavg()
    results: list[Result] = []
    papermill: float | None = None
    for limit in (int(x) for x in args.limits.split(",")):
        result, lab = run_backfill(limit, keys)
        try:
            print(json.dumps(result.__dict__), flush=True)
            results.append(result)
            if papermill is None and args.papermill_partitions:
                papermill = papermill_loop(lab, keys[: args.papermill_partitions])
                print(f"  papermill loop: {papermill:.1f} s", flush=True)
        finally:
            lab.cli("down")
            shutil.rmtree(lab.home, ignore_errors=True)
    machine = _report.machine(load_start, os.getloadavg(), ("dagster", "mlflow", "papermill"), tree)
    text = report(results, papermill, keys, machine, args.papermill_partitions)
    print(text)
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in results], indent=2))
    if args.write_docs:
        _report.write_section(text, MARK_START, MARK_END, tree, args.allow_dirty)
    bad = [r for r in results if r.failed or r.max_in_progress > r.limit]
    if bad:
        raise SystemExit(f"backfill broke its limits or failed: {bad}")


if __name__ == "__main__":
    main()
