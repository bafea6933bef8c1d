"""Evaluate the RAG chain over the published collection and log the measures to MLflow."""

from typing import Any

import dagster as dg

from dagma.defs.core.resources import LLMResource, MLflowResource, QdrantResource
from dagma.lib import tracking
from dagma.lib.embeddings import get_embedder
from dagma.lib.evaluation import evaluate_retrieval, load_questions
from dagma.lib.llm import chat_model
from dagma.lib.retrieval import make_pipeline, make_search
from dagma.settings import PROJECT_ROOT

QUESTIONS = PROJECT_ROOT / "evals" / "questions.jsonl"
SAMPLE_QUESTION = "How do I catch an exception and still run clean-up code?"


@dg.asset(group_name="llm", kinds={"langchain", "mlflow"}, code_version="1")
def rag_eval(
    context: dg.AssetExecutionContext,
    doc_vectors: dict[str, Any],
    mlflow: MLflowResource,
    qdrant: QdrantResource,
    llm: LLMResource,
) -> dg.Output[dict[str, Any]]:
    """Retrieval hit-rate@k and MRR on the labelled questions, plus one answered example."""
    import mlflow as mlflow_lib

    questions = load_questions(QUESTIONS)
    embedder = get_embedder()
    with qdrant.open() as store:
        search = make_search(store, doc_vectors["collection"], embedder)
        report = evaluate_retrieval(questions, search, k=5)
        pipeline = make_pipeline(search, chat_model(llm.settings()))
        sample = pipeline.answer(SAMPLE_QUESTION)
    metrics = {"hit_at_1": report["hit@1"], "hit_at_5": report["hit@5"], "mrr": report["mrr"]}
    tags = tracking.lineage_tags(
        asset_key="rag_eval", dagster_run_id=context.run_id, collection=doc_vectors.get("physical")
    )
    with mlflow_lib.start_run(
        experiment_id=mlflow.experiment_id, run_name="rag_eval", tags=tags
    ) as run:
        mlflow_lib.log_params(
            {
                "questions": report["n"],
                "k": report["k"],
                "embedder": embedder.name,
                "collection": doc_vectors.get("physical"),
                "llm": llm.backend,
            }
        )
        mlflow_lib.log_metrics(metrics)
        mlflow_lib.log_dict(report["rows"], "retrieval_rows.json")
        mlflow_lib.log_dict(sample.model_dump(), "sample_answer.json")
    value = {"metrics": metrics, "sample": sample.model_dump(), "mlflow_run_id": run.info.run_id}
    return dg.Output(
        value,
        metadata={
            **metrics,
            "questions": report["n"],
            "sample_answer": dg.MetadataValue.md(
                f"**{SAMPLE_QUESTION}**\n\n{sample.text}\n\n"
                + "\n".join(f"- {s.source} ({s.score:.3f})" for s in sample.sources)
            ),
            "mlflow_run": dg.MetadataValue.url(mlflow.run_url(run.info.run_id)),
        },
    )
