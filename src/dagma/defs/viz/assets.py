"""Pictures of the lab's results, for people rather than programs."""

from typing import Any

import dagster as dg

from dagma.lib.report import metrics_chart
from dagma.settings import get_settings


@dg.asset(group_name="viz", kinds={"matplotlib"}, code_version="1")
def lab_scorecard(wine_model: dict[str, Any], rag_eval: dict[str, Any]) -> dg.Output[str]:
    """The model's and the retriever's headline scores in one chart."""
    wine = wine_model["metrics"]
    metrics = {
        "wine accuracy": wine["accuracy"],
        "wine F1 (macro)": wine["f1_macro"],
        **{f"RAG {k.replace('_at_', '@')}": v for k, v in rag_eval["metrics"].items()},
    }
    path = metrics_chart(metrics, get_settings().home / "reports" / "scorecard.png")
    table = "\n".join(f"| {k} | {v:.3f} |" for k, v in metrics.items())
    return dg.Output(
        str(path),
        metadata={
            "chart": dg.MetadataValue.path(str(path)),
            "scores": dg.MetadataValue.md(f"| score | value |\n|---|---|\n{table}"),
            "streamlit": dg.MetadataValue.url("http://127.0.0.1:8501"),
        },
    )
