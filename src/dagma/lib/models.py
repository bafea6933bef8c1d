"""Train, evaluate and log the demo's tabular model (scikit-learn, MLflow)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

REGISTERED_MODEL = "dagma-wine"


@dataclass
class TrainResult:
    model: Any
    metrics: dict[str, float]
    params: dict[str, Any]
    X_test: pd.DataFrame
    y_test: pd.Series
    y_pred: np.ndarray
    labels: list[int] = field(default_factory=list)


def train_classifier(
    frame: pd.DataFrame,
    *,
    target: str = "target",
    seed: int = 42,
    C: float = 1.0,
    max_iter: int = 500,
    test_size: float = 0.25,
) -> TrainResult:
    """Standardised logistic regression with a stratified, seeded split; fully deterministic."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score, log_loss
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if target not in frame.columns:
        raise ValueError(f"The table has no {target!r} column; columns are {list(frame.columns)}.")
    if not 0 < test_size < 1:
        raise ValueError(f"test_size must be between 0 and 1, got {test_size}.")
    X, y = frame.drop(columns=[target]), frame[target]
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=test_size, random_state=seed, stratify=y
    )
    model = make_pipeline(
        StandardScaler(), LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
    )
    model.fit(X_train, y_train)
    y_pred = model.predict(X_test)
    metrics = {
        "accuracy": float(accuracy_score(y_test, y_pred)),
        "f1_macro": float(f1_score(y_test, y_pred, average="macro")),
        "log_loss": float(log_loss(y_test, model.predict_proba(X_test))),
        "n_train": float(len(X_train)),
        "n_test": float(len(X_test)),
    }
    params = {"seed": seed, "C": C, "max_iter": max_iter, "test_size": test_size}
    return TrainResult(model, metrics, params, X_test, y_test, y_pred, sorted(y.unique().tolist()))


def confusion_figure(result: TrainResult) -> Any:
    """A labelled confusion matrix of the held-out split."""
    import matplotlib

    matplotlib.use("Agg")
    from sklearn.metrics import ConfusionMatrixDisplay

    display = ConfusionMatrixDisplay.from_predictions(
        result.y_test, result.y_pred, labels=result.labels, colorbar=False
    )
    display.ax_.set_title(f"Wine classifier, accuracy {result.metrics['accuracy']:.3f}")
    display.figure_.tight_layout()
    return display.figure_


def log_result(result: TrainResult, *, registered_name: str = REGISTERED_MODEL) -> dict[str, Any]:
    """Log params, metrics, the figure and the model (signature, example) to the active run."""
    import matplotlib.pyplot as plt
    import mlflow
    from mlflow.models import infer_signature

    mlflow.log_params(result.params)
    mlflow.log_metrics(result.metrics)
    figure = confusion_figure(result)
    mlflow.log_figure(figure, "confusion_matrix.png")
    plt.close(figure)
    example = result.X_test.head(3)
    info = mlflow.sklearn.log_model(
        result.model,
        name="model",
        signature=infer_signature(example, result.model.predict(example)),
        input_example=example,
        registered_model_name=registered_name,
        # The model is a plain scikit-learn pipeline; stating its requirements spares MLflow a
        # subprocess that re-loads the model to infer them (several seconds per training run).
        pip_requirements=mlflow.sklearn.get_default_pip_requirements(include_skops=True),
    )
    return {
        "model_uri": info.model_uri,
        "registered_model": registered_name,
        "model_version": str(info.registered_model_version),
        "metrics": result.metrics,
        "params": result.params,
    }


def daily_batch(frame: pd.DataFrame, day: str, size: int = 40) -> pd.DataFrame:
    """A reproducible stand-in for one day's incoming rows: a sample seeded by the date."""
    import hashlib

    if size < 1:
        raise ValueError(f"size must be at least 1, got {size}.")
    seed = int(hashlib.sha256(day.encode()).hexdigest()[:8], 16)
    return frame.sample(n=min(size, len(frame)), random_state=seed)


def score_batch(model: Any, batch: pd.DataFrame, target: str = "target") -> dict[str, float]:
    """Accuracy and class balance of `model` on one labelled batch."""
    predictions = model.predict(batch.drop(columns=[target]))
    return {
        "accuracy": float((predictions == batch[target].to_numpy()).mean()),
        "rows": float(len(batch)),
        "predicted_class_0_share": float((predictions == 0).mean()),
    }


@dataclass
class ClusterResult:
    model: Any
    labels: np.ndarray
    metrics: dict[str, float]
    params: dict[str, Any]
    sizes: list[int]


def cluster_wines(
    frame: pd.DataFrame, *, n_clusters: int = 3, seed: int = 42, target: str = "target"
) -> ClusterResult:
    """Standardised KMeans on the features, seeded; scored against the known cultivars."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, silhouette_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if not 2 <= n_clusters < len(frame):
        raise ValueError(f"n_clusters must be from 2 to {len(frame) - 1}, got {n_clusters}.")
    X = frame.drop(columns=[target], errors="ignore")
    model = make_pipeline(
        StandardScaler(), KMeans(n_clusters=n_clusters, n_init=10, random_state=seed)
    )
    labels = model.fit_predict(X)
    scaled = model[:-1].transform(X)
    metrics = {
        "silhouette": float(silhouette_score(scaled, labels)),
        "inertia": float(model[-1].inertia_),
    }
    if target in frame.columns:
        metrics["adjusted_rand"] = float(adjusted_rand_score(frame[target], labels))
    sizes = np.bincount(labels, minlength=n_clusters).tolist()
    return ClusterResult(model, labels, metrics, {"n_clusters": n_clusters, "seed": seed}, sizes)


def clusters_figure(frame: pd.DataFrame, result: ClusterResult) -> Any:
    """The clusters on the first two principal components of the standardised features."""
    from matplotlib.figure import Figure
    from sklearn.decomposition import PCA

    X = frame.drop(columns=["target"], errors="ignore")
    points = PCA(n_components=2, random_state=0).fit_transform(result.model[:-1].transform(X))
    figure = Figure(figsize=(5, 4))
    ax = figure.subplots()
    ax.scatter(points[:, 0], points[:, 1], c=result.labels, cmap="viridis", s=14)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(
        f"{result.params['n_clusters']} clusters, silhouette {result.metrics['silhouette']:.3f}"
    )
    figure.tight_layout()
    return figure


def png(figure: Any) -> bytes:
    """A figure as PNG bytes, e.g. for `IPython.display.Image` whatever the backend."""
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()
