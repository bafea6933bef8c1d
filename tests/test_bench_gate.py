"""The benchmark regression gate flags a ratio that got >30% worse, in either direction."""

import importlib.util

from dagma.settings import PROJECT_ROOT

spec = importlib.util.spec_from_file_location("gate", PROJECT_ROOT / "benchmarks" / "gate.py")
assert spec and spec.loader
gate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gate)

BASELINE = {
    "notebook:dagma_run_warm/papermill": {"value": 1.2, "better": "lower"},
    "vectors:embedded/qdrant_local_upsert": {"value": 50.0, "better": "higher"},
}


def test_ratios_within_tolerance_pass():
    current = {"notebook:dagma_run_warm/papermill": 1.5, "vectors:embedded/qdrant_local_upsert": 36}
    assert gate.regressions(current, BASELINE) == []


def test_a_slower_ratio_or_a_lost_speedup_fails():
    current = {"notebook:dagma_run_warm/papermill": 1.6, "vectors:embedded/qdrant_local_upsert": 34}
    problems = gate.regressions(current, BASELINE)
    assert len(problems) == 2
    assert "lower is better" in problems[0] and "higher is better" in problems[1]


def test_a_ratio_no_longer_measured_fails():
    [problem] = gate.regressions({"notebook:dagma_run_warm/papermill": 1.0}, BASELINE)
    assert "not measured" in problem
