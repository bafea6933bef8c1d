"""The model quality gate: floors set in run config; only a passing version becomes `champion`."""

from typing import Any

import dagster as dg

from dagma.defs.core.resources import MLflowResource
from dagma.lib import tracking


class ModelFloor(dg.Config):
    min_accuracy: float = 0.85
    min_f1_macro: float = 0.85


def passes(metrics: dict[str, float], floor: ModelFloor) -> bool:
    return metrics["accuracy"] >= floor.min_accuracy and metrics["f1_macro"] >= floor.min_f1_macro


@dg.asset_check(
    asset="wine_model",
    description="Held-out accuracy and macro F1 above floors; a passing version becomes the "
    "registered model's `champion`, a failing one leaves the previous champion in place.",
)
def wine_model_quality(
    config: ModelFloor, wine_model: dict[str, Any], mlflow: MLflowResource
) -> dg.AssetCheckResult:
    metrics = wine_model["metrics"]
    passed = passes(metrics, config)
    name, version = wine_model.get("registered_model"), wine_model.get("model_version")
    champion = tracking.alias_version(mlflow.tracking_uri, name) if name else None
    if passed and name and version:
        tracking.promote(mlflow.tracking_uri, name, version)
        champion = version
    metadata: dict[str, Any] = {
        "accuracy": metrics["accuracy"],
        "f1_macro": metrics["f1_macro"],
        "min_accuracy": config.min_accuracy,
        "min_f1_macro": config.min_f1_macro,
        "model_version": version or "",
        "champion": champion or "none",
    }
    if name and champion:
        metadata["champion_url"] = dg.MetadataValue.url(
            tracking.model_url(mlflow.ui_url, name, champion)
        )
    return dg.AssetCheckResult(
        passed=passed, severity=dg.AssetCheckSeverity.ERROR, metadata=metadata
    )
