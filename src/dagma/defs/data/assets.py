"""Raw datasets. Both ship inside installed packages and this repo, so nothing is downloaded."""

import dagster as dg

from dagma.lib import data
from dagma.settings import PROJECT_ROOT


@dg.asset(group_name="data", kinds={"pandas", "sklearn"}, code_version="1")
def wine_table() -> dg.Output:
    """scikit-learn's wine recognition dataset: 13 chemical measurements and a cultivar label."""
    frame = data.load_wine()
    return dg.Output(
        frame,
        metadata={
            "rows": len(frame),
            "columns": len(frame.columns),
            "classes": int(frame["target"].nunique()),
            "preview": dg.MetadataValue.md(frame.head(5).to_markdown(index=False)),
        },
    )


@dg.asset(group_name="data", kinds={"python"}, code_version="1")
def doc_corpus() -> dg.Output[list[dict[str, str]]]:
    """The RAG corpus: CPython's pydoc reference topics plus this repository's docs."""
    docs = data.load_corpus(PROJECT_ROOT / "docs")
    return dg.Output(
        [d.to_dict() for d in docs],
        metadata={
            "documents": len(docs),
            "characters": sum(len(d.text) for d in docs),
            "pydoc_topics": sum(d.source.startswith("pydoc:") for d in docs),
            "repo_docs": sum(d.source.startswith("docs:") for d in docs),
        },
    )
