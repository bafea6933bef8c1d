"""Benchmark regression gate: quick runs of each benchmark, ratios compared with the baseline.

    uv run python benchmarks/gate.py            # fail if a ratio is >30% worse than recorded
    uv run python benchmarks/gate.py --update   # record the current ratios as the baseline

Ratios, not times: each benchmark runs Dagma and its baseline side by side on the same machine,
so a slower CI runner moves both. `benchmarks/baseline.json` holds, per ratio, the recorded
value and whether lower or higher is better.
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

QUICK = {
    "notebook": [
        "bench_notebook.py",
        "--only",
        "bridge,dagma_run_warm,papermill,python",
        "--repeat",
        "2",
    ],
    "vectors": ["bench_vectors.py", "--quick"],
    # Two repetitions: a single one moved load_defs/python by 30% on a quiet machine.
    "graph": ["bench_graph.py", "--quick", "--repeat", "2"],
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
            subprocess.run(cmd, check=True)
            ratios.update({f"{name}:{k}": v for k, v in json.loads(out.read_text()).items()})
    return ratios


def regressions(
    current: dict[str, float], baseline: dict[str, dict], tolerance: float = TOLERANCE
) -> list[str]:
    """One line per ratio worse than its baseline by more than `tolerance`, or missing."""
    problems = []
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update", action="store_true", help="record the ratios as baseline")
    parser.add_argument("--only", help=f"comma-separated among {','.join(QUICK)}")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(QUICK)
    current = run_quick(names)
    baseline = json.loads(BASELINE.read_text()) if BASELINE.is_file() else {}
    if args.update:
        for name, value in current.items():
            baseline.setdefault(name, {"better": "lower"})["value"] = value
        BASELINE.write_text(json.dumps(baseline, indent=2, sort_keys=True) + "\n")
        print(f"Recorded {len(current)} ratios in {BASELINE.relative_to(HERE.parent)}")
        return
    measured = {k: v for k, v in baseline.items() if k.split(":")[0] in names}
    problems = regressions(current, measured)
    for name, value in sorted(current.items()):
        print(f"{name} = {value:.3g}")
    if problems:
        print("\nRegressions:\n  " + "\n  ".join(problems))
        sys.exit(1)
    print(f"\nNo ratio regressed by more than {TOLERANCE:.0%}.")


if __name__ == "__main__":
    main()
