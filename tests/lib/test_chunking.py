import pytest

from dagma.lib.chunking import chunk_documents, chunk_text
from dagma.lib.data import Document


def test_chunks_respect_the_limit_and_keep_all_words():
    text = "\n\n".join(f"Paragraph {i}. " + "word " * (20 + i * 7) for i in range(30))
    chunks = chunk_text(text, max_chars=300)
    assert all(len(c) <= 300 for c in chunks)
    assert " ".join(chunks).split() == text.split()


def test_a_single_long_paragraph_is_split_by_sentence_and_width():
    text = "A" * 1000 + ". Short sentence."
    chunks = chunk_text(text, max_chars=200)
    assert all(len(c) <= 200 for c in chunks)
    assert "".join(chunks).replace(" ", "").startswith("A" * 200)


def test_chunking_is_deterministic_and_overlap_carries_text():
    sentences = [f"Sentence number {i} is here." for i in range(50)]
    text = "\n\n".join(sentences)
    # whole sentences packed greedily: four (at most 111 chars) fit in 120, five do not
    assert chunk_text(text, 120) == [" ".join(sentences[i : i + 4]) for i in range(0, 50, 4)]
    overlapped = chunk_text(text, 120, overlap=20)
    assert overlapped[1].startswith(overlapped[0][-20:].strip())


@pytest.mark.parametrize(("max_chars", "overlap"), [(10, 0), (200, 150), (200, -1)])
def test_bad_sizes_are_refused_with_the_limit(max_chars, overlap):
    with pytest.raises(ValueError, match="must be"):
        chunk_text("text", max_chars, overlap)


def test_chunk_documents_numbers_chunks_per_source():
    docs = [Document("a", "A", "x " * 300), Document("b", "B", "short")]
    chunks = chunk_documents(docs, max_chars=100)
    assert [c.index for c in chunks if c.source == "b"] == [0]
    assert [c.index for c in chunks if c.source == "a"] == list(range(len(chunks) - 1))
    assert chunks[0].payload()["source"] == "a"
