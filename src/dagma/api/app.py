"""The FastAPI app behind `dagma serve`: predict, search and ask, each behind a token scope.

`/healthz` is open; everything else needs a bearer token (`dagma.api.auth`). Errors are JSON
(`dagma.api.errors`). `/metrics` is open to a direct scrape (Prometheus on the same host or
network) and refused to anything a proxy forwards: the gateway routes every path of the API.
The champion model, the collection version and the chat model are read when asked for, so a
new champion or a newly published collection is served without a restart.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations, whose limits
# (`k`) come from the settings inside create_app.
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Body, Depends, FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from sse_starlette import EventSourceResponse
from starlette.routing import Match, Route

from dagma.api import errors
from dagma.api.ask import TIMEOUT_FIX, Asker, AskRequest, hang_up_safe
from dagma.api.auth import AuthError, Principal, TokenVerifier, auth_router, require_scope
from dagma.api.errors import ApiError, Problem
from dagma.api.login import login_router
from dagma.api.predict import Champions, Prediction
from dagma.api.search import Collection, SearchResult
from dagma.lib.answers import Answer
from dagma.lib.llm import LLMSettings
from dagma.lib.models import REGISTERED_MODEL
from dagma.lib.rag import MAX_QUESTION_CHARS, validate_question
from dagma.lib.telemetry import metrics, tracing
from dagma.settings import Settings, get_settings

DESCRIPTION = """\
The lab's champion model, its document collection and its RAG answers over HTTP.

Every endpoint but `/healthz` needs `Authorization: Bearer <token>` with the scope it names
(`dagma token issue --scope predict --scope search --scope ask`). Every error is JSON:
`{"error": "<the problem>", "fix": "<what to do>"}`.
"""

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "No usable token."},
    403: {"model": Problem, "description": "The token lacks the scope."},
    422: {"model": Problem, "description": "Bad input; `details` lists each problem."},
    503: {"model": Problem, "description": "A backend cannot be reached."},
}


class Component(BaseModel):
    """One backend of `/readyz`: reachable or not, what it is, and the fix when it is not."""

    ok: bool
    detail: str
    fix: str | None = None


class Readiness(BaseModel):
    """`/readyz`: ready when the model, the collection and the chat model all answer."""

    ready: bool
    components: dict[str, Component]


_bearer = HTTPBearer(auto_error=False, scheme_name="bearer", bearerFormat="JWT")


def any_token(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """A valid token of any scope (for `/readyz`), checked by the app's verifier."""
    verifier: TokenVerifier = request.app.state.verifier
    try:
        return verifier.verify(credentials.credentials if credentials else "", None)
    except AuthError as err:
        raise HTTPException(err.status, detail=err.detail(), headers=err.headers) from err


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API over `settings` (default: the environment); refuses to build without a way to
    check tokens (`dagma secrets init`, or DAGMA_OIDC_ISSUER)."""
    settings = settings or get_settings()
    collection = Collection(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        collection.close()

    app = FastAPI(
        title="Dagma API",
        description=DESCRIPTION,
        version="1",
        docs_url="/docs",
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.verifier = TokenVerifier.from_settings(settings)
    app.state.champions = Champions(
        settings.tracking_uri,
        ttl=settings.dagma_api_model_ttl,
        max_rows=settings.dagma_api_max_rows,
    )
    app.state.collection = collection
    app.state.asker = Asker(collection, LLMSettings.from_env(), settings.dagma_api_ask_timeout)
    errors.install(app)
    app.include_router(auth_router)
    app.include_router(login_router)
    app.include_router(_router(settings))
    app.openapi = _openapi(app)  # type: ignore[method-assign]
    metrics.enable()
    metrics.build_info()
    # An ASGI app as the endpoint: Starlette calls it as is, at exactly /metrics.
    app.router.routes.append(Route("/metrics", DirectOnly(metrics.asgi_app()), methods=["GET"]))
    app.add_middleware(RequestMetrics)
    if tracing.enabled():
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        FastAPIInstrumentor.instrument_app(
            app, tracer_provider=tracing.tracer_provider(), excluded_urls="/metrics,/healthz"
        )
    return app


METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Headers a reverse proxy adds (Traefik sets X-Forwarded-For on every request it forwards).
FORWARDED = (b"x-forwarded-for", b"forwarded", b"x-real-ip")


class RequestMetrics:
    """Counts and times each request under its route template (`/v1/search`), never its raw
    path: a path no route matches counts as "other", so scanners cannot grow the series."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]  # what the client gets when the app raises

        async def sending(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = route_template(scope)
            method = scope["method"] if scope["method"] in METHODS else metrics.OTHER
            metrics.record("dagma_api_requests", route=route, method=method, status=status[0])
            metrics.record(
                "dagma_api_request_duration_seconds",
                time.perf_counter() - started,
                route=route,
                method=method,
            )


def route_template(scope: Any) -> str:
    """The path template of the route that served the request; "other" when none matched."""
    route = scope.get("route")  # set for FastAPI's own routes
    if route is None:  # /metrics, /docs, /openapi.json: plain Starlette routes
        route = next((r for r in scope["app"].routes if r.matches(scope)[0] is Match.FULL), None)
    return getattr(route, "path", None) or metrics.OTHER


class DirectOnly:
    """The exposition for a direct scrape; 404 to a request a proxy forwarded."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if any(name in FORWARDED for name, _ in scope.get("headers", [])):
            response = JSONResponse(
                {"error": "not found", "fix": "Scrape /metrics on the API's own address."},
                status_code=404,
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _router(settings: Settings) -> APIRouter:
    router = APIRouter()
    max_k = settings.dagma_api_max_k

    @router.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        """Liveness: the process answers. Open, without a token."""
        return {"status": "ok"}

    @router.get(
        "/readyz",
        tags=["health"],
        response_model=Readiness,
        responses={**ERRORS, 503: {"model": Readiness, "description": "Something is down."}},
    )
    def readyz(request: Request, _: Annotated[Principal, Depends(any_token)]) -> JSONResponse:
        """Readiness, one backend at a time: the champion model, the collection, the chat model.

        200 when all three answer, else 503; each component says what to fix. Any valid token.
        """
        state = request.app.state
        checks: dict[str, Callable[[], str]] = {
            "model": lambda: _champion(state.champions),
            "collection": lambda: _collection(state.collection),
            "llm": state.asker.check,
        }
        components = {}
        for name, check in checks.items():
            try:
                components[name] = Component(ok=True, detail=check())
            except ApiError as exc:
                components[name] = Component(ok=False, detail=str(exc), fix=exc.fix)
            except Exception as exc:  # an LLMError, or a backend's own error
                components[name] = Component(
                    ok=False, detail=str(exc), fix="Fix what the detail names, then retry."
                )
        ready = all(c.ok for c in components.values())
        body = Readiness(ready=ready, components=components)
        return JSONResponse(body.model_dump(mode="json"), status_code=200 if ready else 503)

    @router.post(
        "/v1/predict",
        tags=["model"],
        response_model=Prediction,
        responses={**ERRORS, 404: {"model": Problem, "description": "No such model or champion."}},
    )
    def predict(
        request: Request,
        body: Annotated[dict[str, Any], Body(examples=[{"rows": [{"alcohol": 13.2}]}])],
        _: Annotated[Principal, Depends(require_scope("predict"))],
        model: Annotated[
            str,
            Query(
                min_length=1,
                max_length=256,
                description="A registered model; its `champion` version scores the rows.",
            ),
        ] = REGISTERED_MODEL,
    ) -> Any:
        """Score rows with the `champion` version of a registered model.

        The rows' schema is the champion's MLflow signature (this page shows the default
        model's); the response names the version that scored them.
        """
        champions: Champions = request.app.state.champions
        return champions.get(model).predict(body, champions.max_rows)

    @router.get("/v1/search", tags=["documents"], response_model=SearchResult, responses=ERRORS)
    def search(
        request: Request,
        _: Annotated[Principal, Depends(require_scope("search"))],
        q: Annotated[str, Query(max_length=4 * MAX_QUESTION_CHARS, description="The query text.")],
        k: Annotated[int, Query(ge=1, le=max_k, description="Hits to return.")] = 4,
        source: Annotated[
            str | None, Query(max_length=500, description="Only hits of this source.")
        ] = None,
        mmr: Annotated[bool, Query(description="Diverse hits (maximal marginal relevance).")] = (
            False
        ),
    ) -> SearchResult:
        """The `k` chunks nearest to `q` in the current version of the collection."""
        try:
            query = validate_question(q)
        except ValueError as exc:
            raise errors.bad_input(
                f"q: {exc}", f"Send a query of 1 to {MAX_QUESTION_CHARS} characters."
            ) from None
        result: SearchResult = request.app.state.collection.search(query, k, source, mmr)
        return result

    @router.post(
        "/v1/ask",
        tags=["documents"],
        response_model=Answer,
        responses={
            **ERRORS,
            200: {
                "description": "The `Answer`; or, with `Accept: text/event-stream` or "
                "`stream`, server-sent events: `sources`, `token`s, then `answer` (or `error`).",
                "content": {"text/event-stream": {"schema": {"type": "string"}}},
            },
            504: {"model": Problem, "description": "Generation took too long."},
        },
    )
    async def ask(
        request: Request,
        body: AskRequest,
        _: Annotated[Principal, Depends(require_scope("ask"))],
        stream: Annotated[bool, Query(description="Stream server-sent events.")] = False,
    ) -> Any:
        """A RAG answer with its sources, whole or streamed as server-sent events."""
        asker: Asker = request.app.state.asker
        deadline = time.monotonic() + asker.timeout
        accept = request.headers.get("accept", "")
        if stream or body.stream or "text/event-stream" in accept:
            pipeline, docs = await run_in_threadpool(asker.retrieve, body)
            events = asker.events(body, pipeline, docs, deadline)
            return EventSourceResponse(hang_up_safe(events), ping=15)
        try:
            with anyio.fail_after(asker.timeout):
                # Abandoned on timeout: the worker finishes its (token-capped) answer alone.
                return await anyio.to_thread.run_sync(
                    asker.answer, body, deadline, abandon_on_cancel=True
                )
        except TimeoutError:
            raise ApiError(
                504,
                f"the answer took longer than DAGMA_API_ASK_TIMEOUT={asker.timeout:g} s",
                TIMEOUT_FIX,
            ) from None

    return router


def _champion(champions: Champions) -> str:
    version = champions.version(REGISTERED_MODEL)
    return f"{REGISTERED_MODEL} version {version} is champion"


def _collection(collection: Collection) -> str:
    current = collection.version()
    return f"{collection.name} version {current.version}: {current.points} points"


def _openapi(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """OpenAPI with `/v1/predict`'s body and response from the default champion's signature."""

    def openapi() -> dict[str, Any]:
        schema = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
        )
        champions: Champions = app.state.champions
        served = champions.cached(REGISTERED_MODEL)
        if served is None:
            try:
                served = champions.get(REGISTERED_MODEL)
            except ApiError:
                return schema  # no champion yet: the generic row schema stays
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        refs = {}
        for kind, model, mode in (
            ("request", served.schemas.request, "validation"),
            ("response", served.schemas.response, "serialization"),
        ):
            found = model.model_json_schema(
                ref_template="#/components/schemas/{model}",
                mode=mode,  # type: ignore[arg-type]
            )
            components.update(found.pop("$defs", {}))
            components[model.__name__] = found
            refs[kind] = {"$ref": f"#/components/schemas/{model.__name__}"}
        operation = schema["paths"]["/v1/predict"]["post"]
        operation["requestBody"]["content"]["application/json"]["schema"] = refs["request"]
        operation["responses"]["200"]["content"]["application/json"]["schema"] = refs["response"]
        return schema

    return openapi
