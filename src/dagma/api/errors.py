"""Every error the API returns is JSON: `{"error": <the problem>, "fix": <what to do>}`.

Bad input is 422 (with the validation `details`), an unknown model or no champion 404, a backend
that cannot be reached (MLflow, the vector store, the chat model) 503, a generation that took
too long 504. Tokens are the auth module's: 401 and 403 come through `HTTPException`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from dagma.errors import DagmaError

log = logging.getLogger(__name__)


class Problem(BaseModel):
    """The body of every error response."""

    error: str
    fix: str
    details: list[dict[str, Any]] | None = None


class ApiError(DagmaError):
    """A request the API cannot serve: its HTTP `status`, the problem and the `fix`."""

    def __init__(
        self,
        status: int,
        error: str,
        fix: str,
        *,
        details: Sequence[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(error)
        self.status = status
        self.fix = fix
        self.details = list(details) if details is not None else None
        self.headers = headers

    def response(self) -> JSONResponse:
        body = Problem(error=str(self), fix=self.fix, details=self.details)
        return JSONResponse(
            jsonable_encoder(body, exclude_none=True), status_code=self.status, headers=self.headers
        )


def bad_input(error: str, fix: str, details: Sequence[dict[str, Any]] | None = None) -> ApiError:
    return ApiError(422, error, fix, details=details)


def unavailable(what: str, exc: BaseException, fix: str) -> ApiError:
    """503: `what` cannot be reached or read; `exc` says why."""
    return ApiError(503, f"{what} is unavailable: {exc}", fix, headers={"Retry-After": "5"})


def validation_details(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """Pydantic's errors without the echoed input or the context objects: loc, msg and type."""
    return [
        {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type"))}
        for e in errors
    ]


def invalid(errors: Sequence[Any], fix: str) -> ApiError:
    """422 naming the first problem of a failed validation, with all of them as details."""
    details = validation_details(errors)
    first = details[0] if details else {"loc": [], "msg": "invalid request"}
    where = ".".join(str(part) for part in first["loc"]) or "the request"
    more = f" (and {len(details) - 1} more problems)" if len(details) > 1 else ""
    return bad_input(f"{where}: {first['msg']}{more}", fix, details)


def install(app: FastAPI) -> None:
    """The exception handlers that give every error of `app` the one JSON shape."""

    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        if not isinstance(exc, ApiError):  # pragma: no cover - registered for ApiError only
            raise exc
        return exc.response()

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        errors = exc.errors() if isinstance(exc, RequestValidationError) else []
        fix = f"Send what the schema of {request.method} {request.url.path} at /docs says."
        return invalid(errors, fix).response()

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        if not isinstance(exc, StarletteHTTPException):  # pragma: no cover
            raise exc
        detail = exc.detail
        if isinstance(detail, dict) and "error" in detail:
            error, fix = str(detail["error"]), str(detail.get("fix", ""))
        else:
            error, fix = str(detail), _fix_for_status(exc.status_code)
        headers = dict(exc.headers or {})
        return ApiError(exc.status_code, error, fix, headers=headers or None).response()

    async def on_dagma_error(request: Request, exc: Exception) -> JSONResponse:
        return unavailable("a backend", exc, "Fix what the error names, then retry.").response()

    async def on_anything(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return ApiError(
            500,
            f"internal error: {type(exc).__name__}",
            "This is a bug: the server log has the traceback; report it with the request.",
        ).response()

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(DagmaError, on_dagma_error)
    app.add_exception_handler(Exception, on_anything)


def _fix_for_status(status: int) -> str:
    return {
        401: "Send a valid token: Authorization: Bearer <token> (`dagma token issue`).",
        403: "Use a token with the scope this endpoint needs.",
        404: "Check the path and the method against /docs.",
        405: "Check the method against /docs.",
    }.get(status, "See /docs for what this API accepts.")
