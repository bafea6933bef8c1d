from typing import Any

import dagster as dg
import pytest

from dagma.defs.core.resources import MLflowResource
from dagma.defs.llm.checks import RetrievalFloor, rag_retrieval_quality
from dagma.defs.models.checks import ModelFloor, wine_model_quality
from dagma.lib import tracking

MODEL = {"metrics": {"accuracy": 0.9, "f1_macro": 0.88}}


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> tuple[MLflowResource, list[str]]:
    """A real MLflow store with two registered versions of a small wine-like model."""
    import mlflow
    from sklearn.datasets import load_wine
    from sklearn.linear_model import LogisticRegression

    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    experiment = tracking.setup_experiment(uri, "dagma", root / "artifacts")
    X, y = load_wine(return_X_y=True, as_frame=True)
    mlflow.set_tracking_uri(uri)
    versions = []
    try:
        for c in (0.5, 1.0):
            with mlflow.start_run(experiment_id=experiment):
                model = LogisticRegression(C=c, max_iter=5000).fit(X, y)
                info = mlflow.sklearn.log_model(
                    model, name="model", registered_model_name="gate-test", input_example=X.head(2)
                )
                versions.append(str(info.registered_model_version))
    finally:
        mlflow.set_tracking_uri(None)
    return MLflowResource(tracking_uri=uri, artifact_root=str(root / "artifacts")), versions


@pytest.mark.parametrize(("floor", "passed"), [(0.85, True), (0.95, False)])
def test_model_quality_check_in_both_directions(floor: float, passed: bool, registry):
    mlflow_resource, _ = registry
    result = wine_model_quality(ModelFloor(min_accuracy=floor), MODEL, mlflow_resource)
    assert result.passed is passed
    assert result.metadata["min_accuracy"].value == floor


def test_only_a_passing_version_becomes_champion_and_a_failing_one_keeps_it(registry):
    mlflow_resource, (first, second) = registry
    uri = mlflow_resource.tracking_uri

    def check(version: str, accuracy: float) -> dg.AssetCheckResult:
        trained = {
            "metrics": {"accuracy": accuracy, "f1_macro": 0.9},
            "registered_model": "gate-test",
            "model_version": version,
        }
        return wine_model_quality(ModelFloor(), trained, mlflow_resource)

    assert tracking.alias_version(uri, "gate-test") is None
    assert check(first, 0.93).passed
    assert tracking.alias_version(uri, "gate-test") == first

    failed = check(second, 0.60)  # below the 0.85 floor
    assert not failed.passed
    assert tracking.alias_version(uri, "gate-test") == first  # the previous champion stays
    assert failed.metadata["champion"].value == first

    assert check(second, 0.97).passed
    assert tracking.alias_version(uri, "gate-test") == second


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
