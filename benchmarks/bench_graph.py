"""Benchmarks (b), (c) and (f) of issue 7: the demo graph cold and as a no-op, a 4-notebook
fan-out on 1 and 2 processes, and loading the code location; interleaved, medians and ratios.

    uv run python benchmarks/bench_graph.py [--repeat 3] [--write-docs]
    uv run python benchmarks/bench_graph.py --quick --json ratios.json   # the CI gate's run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import _report  # beside this script: `python benchmarks/<this>.py` finds it
from _report import clean_env, fmt

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
BIN = Path(sys.executable).parent
FAN = [f"fan_{i}" for i in range(1, 5)]
TREES = {"full": 300, "quick": 120}  # RandomForest size: ~2-3 s per fit on a quiet core
TIMEOUT = 900
# Absolute targets of issue 7, in seconds, and the parallel speed-up.
TARGETS = {"demo_cold": 45.0, "noop": 5.0, "load_defs": 3.0, "speedup": 1.6}
MARK_START, MARK_END = "<!-- bench_graph:start -->", "<!-- bench_graph:end -->"
# The same work in the notebooks and in the plain-Python reference.
FIT = """\
from sklearn.datasets import load_digits
from sklearn.ensemble import RandomForestClassifier
from sklearn.model_selection import cross_val_score

X, y = load_digits(return_X_y=True)
model = RandomForestClassifier(n_estimators=trees, random_state=seed, n_jobs=1)
accuracy = float(cross_val_score(model, X, y, cv=3).mean())"""


# ---------------------------------------------------------------------------------------------
# Files: the fan-out notebooks beside copies of the production notebooks.


def fan_notebook(folder: Path, name: str, trees: int) -> Path:
    import nbformat
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

    params = new_code_cell(f'asset = {{"group": "bench"}}\nseed: int = 0\ntrees: int = {trees}')
    params.metadata["tags"] = ["parameters"]
    cells = [
        new_markdown_cell(f"# {name}\n\nA random forest on digits, for the fan-out benchmark."),
        params,
        new_code_cell(FIT),
        new_code_cell('from dagma import nb\n\nnb.context().output({"accuracy": accuracy})'),
    ]
    kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb = new_notebook(
        cells=cells, metadata={"kernelspec": kernelspec, "language_info": {"name": "python"}}
    )
    path = folder / f"{name}.ipynb"
    nbformat.write(nb, path)
    return path


def notebooks_dir(work: Path, trees: int) -> Path:
    """Copies of notebooks/ (the Python-defined assets need them to load) and the fan-out."""
    folder = work / "nb"
    folder.mkdir(parents=True, exist_ok=True)
    for path in (ROOT / "notebooks").glob("*.ipynb"):
        shutil.copy(path, folder)
    for name in FAN:
        fan_notebook(folder, name, trees)
    return folder


# ---------------------------------------------------------------------------------------------
# Workers, run in a child process.


def worker_steps(home: Path) -> None:
    """Per-step times of every run in `home`'s Dagster instance, as JSON on the last line."""
    os.environ["DAGSTER_HOME"] = str(home / "dagster")
    import dagster as dg

    kind = dg.DagsterEventType
    instance = dg.DagsterInstance.get()
    out: dict[str, float] = {}
    first = last = None
    for run in instance.get_runs():
        starting: dict[str, float] = {}
        started: dict[str, float] = {}
        for entry in instance.all_logs(run.run_id):
            event = entry.dagster_event
            if event is None:
                continue
            t = entry.timestamp
            if event.event_type in (kind.RUN_START, kind.RUN_SUCCESS, kind.RUN_FAILURE):
                first = t if first is None else min(first, t)
                last = t if last is None else max(last, t)
            elif event.event_type == kind.STEP_WORKER_STARTING:
                starting[entry.step_key] = t
            elif event.event_type == kind.STEP_START:
                started[entry.step_key] = t
                if entry.step_key in starting:
                    overhead = t - starting[entry.step_key]
                    out["step process start (sum)"] = out.get("step process start (sum)", 0.0)
                    out["step process start (sum)"] += overhead
            elif event.event_type in (kind.STEP_SUCCESS, kind.STEP_FAILURE):
                out[f"step {entry.step_key}"] = t - started.get(entry.step_key, t)
    if first is not None and last is not None:
        out["runs, first start to last end"] = last - first
        out["_first_run_start"] = first
        out["_last_run_end"] = last
    print(json.dumps(out))


WORKERS = {"steps": worker_steps}


# ---------------------------------------------------------------------------------------------
# Alternatives.


@dataclass
class Alternative:
    key: str
    label: str
    prepare: Callable[[Path, Options], tuple[list[str], dict[str, str]]]
    probe: bool = False
    times: list[float] = field(default_factory=list)
    phases: list[dict[str, float]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # CPU seconds of the process tree
    after: list[float] = field(default_factory=list)  # the no-op re-run that follows a demo
    after_cpu: list[float] = field(default_factory=list)


@dataclass
class Options:
    trees: int


def prep_demo(processes: int) -> Callable[[Path, Options], tuple[list[str], dict[str, str]]]:
    def prepare(work: Path, opts: Options) -> tuple[list[str], dict[str, str]]:
        cmd = [str(BIN / "dagma"), "demo", "--json", "--processes", str(processes)]
        return cmd, clean_env(DAGMA_HOME=str(work / "home"))

    return prepare


def prep_fanout(processes: int) -> Callable[[Path, Options], tuple[list[str], dict[str, str]]]:
    def prepare(work: Path, opts: Options) -> tuple[list[str], dict[str, str]]:
        env = clean_env(
            DAGMA_HOME=str(work / "home"),
            DAGMA_NOTEBOOKS_DIR=str(notebooks_dir(work, opts.trees)),
        )
        return [str(BIN / "dagma"), "run", *FAN, "--processes", str(processes)], env

    return prepare


def prep_python(work: Path, opts: Options) -> tuple[list[str], dict[str, str]]:
    script = work / "fan.py"
    body = "\n".join(f"seed = 0\ntrees = {opts.trees}\n{FIT}\nprint(accuracy)" for _ in FAN)
    script.write_text(body + "\n")
    return [sys.executable, str(script)], clean_env()


def prep_code(code: str, home: bool = False) -> Callable[[Path, Options], tuple]:
    def prepare(work: Path, opts: Options) -> tuple[list[str], dict[str, str]]:
        extra = {"DAGMA_HOME": str(work / "home")} if home else {}
        return [sys.executable, "-c", code], clean_env(**extra)

    return prepare


def alternatives() -> list[Alternative]:
    return [
        Alternative("demo_p1", "`dagma demo --processes 1`, fresh home", prep_demo(1)),
        Alternative("demo_p2", "`dagma demo --processes 2`, fresh home", prep_demo(2)),
        Alternative("fanout_p1", "`dagma run fan_1..fan_4 --processes 1`", prep_fanout(1)),
        Alternative("fanout_p2", "`dagma run fan_1..fan_4 --processes 2`", prep_fanout(2)),
        Alternative("python", "plain Python, the 4 fits one after the other", prep_python),
        Alternative(
            "imp_definitions",
            "`import dagma.definitions`",
            prep_code("import dagma.definitions"),
            probe=True,
        ),
        Alternative(
            "load_defs",
            "load the code location (`dagma.definitions.defs()`)",
            prep_code("from dagma.definitions import defs; defs()", home=True),
            probe=True,
        ),
    ]


# ---------------------------------------------------------------------------------------------
# Running and reporting.


def adopt_orphans() -> None:
    """Become the reaper of orphaned descendants (Linux), so their CPU time is counted."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


def reap(deadline: float = 30.0) -> None:
    """Wait for orphaned descendants (a fork server, a kernel) to exit, for a while."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.05)


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Done:
    seconds: float
    cpu: float
    error: str | None
    stdout: str


def run_cmd(cmd: list[str], env: dict[str, str], cwd: Path) -> Done:
    """Run `cmd`; its wall time, and the CPU time of its whole process tree."""
    cpu, start = children_cpu(), time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        return Done(time.perf_counter() - start, 0.0, f"timed out after {TIMEOUT} s", "")
    elapsed = time.perf_counter() - start
    reap()
    used = children_cpu() - cpu
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        return Done(elapsed, used, f"exit {proc.returncode}: {tail}", proc.stdout)
    return Done(elapsed, used, None, proc.stdout)


def run_once(alt: Alternative, base: Path, rep: int, opts: Options) -> None:
    work = Path(tempfile.mkdtemp(prefix=f"{alt.key}-{rep}-", dir=base))
    cmd, env = alt.prepare(work, opts)
    started = time.time()
    done = run_cmd(cmd, env, work)
    elapsed = done.seconds
    if done.error:
        alt.failures.append(done.error)
        print(f"  {alt.key} #{rep} FAILED after {elapsed:.1f} s\n{done.error}", file=sys.stderr)
        return
    summary: dict = {}
    if alt.key.startswith("demo"):
        try:
            summary = json.loads(done.stdout)
        except ValueError:
            problem = f"`dagma demo --json` exited 0 but printed no JSON: {done.stdout[:800]!r}"
            alt.failures.append(problem)
            print(f"  {alt.key} #{rep} FAILED: {problem}", file=sys.stderr)
            return
    alt.times.append(elapsed)
    alt.cpu.append(done.cpu)
    note = ""
    if alt.key.startswith(("demo", "fanout")):
        phases = steps(work / "home")
        ended = started + elapsed
        if "_first_run_start" in phases:
            phases["command start to first run"] = phases.pop("_first_run_start") - started
            phases["last run end to exit"] = ended - phases.pop("_last_run_end")
        if alt.key.startswith("demo"):
            value = summary.get("values", {}).get("rag_eval", {})
            timing, answered = value.get("timing", {}), value.get("metrics", {}).get("answered")
            if timing and answered is not None:
                phases["rag_eval: answering (answers x p50)"] = answered * timing["latency_p50_s"]
            noop = run_cmd([str(BIN / "dagma"), "run", "--stale"], env, work)
            if noop.error or "Nothing is stale" not in noop.stdout:
                problem = f"no-op re-run: {noop.error or noop.stdout[-800:]}"
                alt.failures.append(problem)
                print(f"  {alt.key} #{rep} {problem}", file=sys.stderr)
            else:
                alt.after.append(noop.seconds)
                alt.after_cpu.append(noop.cpu)
                note = f", then `dagma run --stale` {noop.seconds:.2f} s"
        alt.phases.append(phases)
    print(f"  {alt.key} #{rep}: {elapsed:.2f} s ({done.cpu:.1f} CPU s){note}", file=sys.stderr)
    shutil.rmtree(work, ignore_errors=True)


def steps(home: Path) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--worker", "steps", str(home)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), check=False)
    if proc.returncode != 0:
        return {}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}" if values else "n/a"


def measures(by_key: dict[str, Alternative]) -> dict[str, float]:
    """Medians by name: each alternative, and the no-op re-run after the demos."""
    out = {k: m for k, a in by_key.items() if (m := median(a.times)) is not None}
    noops = [t for k in ("demo_p1", "demo_p2") if k in by_key for t in by_key[k].after]
    if noops:
        out["noop"] = statistics.median(noops)
    return out


def ratios(by_key: dict[str, Alternative]) -> dict[str, float]:
    """Ratios for the regression gate; lower is better for every one."""
    m = measures(by_key)
    pairs = [
        ("fanout_p2", "fanout_p1"),
        ("demo_p2", "demo_p1"),
        ("fanout_p1", "python"),
        ("demo_p1", "python"),
        ("demo_p2", "python"),
        ("noop", "python"),
        ("load_defs", "python"),
    ]
    return {f"{a}/{b}": round(m[a] / m[b], 4) for a, b in pairs if a in m and m.get(b)}


def machine(
    load_start: tuple[float, ...], load_end: tuple[float, ...], tree: _report.Tree
) -> list[str]:
    packages = ("dagster", "papermill", "mlflow", "llama_cpp_python", "scikit-learn")
    return _report.machine(load_start, load_end, packages, tree)


def target_rows(by_key: dict[str, Alternative]) -> list[str]:
    m = measures(by_key)
    rows = ["| Measure (median) | Value | Target | Holds |", "|---|---|---|---|"]

    def row(label: str, value: float | None, target: float, unit: str, lower: bool) -> None:
        if value is None:
            return
        holds = value <= target if lower else value >= target
        sign = "<=" if lower else ">="
        rows.append(
            f"| {label} | {value:.2f}{unit} | {sign} {target:g}{unit} | "
            f"{'yes' if holds else '**no**'} |"
        )

    for key in ("demo_p1", "demo_p2"):
        if key in m:
            row(f"cold demo, {key[-1]} process(es)", m[key], TARGETS["demo_cold"], " s", True)
    row("no-op re-run `dagma run --stale`", m.get("noop"), TARGETS["noop"], " s", True)
    row("load the code location", m.get("load_defs"), TARGETS["load_defs"], " s", True)
    if m.get("fanout_p1") and m.get("fanout_p2"):
        speedup = m["fanout_p1"] / m["fanout_p2"]
        row("fan-out speed-up, 2 processes over 1", speedup, TARGETS["speedup"], "x", False)
    if m.get("demo_p1") and m.get("demo_p2"):
        rows.append(
            f"| cold demo speed-up, 2 processes over 1 | {m['demo_p1'] / m['demo_p2']:.2f}x | | |"
        )
    return rows


def phase_table(by_key: dict[str, Alternative]) -> list[str]:
    """Median phase seconds of the demo and fan-out runs, one column per alternative."""
    keys = [k for k in ("demo_p1", "demo_p2", "fanout_p1", "fanout_p2") if by_key.get(k)]
    keys = [k for k in keys if by_key[k].phases]
    if not keys:
        return []
    names: list[str] = []
    for k in keys:
        for p in by_key[k].phases:
            names += [n for n in p if n not in names]
    order = ["command start to first run", "runs, first start to last end"]
    names = [n for n in order if n in names] + sorted(n for n in names if n not in order)
    lines = [
        "| Where the time goes (median s) | " + " | ".join(f"`{k}`" for k in keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    for name in names:
        cells = []
        for k in keys:
            values = [p[name] for p in by_key[k].phases if name in p]
            cells.append(f"{statistics.median(values):.2f}" if values else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def report(alts: list[Alternative], repeat: int, env: list[str], total: float) -> str:
    by_key = {a.key: a for a in alts}
    lines = [
        *env,
        "",
        f"Each alternative ran {repeat}x interleaved (order rotated per repetition), each time "
        f"in fresh temp folders; the whole run took {total:.0f} s.",
        "",
        "| Command | Median s | Min-max s | CPU s (median) | Runs |",
        "|---|---|---|---|---|",
    ]
    for alt in alts:
        lines.append(
            f"| {alt.label} | {fmt(median(alt.times))} | {spread(alt.times)} | "
            f"{fmt(median(alt.cpu))} | {len(alt.times)}/{len(alt.times) + len(alt.failures)} |"
        )
    noops = [t for a in alts if a.key.startswith("demo") for t in a.after]
    noops_cpu = [t for a in alts if a.key.startswith("demo") for t in a.after_cpu]
    if noops:
        lines.append(
            f"| `dagma run --stale` right after each demo (no-op) | {fmt(median(noops))} | "
            f"{spread(noops)} | {fmt(median(noops_cpu))} | {len(noops)} |"
        )
    lines += ["", *target_rows(by_key), ""]
    rs = ratios(by_key)
    if rs:
        lines += ["| Ratio of medians (the gate's, lower is better) | Value |", "|---|---|"]
        lines += [f"| `{name}` | {value:.3f} |" for name, value in rs.items()]
        lines.append("")
    lines += phase_table(by_key)
    prose = where_time_goes(by_key)
    if prose:
        lines += ["", prose]
    return "\n".join(lines)


def phase(alt: Alternative | None, name: str) -> float | None:
    values = [p[name] for p in (alt.phases if alt else []) if name in p]
    return statistics.median(values) if values else None


def where_time_goes(by_key: dict[str, Alternative]) -> str:
    """The paragraph under the tables, from this run's numbers."""
    demo = by_key.get("demo_p1")
    total = median(demo.times) if demo else None
    if demo is None or total is None or not demo.phases:
        return ""
    steps = {
        n.removeprefix("step "): v
        for n in demo.phases[0]
        if n.startswith("step ") and "(" not in n and (v := phase(demo, n)) is not None
    }
    top = sorted(steps.items(), key=lambda kv: -kv[1])[:4]
    parts = [
        f"Where the time goes: on one process the cold demo took {total:.1f} s, of which "
        f"{phase(demo, 'command start to first run') or 0:.1f} s passed before the first run "
        "started (the CLI's imports, loading the code location, the fresh instance) and "
        f"{phase(demo, 'last run end to exit') or 0:.1f} s after the last run ended. Its "
        "longest steps were " + ", ".join(f"`{k}` {v:.1f} s" for k, v in top) + "."
    ]
    answering = phase(demo, "rag_eval: answering (answers x p50)")
    if answering:
        parts.append(
            f" Answering with the local model took about {answering:.1f} s of `rag_eval` (its "
            "answers times their median latency); retrieval is scored on every labelled "
            "question, answers on `answer_limit` of them."
        )
    two = by_key.get("demo_p2")
    two_total = median(two.times) if two else None
    if two is not None and two_total and demo.cpu and two.cpu:
        parts.append(
            f" On two processes the demo took {two_total:.1f} s and "
            f"{statistics.median(two.cpu):.0f} CPU s against {statistics.median(demo.cpu):.0f}: "
            "each step runs in its own process, forked from a server that imported the code "
            "location once, and steps overlap only when the machine has a core to spare."
        )
    return textwrap.fill("".join(parts), width=100)


def write_docs(body: str, trees: int, tree: _report.Tree, allow_dirty: bool) -> None:
    intro = (
        "Command: `make bench`, or `uv run python benchmarks/bench_graph.py --write-docs` "
        "(`--repeat N`, default 3; `--quick` is the CI gate's smaller run). The cold demo is "
        "`dagma demo` in a fresh `DAGMA_HOME` (after `make install`), on 1 and on 2 processes; "
        "right after each, `dagma run --stale` must find nothing to do (the no-op re-run). The "
        f"fan-out is four independent notebooks, each a {trees}-tree random forest on digits "
        "with 3-fold cross-validation, beside copies of `notebooks/`, run by `dagma run` on 1 "
        "and on 2 processes; plain Python runs the same four fits one after the other. The "
        "phase table reads each run's Dagster event log: step times overlap on 2 processes, "
        "and `step process start` sums the time from launching a step's process to the step "
        "starting. Compare ratios, not absolute times: the machine may be shared. See "
        "`benchmarks/README.md`."
    )
    _report.write_titled_section(
        "(b), (c), (f) The demo graph, a parallel fan-out, loading the code location",
        intro,
        body,
        MARK_START,
        MARK_END,
        tree,
        allow_dirty,
        docs=DOCS,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=None, help="runs per alternative (3)")
    parser.add_argument(
        "--quick", action="store_true", help="1 repeat, smaller fits, no 2-process demo"
    )
    parser.add_argument("--json", type=Path, help="write {ratio: value} here (lower is better)")
    _report.add_docs_flags(parser)
    parser.add_argument("--only", help="comma-separated alternative keys (for a quick check)")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("work", nargs="?", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        WORKERS[args.worker](args.work)
        return

    _report.check_docs_flags(parser, args, "only", "quick")
    tree = _report.start(args.write_docs, args.allow_dirty)
    repeat = args.repeat or (1 if args.quick else 3)
    opts = Options(trees=TREES["quick" if args.quick else "full"])
    alts = alternatives()
    if args.only:
        keep = set(args.only.split(","))
        alts = [a for a in alts if a.key in keep]
    elif args.quick:
        alts = [a for a in alts if a.key != "demo_p2"]  # the default (1 process) demo only
    adopt_orphans()
    load_start = os.getloadavg()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_graph-") as tmp:
        base = Path(tmp)
        # Warm the page cache so the first alternative does not pay for a cold disk.
        subprocess.run(
            [sys.executable, "-c", "import dagster, papermill, sklearn, mlflow, llama_cpp"],
            check=True,
            env=clean_env(),
        )
        for rep in range(repeat):
            shift = rep % len(alts)
            for alt in alts[shift:] + alts[:shift]:
                run_once(alt, base, rep, opts)
    total = time.perf_counter() - started
    body = report(alts, repeat, machine(load_start, os.getloadavg(), tree), total)
    print(body)
    if args.json:
        args.json.write_text(json.dumps(ratios({a.key: a for a in alts}), indent=2) + "\n")
    if args.write_docs:
        write_docs(body, opts.trees, tree, args.allow_dirty)
        print(f"\nUpdated {DOCS.relative_to(ROOT)}", file=sys.stderr)
    if any(a.failures for a in alts):
        sys.exit(1)


if __name__ == "__main__":
    main()
