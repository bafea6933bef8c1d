"""Sentences of a generated answer: where they end, which are complete, and trimming a cut one.

Rule-based and offline (nltk's punkt and spaCy need downloaded models; pysbd is unmaintained).
A sentence ends at ``.``, ``!``, ``?`` or ``…`` (with closing quotes, brackets and ``[n]``
citations after it) followed by a space and anything but a lowercase letter, except after an
abbreviation (``e.g.``, ``i.e.``, ``Mr.``), as a list number (``3. So, ...``) or inside code
(```` `os.path.join` ```` and fenced blocks). A decimal (``3.5``) has no space after its point.
A bullet or numbered line is its own sentence, complete once its line has ended; so is a
closed code block.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["ELLIPSIS", "Sentence", "settled_prefix", "split_sentences", "trim_to_sentence"]

ELLIPSIS = "…"

# Never a sentence end: the next word continues the sentence even when it is capitalised.
_ABBREVIATIONS = frozenset(
    {"e.g", "i.e", "cf", "vs", "viz", "approx", "incl", "esp", "mr", "mrs", "ms", "dr", "prof"}
    | {"sr", "jr", "st", "no", "nos", "fig", "figs", "eq", "eqs", "vol", "pp", "ch", "sec", "al"}
    | {"ca", "resp", "dept"}
)
_CLOSERS = "\"')\\]\u201d\u2019"  # quotes (straight and curly) and brackets after a terminator
_CODE = re.compile(r"```.*?(?:```|\Z)|`[^`\n]*`", re.DOTALL)
_END = re.compile(rf"(?:[.!?]+|…)[{_CLOSERS}]*(?:\s*\[\d+(?:\s*,\s*\d+)*\])*(?=\s|\Z)")
_ITEM = re.compile(r"[ \t]*(?:[-*+•]|\d+[.)])[ \t]+")
_LIST_NUMBER = re.compile(r"\d+[.)]")


@dataclass(frozen=True)
class Sentence:
    """``text[start:end]`` of the answer; ``complete`` when it ended, not merely stopped."""

    text: str
    start: int
    end: int
    complete: bool


def _masked(text: str) -> str:
    """``text`` with code spans and blocks blanked out (same length), so nothing splits in them."""

    def blank(m: re.Match[str]) -> str:
        s = m.group(0)
        if not s.startswith("```"):
            return "`" + "x" * (len(s) - 1)
        # A closed block ends its sentence; an open one (cut by the limit) never does.
        closed = len(s) >= 6 and s.endswith("```")
        return ("```" + "x" * max(0, len(s) - 4) + ("." if closed else "x"))[: len(s)]

    return _CODE.sub(blank, text)


def _cuts(masked: str) -> list[tuple[int, bool]]:
    """Sentence ends in ``masked`` as (offset, complete), in order; the text's end is last."""
    cuts: list[tuple[int, bool]] = []
    start = 0
    for line in re.finditer(r"[^\n]*(?:\n|\Z)", masked):
        if not line.group(0):
            continue
        body = line.group(0)
        item = _ITEM.match(body)
        blank = not body.strip()
        # A list item, a blank line or a fenced block starts on its own line: end what came before.
        fence = body.lstrip().startswith("```")
        if (item or blank or fence) and masked[start : line.start()].strip():
            cuts.append((line.start(), True))  # the line before ended, and more text followed
            start = line.start()
        if blank:
            continue
        head = line.start() + (item.end() if item else 0)
        for m in _END.finditer(masked, head, line.start() + len(body.rstrip("\n"))):
            if _continues(masked, start, m.start(), m.end()):
                continue
            cuts.append((m.end(), True))
            start = m.end()
        if item and line.group(0).endswith("\n") and masked[start : line.end()].strip():
            cuts.append((line.end(), True))  # the item's line ended: the item is whole
            start = line.end()
    if masked[start:].strip():
        cuts.append((len(masked), False))
    return cuts


def _continues(masked: str, start: int, dot: int, end: int) -> bool:
    """Whether the terminator at ``dot`` is not a sentence end (abbreviation, list number...)."""
    words = masked[start:dot].split()
    word = words[-1] if words else ""
    rest = masked[end:].lstrip()
    if masked[dot] == "." and word.lower().lstrip("(\"'") in _ABBREVIATIONS:
        return True
    if len(words) == 1 and _LIST_NUMBER.fullmatch(masked[start:end].strip()):
        return True  # "3." opening a sentence is its list number
    return bool(rest) and rest[0].islower()


def split_sentences(text: str) -> list[Sentence]:
    """The sentences of ``text`` in order, stripped; only the last can be incomplete."""
    out: list[Sentence] = []
    begin = 0
    for end, complete in _cuts(_masked(text)):
        chunk = text[begin:end]
        lead = len(chunk) - len(chunk.lstrip())
        body = chunk.strip()
        if body:
            out.append(Sentence(body, begin + lead, begin + lead + len(body), complete))
        begin = end
    return out


def settled_prefix(text: str) -> str:
    """``text`` up to the end of its last sentence that another one follows.

    While a reply streams in, this prefix only grows, and no token limit can cut it: show it,
    and the rest once the whole answer is known.
    """
    sentences = split_sentences(text)
    return text[: sentences[-2].end] if len(sentences) > 1 else ""


def trim_to_sentence(text: str) -> tuple[str, bool]:
    """``text`` cut by a token limit, trimmed to its last complete sentence; and whether trimmed.

    An unfinished last sentence is dropped, and so is a line introducing it (ending in ``:``).
    When no sentence is complete, the text is kept
    with :data:`ELLIPSIS` appended, so a cut answer is never shown as if it were whole.
    """
    sentences = split_sentences(text)
    if not sentences or sentences[-1].complete:
        return text.strip(), False
    done = [s for s in sentences if s.complete]
    while done and done[-1].text.endswith(":"):
        done.pop()  # an introduction to what was cut says nothing on its own
    kept = text[: done[-1].end].strip() if done else ""
    return (kept or text.rstrip() + ELLIPSIS), True
