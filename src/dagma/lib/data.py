"""The demo datasets: both ship inside installed packages, so nothing is downloaded."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class Document:
    """One source text of the corpus."""

    source: str
    title: str
    text: str

    @property
    def sha(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def load_wine() -> pd.DataFrame:
    """scikit-learn's wine recognition data: 178 rows, 13 features and a `target` column."""
    from sklearn.datasets import load_wine as _load

    frame = _load(as_frame=True).frame
    frame.columns = [str(c).replace("/", "_") for c in frame.columns]
    return frame


def pydoc_documents() -> list[Document]:
    """CPython's own reference topics (`pydoc_data.topics`), one document per topic."""
    from pydoc_data.topics import topics

    return [
        Document(source=f"pydoc:{name}", title=name, text=text.strip())
        for name, text in sorted(topics.items())
        if text.strip()
    ]


def markdown_documents(folder: Path) -> list[Document]:
    """Every Markdown file under `folder`, titled by its first heading."""
    docs = []
    for path in sorted(folder.rglob("*.md")):
        text = path.read_text(encoding="utf-8").strip()
        if not text:
            continue
        heading = next(
            (ln.lstrip("# ").strip() for ln in text.splitlines() if ln.startswith("#")), ""
        )
        docs.append(
            Document(
                source=f"docs:{path.relative_to(folder)}", title=heading or path.stem, text=text
            )
        )
    return docs


def load_corpus(docs_dir: Path | None = None) -> list[Document]:
    """The RAG corpus: the pydoc topics plus this repository's own docs."""
    docs = pydoc_documents()
    if docs_dir is not None and docs_dir.is_dir():
        docs += markdown_documents(docs_dir)
    if not docs:
        raise ValueError(
            f"The corpus is empty: no pydoc topics and no Markdown files under {docs_dir}. "
            "Add Markdown files there, or check that Python's pydoc topics are installed."
        )
    return docs
