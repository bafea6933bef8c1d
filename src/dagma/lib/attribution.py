"""Which retrieved passage supports each sentence of an answer, and how well.

Works without the model's help: a model that writes no ``[n]`` still gets its sentences
attributed. A sentence's score against a passage is the mean of two measures in [0, 1]:

- the cosine of their embeddings (the lab's embedder, :func:`dagma.lib.embeddings.get_embedder`,
  a static model2vec model: fast and offline), clipped at 0;
- lexical support: the share of the sentence's content words (lowercased, no stopwords, no
  ``[n]``) that occur in the passage.

The sentence goes to the passage it scores best against, or to none (unsupported) below
:data:`SUPPORT_THRESHOLD`. A sentence that cites ``[n]`` itself keeps the cited passage it
scores best against (explicit citations win), even below the threshold: its score then says
how well the text backs the model's claim. A sentence without content words is not attributed,
nor is one that only introduces what follows (it ends in ``:``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, Field

from dagma.lib.citations import citation_numbers, strip_citations
from dagma.lib.embeddings import Embedder
from dagma.lib.sentences import split_sentences

__all__ = [
    "STOPWORDS",
    "SUPPORT_THRESHOLD",
    "Attribution",
    "attribute",
    "content_tokens",
    "lexical_support",
]

# Calibrated on evals/questions.jsonl against each question's top 4 chunks (docs/llm.md,
# tests/lib/test_attribution.py): evidence scores 0.73+ against its labelled chunk, a paraphrase
# (the question) 0.5+ in 96% of cases, evidence of an unrelated question 0.5+ in 5%.
SUPPORT_THRESHOLD = 0.5

_WORD = re.compile(r"[a-z0-9_]+(?:'[a-z]+)?")
_STOPWORDS = """a about above after again against all am an and any are as at be because been before
    being below between both but by can can't cannot could did do does doing don't down during
    each few for from further had has have having he her here hers herself him himself his how
    i if in into is isn't it it's its itself just let's me more most my myself no nor not of off
    on once only or other ought our ours ourselves out over own same she should so some such
    than that that's the their theirs them themselves then there there's these they this those
    through to too under until up very was we were what what's when where which while who whom
    why will with would you your yours yourself yourselves also may might must shall use used
    using s t"""
STOPWORDS = frozenset(_STOPWORDS.split())


class Attribution(BaseModel):
    """One answer sentence and the passage that supports it best.

    ``source`` is the 1-based index into ``Answer.sources``, ``None`` when no passage reaches
    the threshold; ``score`` in [0, 1] is the sentence's score against it (against the best
    passage when unsupported); ``explicit`` when the sentence's own ``[n]`` chose the passage.
    """

    sentence: str
    source: int | None = Field(default=None, ge=1)
    score: float = Field(ge=0.0, le=1.0)
    explicit: bool = False


def content_tokens(text: str) -> list[str]:
    """Lowercased words of ``text`` without ``[n]`` citation markers and English stopwords."""
    text = strip_citations(text.lower().replace("\u2019", "'"))
    return [w for w in _WORD.findall(text) if w not in STOPWORDS]


def lexical_support(sentence: str, passage: str) -> float:
    """Share of the sentence's content words found in ``passage``; 0.0 when it has none."""
    words = content_tokens(sentence)
    if not words:
        return 0.0
    vocabulary = set(content_tokens(passage))
    return sum(w in vocabulary for w in words) / len(words)


def attribute(
    text: str,
    passages: Sequence[str],
    embedder: Embedder | None,
    threshold: float = SUPPORT_THRESHOLD,
) -> list[Attribution]:
    """One :class:`Attribution` per sentence of ``text`` against ``passages`` (``[n]`` = n-th).

    Without an ``embedder`` the score is the lexical support alone.
    """
    sentences = [s.text for s in split_sentences(text)]
    if not sentences:
        return []
    scores = np.zeros((len(sentences), len(passages)))
    if passages:
        lexical = np.array([[lexical_support(s, p) for p in passages] for s in sentences])
        scores = lexical
        if embedder is not None:
            vectors = embedder.embed([strip_citations(s) for s in sentences] + list(passages))
            cosine = np.clip(vectors[: len(sentences)] @ vectors[len(sentences) :].T, 0.0, 1.0)
            scores = (lexical + cosine) / 2
    out = []
    for i, sentence in enumerate(sentences):
        row = scores[i]
        cited = citation_numbers(sentence, len(passages))
        if not content_tokens(sentence) or not len(row):
            out.append(Attribution(sentence=sentence, score=0.0))
        elif cited:
            best = max(cited, key=lambda n: row[n - 1])
            out.append(_made(sentence, best, row[best - 1], explicit=True))
        else:
            best = int(np.argmax(row)) + 1
            # "Here's how it works:" introduces what follows and claims nothing itself
            supported = row[best - 1] >= threshold and not sentence.endswith(":")
            out.append(_made(sentence, best if supported else None, row[best - 1]))
    return out


def _made(sentence: str, source: int | None, score: float, explicit: bool = False) -> Attribution:
    score = min(1.0, max(0.0, round(float(score), 4)))
    return Attribution(sentence=sentence, source=source, score=score, explicit=explicit)
