from pathlib import Path

import pytest

from dagma.lib.data import Document, load_corpus, load_wine, markdown_documents, pydoc_documents


def test_wine_ships_offline_with_three_classes():
    frame = load_wine()
    assert frame.shape == (178, 14)
    assert frame["target"].nunique() == 3


def test_corpus_holds_pydoc_topics_and_repo_docs(tmp_path: Path):
    (tmp_path / "guide.md").write_text("# Guide\n\nHello.")
    (tmp_path / "empty.md").write_text("   ")
    docs = load_corpus(tmp_path)
    sources = {d.source for d in docs}
    assert "pydoc:try" in sources
    assert "docs:guide.md" in sources
    assert len([s for s in sources if s.startswith("pydoc:")]) >= 70
    assert markdown_documents(tmp_path)[0].title == "Guide"


def test_corpus_without_docs_folder_still_has_pydoc(tmp_path: Path):
    assert load_corpus(tmp_path / "missing") == pydoc_documents()


def test_an_empty_corpus_names_the_folder_to_fill(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # Python builds without pydoc topics exist (e.g. some slim images); only then can this happen.
    monkeypatch.setattr("dagma.lib.data.pydoc_documents", lambda: [])
    (tmp_path / "empty.md").write_text("  \n")
    with pytest.raises(ValueError, match=rf"no Markdown files under {tmp_path}\. Add Markdown"):
        load_corpus(tmp_path)


# The first 16 hex digits of SHA-256("abc"), the FIPS 180-2 test vector: not a secret.
ABC_SHA = "ba7816bf8f01cfea"  # pragma: allowlist secret


def test_document_sha_is_stable():
    docs = load_corpus(None)
    # the first 16 hex digits of the text's SHA-256: the same in every process, title aside
    assert Document("s", "t", "abc").sha == ABC_SHA
    assert Document("other", "other", "abc").sha == ABC_SHA
    assert Document("s", "t", "abd").sha != ABC_SHA
    with pytest.raises(AttributeError):
        docs[0].text = "changed"  # type: ignore[misc]
