"""A floor on retrieval quality, so a worse embedder or chunking is caught."""

from typing import Any

import dagster as dg


class RetrievalFloor(dg.Config):
    min_hit_at_5: float = 0.6


@dg.asset_check(asset="rag_eval", description="hit@5 on the labelled questions above a floor.")
def rag_retrieval_quality(config: RetrievalFloor, rag_eval: dict[str, Any]) -> dg.AssetCheckResult:
    hit_at_5 = rag_eval["metrics"]["hit_at_5"]
    return dg.AssetCheckResult(
        passed=hit_at_5 >= config.min_hit_at_5,
        metadata={"hit_at_5": hit_at_5, "min_hit_at_5": config.min_hit_at_5},
    )
