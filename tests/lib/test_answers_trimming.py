"""An answer the token limit cut ends at its last complete sentence, and says it was trimmed."""

import pytest
from langchain_core.documents import Document
from langchain_core.language_models import FakeListChatModel
from langchain_core.messages import AIMessage

from dagma.lib.answers import Answer, assemble_answer, finish_reason
from dagma.lib.llm import LLMSettings, chat_model
from dagma.lib.rag import RagPipeline, StoreRetriever
from dagma.lib.sentences import ELLIPSIS, settled_prefix, split_sentences, trim_to_sentence

# What `dagma demo` printed before (issue 20): SmolLM2 stopped by max_tokens inside item 3.
DEMO_CUT = (
    "To catch an exception and still run clean-up code, you can use a try statement with a "
    "finally clause. Here's how it works:\n\n1. The try clause is executed first.\n2. If an "
    "exception occurs, the finally clause is executed before the exception is re-raised. "
    "3. So, in this scenario, you"
)


def texts(text: str) -> list[tuple[str, bool]]:
    return [(s.text, s.complete) for s in split_sentences(text)]


def test_the_demo_answer_loses_only_its_unfinished_sentence() -> None:
    text, trimmed = trim_to_sentence(DEMO_CUT)
    assert trimmed
    assert text.endswith("before the exception is re-raised.")
    assert "3. So" not in text and text == DEMO_CUT[: DEMO_CUT.index(" 3. So")]
    assert texts(DEMO_CUT)[-1] == ("3. So, in this scenario, you", False)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (  # abbreviations, a title and a decimal are not sentence ends
            "Use e.g. a list, i.e. what Mr. Smith said. It costs 3.5 seconds! Really? Yes.",
            [
                ("Use e.g. a list, i.e. what Mr. Smith said.", True),
                ("It costs 3.5 seconds!", True),
                ("Really?", True),
                ("Yes.", True),
            ],
        ),
        (  # "3." after a sentence is a list number; "is 3." ends one
            "It runs twice. 3. Then it stops. The answer is 3. Done.",
            [
                ("It runs twice.", True),
                ("3. Then it stops.", True),
                ("The answer is 3.", True),
                ("Done.", True),
            ],
        ),
        (  # code spans keep their dots; citations stay with their sentence
            "Call `os.path.join(a, b)` first [1]. Then `x.y()` works [2, 3]. And",
            [
                ("Call `os.path.join(a, b)` first [1].", True),
                ("Then `x.y()` works [2, 3].", True),
                ("And", False),
            ],
        ),
        (  # bullet and numbered lines are sentences of their own, complete once the line ends
            "Steps:\n1. Open the file.\n2. Read it\n- close it\n- done",
            [
                ("Steps:", True),
                ("1. Open the file.", True),
                ("2. Read it", True),
                ("- close it", True),
                ("- done", False),
            ],
        ),
        (  # a closed code block is one unit, even with a blank line and dots inside
            "Like this:\n```python\ntry:\n    x = 1. \n\nfinally:\n    pass\n```\nThat is it.",
            [
                ("Like this:", True),
                ("```python\ntry:\n    x = 1. \n\nfinally:\n    pass\n```", True),
                ("That is it.", True),
            ],
        ),
        (  # an ellipsis before a lowercase word continues the sentence
            'He said "stop." Wait... what happened? The end',
            [('He said "stop."', True), ("Wait... what happened?", True), ("The end", False)],
        ),
    ],
)
def test_sentences_of_real_answers(text: str, expected: list[tuple[str, bool]]) -> None:
    assert texts(text) == expected
    for s in split_sentences(text):
        assert text[s.start : s.end] == s.text


def test_trimming_keeps_a_complete_answer_and_marks_a_hopeless_one() -> None:
    assert trim_to_sentence("It raises NameError. Always.  ") == (
        "It raises NameError. Always.",
        False,
    )
    # nothing complete: the text is kept, and the ellipsis says it was cut
    assert trim_to_sentence("The finally clause runs when") == (
        "The finally clause runs when" + ELLIPSIS,
        True,
    )
    # an open code block is cut; so is the line that only introduced it
    assert trim_to_sentence("It is simple. Like this:\n```python\ntry:\n    x") == (
        "It is simple.",
        True,
    )
    assert trim_to_sentence("") == ("", False)


def test_what_streams_first_is_never_taken_back() -> None:
    for text in (DEMO_CUT, "Use e.g. a list. The answer is 3. the end. More [1]. x"):
        shown = ""
        for end in range(len(text) + 1):
            settled = settled_prefix(text[:end])
            assert settled.startswith(shown), (text[:end], shown, settled)
            shown = settled
        assert trim_to_sentence(text)[0].startswith(shown.strip())


DOCS = [
    Document(
        "The finally clause is always executed before leaving the try statement.",
        metadata={"id": "a", "source": "pydoc:try", "score": 0.7},
    )
]


def test_assemble_answer_trims_only_what_the_limit_cut() -> None:
    cut = assemble_answer("q", DOCS, DEMO_CUT, finish_reason="length")
    assert cut.trimmed and cut.finish_reason == "length"
    assert cut.text.endswith("re-raised.") and cut.raw_text == DEMO_CUT
    assert [a.sentence for a in cut.attributions][-1].endswith("re-raised.")
    # a model that stopped by itself keeps its last words, period or not
    stopped = assemble_answer(
        "q", DOCS, "It always runs, see the finally clause", finish_reason="stop"
    )
    assert (stopped.trimmed, stopped.text) == (False, "It always runs, see the finally clause")
    unknown = assemble_answer("q", DOCS, DEMO_CUT)
    assert not unknown.trimmed and unknown.text == DEMO_CUT
    assert Answer.model_validate_json(cut.model_dump_json()) == cut


def test_the_finish_reason_is_read_from_each_backend_s_reply() -> None:
    assert finish_reason(AIMessage("x", response_metadata={"finish_reason": "length"})) == "length"
    assert finish_reason(AIMessage("x", response_metadata={"done_reason": "stop"})) == "stop"
    assert finish_reason(AIMessage("x")) is None


def search(query: str, k: int) -> list:
    from types import SimpleNamespace

    text = "If the name is unbound, a NameError exception will be raised. Deletion is recursive."
    return [SimpleNamespace(id="d1", score=0.8, payload={"text": text, "source": "pydoc:del"})]


QUESTION = "What error is raised when you delete a name that is unbound?"


def test_the_local_model_stopped_by_its_limit_is_trimmed_streamed_or_not() -> None:
    model = chat_model(LLMSettings(max_tokens=24))
    pipeline = RagPipeline(StoreRetriever(search=search, k=1), model)
    ans = pipeline.answer(QUESTION)
    assert ans.finish_reason == "length" and ans.output_tokens == 24
    assert ans.trimmed and ans.raw_text.startswith(ans.text.removesuffix(ELLIPSIS))
    assert ans.text.rstrip(")]'\"").endswith((".", "!", "?", ELLIPSIS)), ans.text
    docs = pipeline.retrieve(QUESTION)
    streamed = "".join(pipeline.stream(QUESTION, docs))
    assert streamed == ans.raw_text
    again = pipeline.assemble(QUESTION, docs, streamed)
    assert (again.text, again.trimmed, again.finish_reason) == (ans.text, True, "length")


def test_a_reply_within_the_limit_is_kept_whole() -> None:
    model = FakeListChatModel(responses=["NameError, if the name is unbound"])
    ans = RagPipeline(StoreRetriever(search=search, k=1), model).answer(QUESTION)
    assert not ans.trimmed and ans.text == "NameError, if the name is unbound"
