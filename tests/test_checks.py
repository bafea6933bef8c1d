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
