from typing import Any

import dagster as dg
import pytest

from dagma.defs.llm.checks import RetrievalFloor, rag_retrieval_quality
from dagma.defs.models.checks import ModelFloor, wine_model_quality

MODEL = {"metrics": {"accuracy": 0.9, "f1_macro": 0.88}}


@pytest.mark.parametrize(("floor", "passed"), [(0.85, True), (0.95, False)])
def test_model_quality_check_in_both_directions(floor: float, passed: bool):
    result = wine_model_quality(ModelFloor(min_accuracy=floor), MODEL)
    assert result.passed is passed
    assert result.metadata["min_accuracy"].value == floor


@pytest.mark.parametrize(("floor", "passed"), [(0.5, True), (0.8, False)])
def test_retrieval_floor_in_both_directions(floor: float, passed: bool):
    result = rag_retrieval_quality(
        RetrievalFloor(min_hit_at_5=floor), {"metrics": {"hit_at_5": 0.75}}
    )
    assert result.passed is passed


def test_retrieval_floor_defaults_to_0_6():
    assert RetrievalFloor().min_hit_at_5 == 0.6


@dg.asset(name="rag_eval")
def stub_rag_eval() -> dict[str, Any]:
    return {"metrics": {"hit_at_5": 0.75}}


@pytest.mark.parametrize(
    ("floor", "passed"), [(0.6, True), (0.75, True), (0.76, False), (1.01, False)]
)
def test_retrieval_floor_check_executes_in_both_directions(floor: float, passed: bool):
    """The check runs in Dagster after a materialized rag_eval, with the floor as run config."""
    result = dg.materialize(
        [stub_rag_eval, rag_retrieval_quality],
        run_config={
            "ops": {rag_retrieval_quality.node_def.name: {"config": {"min_hit_at_5": floor}}}
        },
    )
    assert result.success  # a failed check is a result, not a failed run
    [evaluation] = result.get_asset_check_evaluations()
    assert evaluation.check_name == "rag_retrieval_quality"
    assert evaluation.passed is passed
    assert evaluation.metadata["hit_at_5"].value == 0.75
    assert evaluation.metadata["min_hit_at_5"].value == floor
