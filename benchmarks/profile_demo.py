"""A cold `dagma demo`, phase by phase (issue 18): the CLI's start, each step, inside each
notebook, the local model's answers and the shutdown; medians over fresh homes.

    .venv/bin/python benchmarks/profile_demo.py                       # this checkout, 2 demos
    .venv/bin/python benchmarks/profile_demo.py --repeat 3 --tree before=/tmp/old --tree .

Each `--tree` is a source tree (a checkout, or `git archive COMMIT | tar -x -C DIR`) whose
`src/` goes first on PYTHONPATH, so the demo, its step processes and its kernels all run that
tree's code; the trees take turns, and each demo gets a fresh DAGMA_HOME. Phases come from the
run's Dagster event log (step start and success), papermill's timestamps in each executed
notebook, and the answers `rag_eval` logged to MLflow. Nothing here changes the lab.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from _report import clean_env  # beside this script: `python benchmarks/<this>.py` finds it

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TIMEOUT = 600
# rag_eval's quality measures: a change that keeps the answers keeps every one of them.
QUALITY = (
    "hit_at_1",
    "hit_at_5",
    "mrr",
    "citation_precision",
    "citation_validity",
    "faithfulness",
    "answered",
)


# ---------------------------------------------------------------------------------------------
# Reading one demo's home (run in a child process: it imports Dagster).


def _stamp(text: str | None) -> float | None:
    return datetime.fromisoformat(text).timestamp() if text else None


def notebook_phases(ipynb: Path) -> dict[str, float]:
    """Kernel start, the first (imports) cell, the other cells and what follows the last cell,
    from papermill's timestamps in an executed copy."""
    nb = json.loads(ipynb.read_text())
    meta = nb.get("metadata", {}).get("papermill", {})
    start, end = _stamp(meta.get("start_time")), _stamp(meta.get("end_time"))
    cells = [
        c["metadata"]["papermill"]
        for c in nb.get("cells", [])
        if c.get("cell_type") == "code"
        and c.get("metadata", {}).get("papermill", {}).get("start_time")
    ]
    if start is None or end is None or not cells:
        return {}
    first, last = _stamp(cells[0]["start_time"]), _stamp(cells[-1]["end_time"])
    assert first is not None and last is not None
    return {
        "kernel start": first - start,
        "first cell (imports)": float(cells[0].get("duration") or 0.0),
        "other cells": sum(float(c.get("duration") or 0.0) for c in cells[1:]),
        "after the last cell (kernel shutdown)": end - last,
        "papermill total": end - start,
    }


def rag_phases(home: Path, run_id: str) -> dict[str, float]:
    """rag_eval's answers: how many, their summed latency (answers/sample_answer artifacts of
    its MLflow run) and the wall time from the first trace's start to the last one's end."""
    found = list((home / "mlflow").glob(f"**/{run_id}/artifacts"))
    if not found:
        return {}
    out: dict[str, float] = {}
    rows = found[0] / "answer_rows.json"
    if rows.is_file():
        table = json.loads(rows.read_text())
        column = table["columns"].index("latency_s")
        out["answers"] = sum(float(r[column]) for r in table["data"])
        out["answered"] = float(len(table["data"]))
    sample = found[0] / "sample_answer.json"
    if sample.is_file():
        out["sample answer"] = float(json.loads(sample.read_text())["latency_s"])
    with sqlite3.connect(home / "mlflow" / "mlflow.db") as db:
        spans = db.execute(
            "SELECT t.timestamp_ms, t.execution_time_ms FROM trace_info t JOIN "
            "trace_request_metadata m ON m.request_id = t.request_id "
            "WHERE m.key = 'mlflow.sourceRun' AND m.value = ?",
            (run_id,),
        ).fetchall()
    if spans:
        out["traced"] = float(len(spans))
        out["answering wall"] = (max(a + b for a, b in spans) - min(a for a, _ in spans)) / 1e3
    return out


def worker(home: Path) -> None:
    """Print one JSON line: run span, step intervals, notebook and rag_eval phases, quality."""
    os.environ["DAGSTER_HOME"] = str(home / "dagster")
    import dagster as dg

    kind = dg.DagsterEventType
    instance = dg.DagsterInstance.get()
    first = last = None
    steps: dict[str, list[float]] = {}
    metadata: dict[str, dict[str, Any]] = {}
    for run in instance.get_runs():
        for entry in instance.all_logs(run.run_id):
            event, t = entry.dagster_event, entry.timestamp
            if event is None:
                continue
            if event.event_type in (kind.RUN_START, kind.RUN_SUCCESS, kind.RUN_FAILURE):
                first = t if first is None else min(first, t)
                last = t if last is None else max(last, t)
            elif event.event_type == kind.STEP_START:
                steps[entry.step_key] = [t, t]
            elif event.event_type in (kind.STEP_SUCCESS, kind.STEP_FAILURE):
                steps.setdefault(entry.step_key, [t, t])[1] = t
            elif event.event_type == kind.ASSET_MATERIALIZATION:
                mat = event.step_materialization_data.materialization
                metadata[entry.step_key] = {k: v.value for k, v in mat.metadata.items()}
    notebooks = {
        path.parent.name: notebook_phases(path)
        for path in (home / "runs").glob("*/*/*.ipynb")
        if path.stem == path.parent.name
    }
    rag = metadata.get("rag_eval", {})
    value = rag.get("value") if isinstance(rag.get("value"), dict) else {}
    run_id = str(rag.get("mlflow_run", "")).rstrip("/").rpartition("/")[2] or None
    sample = (value.get("sample") or {}).get("text", "")
    quality = {k: rag[k] for k in QUALITY if isinstance(rag.get(k), int | float)}
    answers = str(rag.get("sample_answers", "")) + sample  # the answers' texts, shown in part
    quality["answers sha1"] = hashlib.sha1(answers.encode()).hexdigest()[:10]
    out = {
        "first": first,
        "last": last,
        "steps": steps,
        "notebooks": {k: v for k, v in notebooks.items() if v},
        "rag": rag_phases(home, run_id) if run_id else {},
        "quality": quality,
    }
    print(json.dumps(out, default=str))


# ---------------------------------------------------------------------------------------------
# One demo, and its phases.


def union(intervals: list[list[float]]) -> float:
    """Seconds covered by at least one interval."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def phases_of(read: dict[str, Any], started: float, ended: float) -> dict[str, float]:
    """Named phases (seconds) of one demo; their order is the order steps started."""
    out: dict[str, float] = {}
    if read["first"] is None:
        return out
    out["command start to first run start (imports, definitions, instance)"] = (
        read["first"] - started
    )
    steps = sorted(read["steps"].items(), key=lambda kv: kv[1][0])
    for key, (a, b) in steps:
        out[f"step {key}"] = b - a
        nb = read["notebooks"].get(key)
        if nb:
            for name, seconds in nb.items():
                if name != "papermill total":
                    out[f"  {key}: {name}"] = seconds
            out[f"  {key}: in the step, outside papermill"] = (b - a) - nb["papermill total"]
        rag = read["rag"]
        if key == "rag_eval" and rag.get("answering wall") is not None:
            n = int(rag["traced"])
            summed = rag.get("answers", 0.0) + rag.get("sample answer", 0.0)
            out[f"  rag_eval: {n} answers, first start to last end (retrieval + model)"] = rag[
                "answering wall"
            ]
            out[f"  rag_eval: {n} answers, their latencies summed"] = summed
            out["  rag_eval: the rest (model load, retrieval scoring, MLflow, figure)"] = (
                b - a
            ) - rag["answering wall"]
    span = read["last"] - read["first"]
    out["runs, outside any step (Dagster's runs and steps, IO)"] = span - union(
        [v for _, v in steps]
    )
    out["runs, first start to last end"] = span
    out["last run end to exit (summary, shutdown)"] = ended - read["last"]
    return out


def run_demo(tree: Path, base: Path, processes: int | None) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="demo-", dir=base))
    env = clean_env(DAGMA_HOME=str(work / "home"))
    if tree.resolve() != ROOT:
        env["PYTHONPATH"] = os.pathsep.join(
            [str(tree / "src"), *filter(None, [env.get("PYTHONPATH")])]
        )
    cmd = [str(BIN / "dagma"), "demo", "--json"]
    if processes is not None:
        cmd += ["--processes", str(processes)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = os.getloadavg()[0]
    started = time.time()
    done = subprocess.run(
        cmd, cwd=work, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    ended = time.time()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if done.returncode != 0:
        raise SystemExit(f"dagma demo failed in {work}:\n{done.stderr[-3000:]}")
    read = subprocess.run(
        [sys.executable, __file__, "--worker", str(work / "home")],
        env=clean_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    info = json.loads(read.stdout.strip().splitlines()[-1])
    shutil.rmtree(work, ignore_errors=True)
    return {
        "wall": ended - started,
        "cpu": cpu,
        "load": load,
        "phases": phases_of(info, started, ended),
        "quality": info["quality"],
    }


# ---------------------------------------------------------------------------------------------
# The table.


def table(results: dict[str, list[dict[str, Any]]]) -> str:
    labels = list(results)
    names: list[str] = []
    for runs in results.values():
        for r in runs:
            names += [n for n in r["phases"] if n not in names]
    head = "| Phase (median s) | " + " | ".join(f"{label}" for label in labels) + " |"
    lines = [head, "|---|" + "---:|" * len(labels)]

    def cell(label: str, pick: Any) -> str:
        values = [v for r in results[label] if (v := pick(r)) is not None]
        return f"{statistics.median(values):.2f}" if values else ""

    for name in names:
        shown = name.replace("  ", "&nbsp;&nbsp;&nbsp;", 1) if name.startswith("  ") else name
        row = [cell(label, lambda r, n=name: r["phases"].get(n)) for label in labels]
        lines.append(f"| {shown} | " + " | ".join(row) + " |")
    lines.append(
        "| **wall, command start to exit** | "
        + " | ".join(f"**{cell(label, lambda r: r['wall'])}**" for label in labels)
        + " |"
    )
    lines.append(
        "| CPU seconds (the whole process tree) | "
        + " | ".join(cell(label, lambda r: r["cpu"]) for label in labels)
        + " |"
    )
    walls = [
        f"{label}: " + ", ".join(f"{r['wall']:.1f}" for r in results[label]) for label in labels
    ]
    lines += ["", "Each demo's wall time (s), in the order run: " + "; ".join(walls) + "."]
    return "\n".join(lines)


def same_quality(results: dict[str, list[dict[str, Any]]]) -> str:
    seen = {json.dumps(r["quality"], sort_keys=True) for runs in results.values() for r in runs}
    if len(seen) == 1:
        return "Every demo gave the same rag_eval measures and sample answer: " + next(iter(seen))
    return "rag_eval's measures or sample answer DIFFER between demos: " + " / ".join(sorted(seen))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2, help="demos per tree (2)")
    parser.add_argument(
        "--tree",
        action="append",
        default=[],
        help="[LABEL=]DIR of a source tree to run; repeat to compare (default: this checkout)",
    )
    parser.add_argument("--processes", type=int, help="pass --processes N to the demo")
    parser.add_argument("--json", type=Path, help="also write every demo's phases here")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    trees: dict[str, Path] = {}
    for item in args.tree or [str(ROOT)]:
        label, _, path = item.rpartition("=")
        folder = Path(path).resolve()
        if not (folder / "src" / "dagma").is_dir():
            parser.error(f"--tree {item}: {folder} has no src/dagma; give a checkout of Dagma")
        trees[label or folder.name] = folder
    results: dict[str, list[dict[str, Any]]] = {label: [] for label in trees}
    with tempfile.TemporaryDirectory(prefix="profile_demo-") as tmp:
        for rep in range(args.repeat):
            order = list(trees.items())
            shift = rep % len(order)
            for label, folder in order[shift:] + order[:shift]:
                r = run_demo(folder, Path(tmp), args.processes)
                results[label].append(r)
                print(
                    f"{label} #{rep + 1}: {r['wall']:.1f} s wall, {r['cpu']:.1f} CPU s, "
                    f"load {r['load']:.2f} at start",
                    file=sys.stderr,
                    flush=True,
                )
    print(table(results))
    print()
    print(same_quality(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
