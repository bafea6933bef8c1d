"""Deterministic text chunking: the same text always gives the same chunks."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from dagma.lib.data import Document

_PARAGRAPHS = re.compile(r"\n\s*\n")
_SENTENCES = re.compile(r"(?<=[.!?:])\s+")


@dataclass(frozen=True)
class Chunk:
    """A piece of one document, small enough to embed and to quote."""

    source: str
    title: str
    index: int
    text: str

    @property
    def key(self) -> str:
        return f"{self.source}#{self.index}"

    def payload(self) -> dict[str, str | int]:
        return {"source": self.source, "title": self.title, "chunk": self.index, "text": self.text}


def _pieces(text: str, max_chars: int) -> Iterator[str]:
    """Paragraphs, split further by sentence and then by width when still too long."""
    for para in _PARAGRAPHS.split(text):
        para = " ".join(para.split())
        if not para:
            continue
        if len(para) <= max_chars:
            yield para
            continue
        for sentence in _SENTENCES.split(para):
            while len(sentence) > max_chars:
                cut = sentence.rfind(" ", 0, max_chars)
                cut = cut if cut > max_chars // 2 else max_chars
                yield sentence[:cut]
                sentence = sentence[cut:].lstrip()
            if sentence:
                yield sentence


def chunk_text(text: str, max_chars: int = 800, overlap: int = 0) -> list[str]:
    """Pack paragraphs into chunks of at most `max_chars`, carrying `overlap` trailing chars."""
    if max_chars < 50:
        raise ValueError(f"max_chars must be at least 50, got {max_chars}.")
    if not 0 <= overlap < max_chars // 2:
        raise ValueError(f"overlap must be in [0, {max_chars // 2}), got {overlap}.")
    chunks: list[str] = []
    current = ""
    for piece in _pieces(text, max_chars - overlap):
        if current and len(current) + 1 + len(piece) > max_chars:
            chunks.append(current)
            tail = current[-overlap:] if overlap else ""
            current = f"{tail} {piece}".strip() if tail else piece
        else:
            current = f"{current} {piece}" if current else piece
    if current:
        chunks.append(current)
    return chunks


def chunk_documents(
    docs: Iterable[Document], max_chars: int = 800, overlap: int = 0
) -> list[Chunk]:
    """Chunk every document; chunk order follows document order."""
    return [
        Chunk(source=doc.source, title=doc.title, index=i, text=text)
        for doc in docs
        for i, text in enumerate(chunk_text(doc.text, max_chars, overlap))
    ]
