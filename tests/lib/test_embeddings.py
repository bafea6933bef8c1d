from pathlib import Path

import numpy as np
import pytest

from dagma.lib.embeddings import EmbedderError, Model2VecEmbedder, get_embedder


def test_default_embedder_ships_in_the_package_and_is_normalized():
    emb = get_embedder("model2vec")
    vectors = emb.embed(["How do I catch an exception?", "with statement context manager"])
    assert vectors.shape == (2, emb.dim) and emb.dim == 256
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    assert emb.embed([]).shape == (0, 256)


def test_embeddings_are_deterministic_and_semantic():
    emb = get_embedder("model2vec")
    a, b, c = emb.embed(["catch an exception", "handle errors with try", "list comprehension"])
    assert np.array_equal(emb.embed(["catch an exception"])[0], a)
    assert a @ b > a @ c


def test_unknown_embedder_lists_the_choices(monkeypatch: pytest.MonkeyPatch):
    with pytest.raises(EmbedderError, match="Unknown DAGMA_EMBEDDER='bert'; use one of model2vec"):
        get_embedder("bert")


def test_missing_model_folder_says_how_to_rebuild(tmp_path: Path):
    with pytest.raises(EmbedderError, match=r"distill_embedder\.py"):
        Model2VecEmbedder(tmp_path)


def test_opt_in_embedders_explain_what_to_install():
    # torch and fastembed are deliberately not in the default install.
    for kind, package in (("minilm", "sentence-transformers"), ("fastembed", "fastembed")):
        with pytest.raises(EmbedderError, match=package):
            get_embedder(kind)


# Texts that exercise the tokenizer's corners: separators the normalizer deletes or keeps,
# accents, CJK padding, added tokens, truncation at max_length, empty and blank texts.
AWKWARD = [
    "",
    " ",
    "\t\n",
    "[UNK]",
    "x[UNK]y [PAD]",
    "a\x0bb c\x0cd e\x1cf g\x85h",
    "café naïve ÉCOLE",
    "\u00a0nbsp\u00a0here\u2003em",
    "ΟΔΟΣ σοφία",
    "中文字符 mixed中文",
    "a" * 3000,
    "x," * 2000,
    "\u0301start combining",
    "emoji 😀 text",
    "\ufffd\x00null",
    "İstanbul ß ﬁ",
    "word " * 700,
    "...!!!???",
]


def corpus_texts() -> list[str]:
    from dagma.lib.chunking import chunk_documents
    from dagma.lib.data import pydoc_documents

    return [c.text for c in chunk_documents(pydoc_documents())]


def test_the_fast_path_gives_model2vecs_vectors_bit_for_bit():
    from dagma.lib.embeddings import normalize

    emb = get_embedder("model2vec")
    assert emb.pooler is not None  # the shipped model takes the fast path
    texts = corpus_texts() + AWKWARD
    expected = normalize(emb.model.encode(texts))
    assert np.array_equal(emb.embed(texts).view(np.uint32), expected.view(np.uint32))


def test_a_texts_vector_does_not_depend_on_its_batch_or_the_cache():
    from dagma.lib.embeddings import MeanPooler, normalize

    texts = corpus_texts()[:40] + AWKWARD
    embedder = Model2VecEmbedder()
    together = embedder.embed(texts)
    fresh = MeanPooler(embedder.model, block=7, max_words=50)  # the cache starts over often
    one_by_one = np.concatenate([normalize(fresh.encode([t])) for t in reversed(texts)])[::-1]
    assert np.array_equal(together.view(np.uint32), one_by_one.view(np.uint32))
    assert fresh.cached_words < len({w for t in texts for w in t.split()})
    blocks = normalize(fresh.encode(texts))  # pooled 7 texts at a time
    assert np.array_equal(together.view(np.uint32), blocks.view(np.uint32))


def test_models_the_fast_path_does_not_reproduce_use_model2vec():
    from types import SimpleNamespace

    from dagma.lib.embeddings import MeanPooler

    model = get_embedder("model2vec").model
    assert MeanPooler.fits(model)
    shipped = {**vars(model), "normalize": model.normalize, "max_length": model.max_length}
    assert MeanPooler.fits(SimpleNamespace(**shipped))
    for change in (
        {"weights": np.ones(3)},
        {"token_mapping": np.arange(3)},
        {"embedding": model.embedding.astype(np.float32)},
        {"normalize": False},
        {"max_length": None},
    ):
        assert not MeanPooler.fits(SimpleNamespace(**{**shipped, **change})), change
