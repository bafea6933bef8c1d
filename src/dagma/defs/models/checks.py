"""Quality floors on the trained model, with thresholds set in run config."""

from typing import Any

import dagster as dg


class ModelFloor(dg.Config):
    min_accuracy: float = 0.85
    min_f1_macro: float = 0.85


@dg.asset_check(asset="wine_model", description="Held-out accuracy and macro F1 above floors.")
def wine_model_quality(config: ModelFloor, wine_model: dict[str, Any]) -> dg.AssetCheckResult:
    metrics = wine_model["metrics"]
    passed = (
        metrics["accuracy"] >= config.min_accuracy and metrics["f1_macro"] >= config.min_f1_macro
    )
    return dg.AssetCheckResult(
        passed=passed,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "accuracy": metrics["accuracy"],
            "f1_macro": metrics["f1_macro"],
            "min_accuracy": config.min_accuracy,
            "min_f1_macro": config.min_f1_macro,
        },
    )
