"""Label each question of ``evals/questions.jsonl`` with the chunks that answer it.

A question's ``chunks`` are the keys (``source#index``) of the chunks of its labelled
``sources`` that quote one of its ``evidence`` phrases (whitespace-normalised,
case-insensitive). The chunks come from the same corpus and chunking (with the
``doc_vectors`` notebook's default parameters) that the demo publishes to the vector store,
so rerun this script whenever the corpus, the chunker or those parameters change:

    .venv/bin/python scripts/label_eval_chunks.py           # rewrite the file
    .venv/bin/python scripts/label_eval_chunks.py --check   # exit 1 if it is out of date

Nothing is written when a question's evidence is found in no chunk: fix its evidence
(or drop it) first.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from dagma.lib.chunking import Chunk, chunk_documents
from dagma.lib.data import load_corpus
from dagma.lib.evaluation import EvalQuestion, label_chunks
from dagma.notebooks.spec import parse_notebook

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ROOT / "evals" / "questions.jsonl"
NOTEBOOK = ROOT / "notebooks" / "doc_vectors.ipynb"
FIELDS = ("id", "question", "sources", "evidence", "chunks")


def corpus_chunks() -> list[Chunk]:
    """The demo corpus chunked exactly as the ``doc_vectors`` notebook does by default."""
    params = parse_notebook(NOTEBOOK).defaults
    return chunk_documents(
        load_corpus(ROOT / "docs"), max_chars=params["max_chars"], overlap=params["overlap"]
    )


def labelled_lines(text: str, chunks: list[Chunk]) -> tuple[list[str], list[str]]:
    """The question lines with fresh ``chunks``, and the ids whose evidence is in no chunk."""
    lines, missing = [], []
    for line in text.splitlines():
        if not line.strip():
            continue
        data: dict[str, Any] = json.loads(line)
        keys = label_chunks(EvalQuestion.model_validate(data), chunks)
        if not keys:
            missing.append(data["id"])
        data["chunks"] = list(keys)
        lines.append(json.dumps({k: data[k] for k in FIELDS if k in data}, ensure_ascii=False))
    return lines, missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check, exit 1 if stale")
    parser.add_argument("--questions", type=Path, default=QUESTIONS)
    args = parser.parse_args(argv)
    text = args.questions.read_text(encoding="utf-8")
    lines, missing = labelled_lines(text, corpus_chunks())
    if missing:
        print(f"evidence found in no chunk for: {', '.join(missing)}", file=sys.stderr)
        return 1
    new = "\n".join(lines) + "\n"
    if args.check:
        if new != text:
            print(f"{args.questions} is out of date: rerun {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    args.questions.write_text(new, encoding="utf-8")
    n_chunks = sum(len(json.loads(line)["chunks"]) for line in lines)
    print(f"labelled {len(lines)} questions with {n_chunks} chunks in {args.questions}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
