"""Every answer sentence is attributed to the passage that supports it best, with its score."""

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
from langchain_core.documents import Document

from dagma.lib.answers import answer_lines, assemble_answer
from dagma.lib.attribution import SUPPORT_THRESHOLD, attribute, lexical_support
from dagma.lib.embeddings import get_embedder
from dagma.lib.evaluation import load_questions

ROOT = Path(__file__).resolve().parents[2]
PASSAGES = [
    "The while statement is used for repeated execution as long as an expression is true.",
    "The try statement specifies exception handlers and/or cleanup code. The finally clause "
    "is always executed on the way out of the try statement, whether an exception occurred.",
    "The del statement deletes names. If the name is unbound, a NameError exception is raised.",
]


@pytest.fixture(scope="module")
def embedder():
    return get_embedder("model2vec")


def test_each_sentence_goes_to_the_passage_that_supports_it(embedder) -> None:
    text = (
        "Use a try statement: the finally clause is always executed on the way out. "
        "Deleting an unbound name raises NameError. I hope this helps!"
    )
    found = attribute(text, PASSAGES, embedder)
    assert [(a.source, a.explicit) for a in found] == [(2, False), (3, False), (None, False)]
    assert all(a.score >= SUPPORT_THRESHOLD for a in found[:2])
    assert found[2].score < SUPPORT_THRESHOLD  # reported even when no passage supports it
    assert found[0].sentence.startswith("Use a try statement")


def test_explicit_citations_win_and_carry_their_score(embedder) -> None:
    found = attribute("Deleting an unbound name raises NameError [1].", PASSAGES, embedder)
    [one] = found
    assert (one.source, one.explicit) == (1, True)  # the model's claim, however weak
    assert one.score < SUPPORT_THRESHOLD
    [two] = attribute("Deleting an unbound name raises NameError [1, 3].", PASSAGES, embedder)
    assert (two.source, two.explicit) == (3, True)  # the better of the cited passages
    [out] = attribute("It raises NameError [7].", PASSAGES, embedder)
    assert (out.source, out.explicit) == (3, False)  # out of range: attributed as if uncited


def test_a_sentence_without_content_words_is_not_attributed(embedder) -> None:
    [it] = attribute("It is so.", PASSAGES, embedder)
    assert (it.source, it.score) == (None, 0.0)
    [intro] = attribute("The finally clause is executed like this:", PASSAGES, embedder)
    assert intro.source is None and intro.score >= SUPPORT_THRESHOLD  # it claims nothing yet
    assert attribute("", PASSAGES, embedder) == []
    assert lexical_support("finally always executed", PASSAGES[1]) == 1.0


def test_assemble_answer_cites_the_attributed_passages() -> None:
    docs = [
        Document(p, metadata={"id": str(i), "source": f"pydoc:{i}", "score": 0.5 + i / 10})
        for i, p in enumerate(PASSAGES)
    ]
    ans = assemble_answer("q", docs, "The finally clause is always executed on the way out.")
    assert [s.cited for s in ans.sources] == [False, True, False]
    assert [a.source for a in ans.attributions] == [2]
    assert ans.confidence == pytest.approx(0.6)  # the cited passage's score, not halved
    assert ans.cited_text() == "The finally clause is always executed on the way out. [2]"
    marked = assemble_answer("q", docs, "The finally clause always runs [2]. Nothing else.")
    assert marked.cited_text() == marked.text  # cited already; the other sentence unsupported


def test_the_threshold_separates_support_on_the_labelled_questions(embedder) -> None:
    """Calibration (docs/llm.md): each question's evidence against its top 4 chunks."""
    spec = importlib.util.spec_from_file_location(
        "label_eval_chunks", ROOT / "scripts" / "label_eval_chunks.py"
    )
    assert spec and spec.loader
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    chunks = script.corpus_chunks()
    vectors = embedder.embed([c.text for c in chunks])
    questions = load_questions(ROOT / "evals" / "questions.jsonl")
    right = total = supported = evidence = off_topic = unrelated = 0
    for j, q in enumerate(questions):
        top = np.argsort(-(vectors @ embedder.embed([q.question])[0]))[:4]
        given = [chunks[i] for i in top]
        if not any(c.key in q.chunks for c in given):
            continue
        for phrase in q.evidence:
            [a] = attribute(phrase.rstrip(".") + ".", [c.text for c in given], embedder)
            total += 1
            right += a.source is not None and given[a.source - 1].key in q.chunks
            evidence += 1
            supported += a.source is not None
        other = questions[(j + 7) % len(questions)]
        for phrase in other.evidence:
            [a] = attribute(phrase.rstrip(".") + ".", [c.text for c in given], embedder)
            unrelated += 1
            off_topic += a.source is not None
    assert total > 30
    assert right / total >= 0.9  # the best passage is the labelled chunk
    assert supported == evidence  # verbatim evidence is always supported
    assert off_topic / unrelated <= 0.1  # another question's evidence rarely is


def test_answer_lines_show_each_sentence_with_its_source_and_score() -> None:
    docs = [
        Document(p, metadata={"id": str(i), "source": f"pydoc:{i}", "score": 0.5})
        for i, p in enumerate(PASSAGES)
    ]
    text = "The finally clause is always executed on the way out. I hope this helps! And so"
    lines = answer_lines(assemble_answer("Why?", docs, text, finish_reason="length"))
    assert lines[:2] == ["Q: Why?", "A:"]
    assert re.fullmatch(r"  The finally clause .* way out\. \[2\] \(0\.\d\d\)", lines[2])
    assert re.fullmatch(r"  I hope this helps! \[\?\] \(0\.\d\d\)", lines[3])
    assert "trimmed" in lines[4] and "And so" not in "".join(lines)
    assert lines[5:] == [
        "Sources:",
        "  [1] pydoc:0 (retrieval 0.500)",
        f"  [2] pydoc:1 (retrieval 0.500, cited, support {lines[2][-5:-1]})",
        "  [3] pydoc:2 (retrieval 0.500)",
    ]
