"""Issue 18's warm rows: the trivial notebook through `dagma run` while the lab's services are up
(the webserver, the daemon's queue, a run worker forked from the warm code server, a spare
kernel), beside the papermill CLI, plain dagstermill's CLI and a cold `dagma run --local`, in one
run, interleaved, medians and ratios.

    uv run python benchmarks/bench_warm.py [--repeat 4] [--write-docs]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import _report  # beside this script: `python benchmarks/<this>.py` finds it
import bench_notebook as nbb
from _report import fmt
from bench_backfill import ServicesLab

ROOT = Path(__file__).resolve().parents[1]
MARK_START, MARK_END = "<!-- bench_warm:start -->", "<!-- bench_warm:end -->"
TRIVIAL = nbb.TRIVIAL
# Issue 18's targets for the warm path (ratios of medians, lower is better).
TARGETS = {"warm/papermill": 1.0, "warm/dagstermill_cli": 0.25}
Prepare = Callable[[Path], tuple[list[str], dict[str, str]]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=4, help="runs per alternative (4)")
    _report.add_docs_flags(parser)
    args = parser.parse_args()
    _report.check_docs_flags(parser, args)
    tree = _report.start(args.write_docs, args.allow_dirty)
    load_start, started = os.getloadavg(), time.perf_counter()

    lab = ServicesLab(limit=2)
    notebooks = nbb._dagma_notebooks(lab.home / "work", nbb.trivial_notebook)
    lab.env["DAGMA_NOTEBOOKS_DIR"] = str(notebooks)
    lab.cli("up")
    warm_cmd = [str(nbb.BIN / "dagma"), "run", TRIVIAL]

    def warm(work: Path) -> tuple[list[str], dict[str, str]]:
        return warm_cmd, lab.env

    def cold(work: Path) -> tuple[list[str], dict[str, str]]:
        cmd, env = nbb.prep_trivial_run(work)
        return [*cmd, "--local"], env

    alternatives: dict[str, tuple[str, Prepare]] = {
        "papermill": ("papermill CLI", nbb.prep_trivial_papermill),
        "warm": (f"`dagma run {TRIVIAL}`, the lab's services up (warm)", warm),
        "cold": (f"`dagma run {TRIVIAL} --local`, fresh embedded home (cold)", cold),
        "dagstermill_cli": (
            "plain dagstermill: `dagster asset materialize`, fresh home",
            nbb.prep_trivial_dagstermill_cli,
        ),
    }
    times: dict[str, list[float]] = {key: [] for key in alternatives}
    try:
        first = subprocess.run(warm_cmd, env=lab.env, capture_output=True, text=True, timeout=600)
        if first.returncode != 0 or "in the lab's services" not in first.stdout:
            raise SystemExit(f"the first warm run failed:\n{first.stdout}{first.stderr}")
        keys = list(alternatives)
        for rep in range(args.repeat):
            for key in keys[rep % len(keys) :] + keys[: rep % len(keys)]:
                times[key].append(_time_one(key, alternatives[key][1]))
                print(f"  {key}: {times[key][-1]:.2f} s", flush=True)
    finally:
        lab.cli("down")
        shutil.rmtree(lab.home, ignore_errors=True)
    total = time.perf_counter() - started
    body = _report_body(alternatives, times, args.repeat, total, load_start, tree)
    print(body)
    if args.write_docs:
        intro = (
            "Command: `uv run python benchmarks/bench_warm.py --write-docs` (`--repeat N`, "
            "default 4). A services lab (`dagma services up`: Postgres, MLflow server, "
            "webserver, daemon, the warm code server) is started once with the trivial "
            "notebook beside copies of `notebooks/`, and one warm-up run goes through it "
            "untimed. Then each alternative runs in turn, the order rotated per repetition: the "
            "warm `dagma run` submits to the webserver, the daemon dequeues it (every second), "
            "the code server forks a run worker from its warm template and the notebook starts "
            "on a spare kernel; the others run in fresh temp folders. Each warm run is checked "
            "untimed for the lab's message; the cold ones as in `bench_notebook.py`."
        )
        _report.write_titled_section(
            "(g) Warm execution: `dagma run` with the lab up (issue 18)",
            intro,
            body,
            MARK_START,
            MARK_END,
            tree,
            args.allow_dirty,
        )


def _time_one(key: str, prepare: Prepare) -> float:
    work = Path(tempfile.mkdtemp(prefix=f"bench-warm-{key}-"))
    try:
        cmd, env = prepare(work)
        started = time.perf_counter()
        proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
        seconds = time.perf_counter() - started
        if proc.returncode != 0:
            raise SystemExit(f"{key} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        if key == "warm" and "in the lab's services" not in proc.stdout:
            raise SystemExit(f"the warm run did not go through the services:\n{proc.stdout}")
        return seconds
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _report_body(
    alternatives: dict[str, tuple[str, Prepare]],
    times: dict[str, list[float]],
    repeat: int,
    total: float,
    load_start: tuple[float, ...],
    tree: _report.Tree,
) -> str:
    packages = ("dagster", "papermill", "jupyter_client", "ipykernel")
    lines = [*_report.machine(load_start, os.getloadavg(), packages, tree), ""]
    lines.append(
        f"Each alternative ran {repeat}x interleaved; the whole run took {total:.0f} s, "
        "services start included."
    )
    lines += ["", "| Trivial notebook | Median s | Min-max s |", "|---|---|---|"]
    med = {k: statistics.median(v) for k, v in times.items() if v}
    for key, (label, _) in alternatives.items():
        if times[key]:
            lines.append(
                f"| {label} | {fmt(med[key])} | {fmt(min(times[key]))}-{fmt(max(times[key]))} |"
            )
    lines += ["", "| Ratio of medians | Value | Target | Holds |", "|---|---|---|---|"]
    ratios = {
        "warm/papermill": ("warm `dagma run` / papermill CLI", "warm", "papermill"),
        "warm/dagstermill_cli": (
            "warm `dagma run` / plain dagstermill CLI",
            "warm",
            "dagstermill_cli",
        ),
        "warm/cold": ("warm `dagma run` / cold `dagma run --local`", "warm", "cold"),
        "cold/papermill": ("cold `dagma run --local` / papermill CLI", "cold", "papermill"),
    }
    for name, (label, top, bottom) in ratios.items():
        if top in med and bottom in med:
            value = med[top] / med[bottom]
            target = TARGETS.get(name)
            holds = "" if target is None else ("yes" if value <= target else "**no**")
            shown = "" if target is None else f"<= {target}x"
            lines.append(f"| {label} | {value:.2f}x | {shown} | {holds} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
