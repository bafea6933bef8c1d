"""The benchmark regression gate flags a ratio that got >30% worse, in either direction, or
that passed its absolute limit."""

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


FANOUT = "graph:fanout_p2/fanout_p1"


def test_a_fanout_slower_on_two_processes_fails_even_against_a_worse_baseline():
    baseline = {FANOUT: {"value": 1.2, "better": "lower"}}
    [problem] = gate.regressions({FANOUT: 1.05}, baseline)
    assert problem.startswith(FANOUT) and "absolute limit (at most 1)" in problem
    assert gate.regressions({FANOUT: 0.99}, baseline) == []


def test_an_absolute_limit_holds_without_a_baseline_and_as_a_floor():
    assert "absolute limit" in gate.regressions({FANOUT: 1.01}, {})[0]
    floor = {"vectors:speedup": 4.0}
    speedup = {"vectors:speedup": {"value": 3.0, "better": "higher"}}
    [problem] = gate.regressions({"vectors:speedup": 3.5}, speedup, limits=floor)
    assert "at least 4" in problem
    assert gate.regressions({"vectors:speedup": 4.5}, speedup, limits=floor) == []


def test_both_the_tolerance_and_the_limit_are_reported():
    baseline = {FANOUT: {"value": 0.7, "better": "lower"}}
    problems = gate.regressions({FANOUT: 1.1}, baseline)
    assert len(problems) == 2
    assert "absolute limit" in problems[0] and "30% allowed" in problems[1]


def test_moves_and_mean_across_runs():
    runs = [{"a": 1.0, "b": 2.0}, {"a": 1.2, "b": 2.0}]
    moved = gate.moves(runs)
    assert round(moved["a"], 6) == 0.2 and moved["b"] == 0.0
    assert gate.mean(runs) == {"a": 1.1, "b": 2.0}
