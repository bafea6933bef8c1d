"""Benchmark regression gate: quick runs of each benchmark, ratios compared with the baseline.

    uv run python benchmarks/gate.py                    # fail if a ratio is >30% worse than recorded
    uv run python benchmarks/gate.py --runs 2           # also print how much each ratio moved
    uv run python benchmarks/gate.py --runs 2 --update  # record their mean as the baseline

Ratios, not times: each benchmark runs Dagma and its baseline side by side on the same machine,
so a slower CI runner moves both. `benchmarks/baseline.json` holds, per ratio, the recorded
value and whether lower or higher is better. A few ratios also have an absolute limit
(`LIMITS`), which holds whatever the baseline says.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
BASELINE = HERE / "baseline.json"
TOLERANCE = 0.30
# A ratio whose run-to-run move is above this needs more repetitions (see README.md).
STABLE = 0.15
# Absolute limits, whatever the baseline: a 2-process fan-out slower than 1 process fails.
LIMITS: dict[str, float] = {"graph:fanout_p2/fanout_p1": 1.0}

# Repetitions, raised where two gate runs (`--runs 2`) on the shared 2-core machine moved a
# ratio by more than STABLE: notebook 2 -> 4, vectors 1 -> 3 -> 5, graph 2 -> 3 -> 5. README.md
# has each round's moves.
QUICK = {
    "notebook": [
        "bench_notebook.py",
        "--only",
        "bridge,dagma_run_warm,papermill,python",
        "--repeat",
        "4",
    ],
    "vectors": ["bench_vectors.py", "--quick", "--repeat", "5"],
    "graph": ["bench_graph.py", "--quick", "--repeat", "5"],
}


def run_quick(names: list[str]) -> dict[str, float]:
    """Every quick benchmark's ratios, prefixed by the benchmark's name."""
    ratios: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-gate-") as tmp:
        for name in names:
            script, *args = QUICK[name]
            out = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, str(HERE / script), *args, "--json", str(out)]
            print(f"$ {' '.join(cmd[1:])}", flush=True)
            proc = subprocess.run(cmd, check=False)
            if proc.returncode != 0:
                sys.exit(
                    f"gate: {script} exited {proc.returncode} (its errors are above); the gate "
                    "needs every quick run to succeed: fix that run, then run the gate again"
                )
            ratios.update({f"{name}:{k}": v for k, v in json.loads(out.read_text()).items()})
    return ratios


def regressions(
    current: dict[str, float],
    baseline: dict[str, dict],
    tolerance: float = TOLERANCE,
    limits: dict[str, float] | None = None,
) -> list[str]:
    """One line per ratio worse than its baseline by more than `tolerance`, or missing, and
    per measured ratio past its absolute limit in `limits` (default `LIMITS`; lower is better,
    unless its baseline says higher)."""
    problems = []
    for name, limit in sorted((LIMITS if limits is None else limits).items()):
        if name not in current:
            continue
        now, better = current[name], baseline.get(name, {}).get("better", "lower")
        if now > limit if better == "lower" else now < limit:
            bound = "at most" if better == "lower" else "at least"
            problems.append(f"{name}: {now:.3g}, past its absolute limit ({bound} {limit:g})")
    for name, recorded in sorted(baseline.items()):
        value, better = recorded["value"], recorded.get("better", "lower")
        if name not in current:
            problems.append(f"{name}: not measured (baseline {value})")
            continue
        now = current[name]
        worse = (
            now > value * (1 + tolerance) if better == "lower" else now < value * (1 - tolerance)
        )
        if worse:
            problems.append(
                f"{name}: {now:.3g} against {value:.3g} recorded ({better} is better, "
                f"{tolerance:.0%} allowed)"
            )
    return problems


def moves(runs: list[dict[str, float]]) -> dict[str, float]:
    """How much each ratio moved across `runs`: largest over smallest, minus 1."""
    names = sorted(set().union(*runs))
    out = {}
    for name in names:
        values = [r[name] for r in runs if name in r]
        if len(values) > 1 and min(values) > 0:
            out[name] = max(values) / min(values) - 1
    return out


def mean(runs: list[dict[str, float]]) -> dict[str, float]:
    names = sorted(set().union(*runs))
    return {n: round(sum(v := [r[n] for r in runs if n in r]) / len(v), 4) for n in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update", action="store_true", help="record the ratios as baseline")
    parser.add_argument("--only", help=f"comma-separated among {','.join(QUICK)}")
    parser.add_argument(
        "--runs",
        type=int,
        default=1,
        help="run the quick benchmarks this many times: print how much each ratio moved, "
        "then gate (or record) their mean",
    )
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(QUICK)
    unknown = set(names) - set(QUICK)
    if unknown:
        parser.error(
            f"unknown benchmarks in --only: {', '.join(sorted(unknown))}; known: {', '.join(QUICK)}"
        )
    if args.runs < 1:
        parser.error(f"--runs {args.runs}: at least 1")
    runs = [run_quick(names) for _ in range(args.runs)]
    current = mean(runs)
    if args.runs > 1:
        print(f"\nHow much each ratio moved across {args.runs} runs (largest / smallest - 1):")
        for name, moved in moves(runs).items():
            values = ", ".join(f"{r[name]:.3g}" for r in runs if name in r)
            flag = f"  <- above {STABLE:.0%}: needs more repetitions" if moved > STABLE else ""
            print(f"  {name}: {values}: {moved:.0%}{flag}")
    baseline = json.loads(BASELINE.read_text()) if BASELINE.is_file() else {}
    if args.update:
        for name, value in current.items():
            baseline.setdefault(name, {"better": "lower"})["value"] = value
        BASELINE.write_text(json.dumps(baseline, indent=2, sort_keys=True) + "\n")
        what = f"the mean of {args.runs} runs of " if args.runs > 1 else ""
        print(f"Recorded {what}{len(current)} ratios in {BASELINE.relative_to(HERE.parent)}")
        return
    measured = {k: v for k, v in baseline.items() if k.split(":")[0] in names}
    problems = regressions(current, measured)
    for name, value in sorted(current.items()):
        print(f"{name} = {value:.3g}")
    if problems:
        print("\nRegressions:\n  " + "\n  ".join(problems))
        sys.exit(1)
    print(f"\nNo ratio regressed by more than {TOLERANCE:.0%} or passed its absolute limit.")


if __name__ == "__main__":
    main()
