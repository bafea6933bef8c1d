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
