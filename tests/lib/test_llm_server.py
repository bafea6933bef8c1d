"""The ``openai`` backend against a real OpenAI-compatible server: llama.cpp's, serving SmolLM2."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from langchain_core.utils.function_calling import convert_to_openai_tool

from dagma.lib.llm import LLMError, LLMSettings, chat_model, check_backend, openai_server_command
from dagma.lib.rag import (
    RAG_PROMPT,
    Draft,
    RagPipeline,
    StoreRetriever,
    format_context,
    hit_to_document,
)
from dagma.services.procs import free_port

pytestmark = pytest.mark.integration

START_TIMEOUT_S = 60


@dataclass(frozen=True)
class Hit:
    id: str
    score: float
    payload: dict[str, Any]


CORPUS = [
    Hit(
        "d1",
        0.8,
        {
            "source": "pydoc:del",
            "title": "del",
            "text": "Deleting an unbound name raises NameError.",
        },
    ),
    Hit("d2", 0.5, {"source": "pydoc:pass", "title": "pass", "text": "pass is a null operation."}),
    Hit(
        "d3",
        0.3,
        {"source": "pydoc:break", "title": "break", "text": "break ends the nearest loop."},
    ),
]
QUESTION = "What error is raised when you delete an unbound name?"


def search(query: str, k: int, filter: dict[str, Any] | None = None) -> list[Hit]:
    return CORPUS[:k]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL of a llama.cpp OpenAI-compatible server, stopped after the module."""
    port = free_port()
    log_path: Path = tmp_path_factory.mktemp("llm-server") / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            openai_server_command(LLMSettings(), "127.0.0.1", port),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        base_url = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"the server exited ({proc.returncode}): {log_path.read_text()[-2000:]}"
                )
            try:
                if httpx.get(f"{base_url}/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"no answer in {START_TIMEOUT_S} s: {log_path.read_text()[-2000:]}")
            time.sleep(0.2)
        yield base_url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def settings(server: str) -> LLMSettings:
    served = httpx.get(f"{server}/models", timeout=5).json()["data"]
    env = {"DAGMA_LLM": "openai", "OPENAI_BASE_URL": server, "DAGMA_LLM_MODEL": served[0]["id"]}
    return LLMSettings.from_env(env, max_tokens=32)


@pytest.fixture(scope="module")
def pipeline(settings: LLMSettings) -> RagPipeline:
    return RagPipeline(StoreRetriever(search=search, k=3), chat_model(settings))


def test_check_backend_passes(settings: LLMSettings) -> None:
    assert settings.model == "SmolLM2-135M-Instruct.Q4_1"  # the alias from openai_server_command
    assert check_backend(settings) == f"openai: {settings.model} at {settings.openai_base_url}"


def test_check_backend_names_a_model_the_server_lacks(settings: LLMSettings) -> None:
    other = replace(settings, model="gpt-none")
    with pytest.raises(
        LLMError, match=r"does not serve DAGMA_LLM_MODEL=gpt-none; it serves: SmolLM2"
    ):
        check_backend(other)


def test_stream_yields_tokens(pipeline: RagPipeline) -> None:
    chunks = list(pipeline.stream(QUESTION))
    assert len(chunks) > 1 and all(chunks)  # no empty chunk is passed on
    assert "".join(chunks).strip()


def test_the_server_binds_the_forced_tool_call_to_the_schema(settings: LLMSettings) -> None:
    # langchain-openai names the tool in tool_choice; llama.cpp's chatml handler then samples
    # the call's arguments under a grammar made from the Draft JSON schema
    docs = [hit_to_document(h) for h in CORPUS]
    prompt = RAG_PROMPT.invoke({"question": QUESTION, "context": format_context(docs)})
    model = chat_model(replace(settings, max_tokens=200))  # room to close the JSON
    structured = model.with_structured_output(Draft, method="function_calling", include_raw=True)
    result = structured.invoke(prompt)
    raw = result["raw"]
    assert raw.content == "" and [c["name"] for c in raw.tool_calls] == ["Draft"]
    args = raw.tool_calls[0]["args"]
    jsonschema.validate(args, convert_to_openai_tool(Draft)["function"]["parameters"])
    assert result["parsing_error"] is None and result["parsed"] == Draft(**args)


def test_answer_through_structured_output(pipeline: RagPipeline) -> None:
    assert pipeline.structured_method == "function_calling"
    ans = pipeline.answer(QUESTION)
    assert ans.parsed == "structured"  # a Draft, even if max_tokens cut the call short
    assert ans.text.strip()
    assert [s.id for s in ans.sources] == ["d1", "d2", "d3"]
    assert 0 < ans.output_tokens <= 32  # one call, reported by the server, within max_tokens
    assert 0 < ans.generation_s <= ans.latency_s
    # the retrieval heuristic, lowered to the model's own confidence when it gave one
    cited = [s.score for s in ans.sources if s.cited]
    heuristic = max(cited) if cited else max(s.score for s in ans.sources) / 2
    model = 1.0 if ans.model_confidence is None else ans.model_confidence
    assert ans.confidence == pytest.approx(min(heuristic, model))


def test_a_call_cut_short_by_max_tokens_is_still_structured(settings: LLMSettings) -> None:
    # 16 tokens stop the call inside its JSON, after the answer began: langchain-openai reports
    # an invalid tool call, which is read as a draft instead of asking again for plain text
    short = chat_model(replace(settings, max_tokens=16))
    ans = RagPipeline(StoreRetriever(search=search, k=3), short).answer(QUESTION)
    assert (ans.parsed, ans.output_tokens) == ("structured", 16)  # one call, cut at the limit
    assert ans.text.strip()


def test_closed_port_fails_clearly(settings: LLMSettings) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    closed = replace(settings, openai_base_url=url)
    match = rf"DAGMA_LLM=openai: cannot reach OPENAI_BASE_URL={url} \(connection refused\); start"
    with pytest.raises(LLMError, match=match):
        check_backend(closed, timeout=2)
    with pytest.raises(LLMError, match=match):
        RagPipeline(StoreRetriever(search=search, k=3), chat_model(closed)).answer(QUESTION)
