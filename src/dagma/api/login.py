"""Signing in a browser for the gateway: a token pasted once becomes an HttpOnly cookie.

The gateway asks `/v1/auth/check` before each UI request; a browser sends no
`Authorization` header, so it carries the token in the `dagma_token` cookie. This page sets
that cookie (HttpOnly, so no script on any UI can read it; Secure behind TLS; SameSite=Lax),
for the domain `DAGMA_COOKIE_DOMAIN` so that every UI host behind the gateway sees it, and
sends the browser back where it came from. With `DAGMA_LOGIN_URL` set, the check sends a
browser without a valid token here instead of answering 401.
"""

from __future__ import annotations

import html
import time
from urllib.parse import parse_qs, quote, urlsplit

import jwt
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from dagma.api.auth import COOKIE, UI_SCOPE, AuthError

login_router = APIRouter(tags=["auth"])
PATH = "/v1/auth/login"
# The form page loads and runs nothing.
_CSP = "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'"


def safe_next(target: str, domain: str | None) -> str:
    """Where to send the browser after signing in: a path here, or an https URL on the cookie's
    domain; anything else (another site: an open redirect) becomes `/`."""
    parts = urlsplit(target)
    if not parts.scheme and not parts.netloc and target.startswith("/") and "\\" not in target:
        return target if not target.startswith("//") else "/"
    host = (parts.hostname or "").lower()
    if domain and parts.scheme == "https" and (host == domain or host.endswith("." + domain)):
        return target
    return "/"


def login_redirect(request: Request, login_url: str) -> Response | None:
    """For a browser the gateway asked about: a redirect to the sign-in page, back to where it
    was going; None for any other client (it gets the 401)."""
    headers = request.headers
    if "text/html" not in headers.get("accept", "") or "x-forwarded-host" not in headers:
        return None
    proto = headers.get("x-forwarded-proto", "https")
    back = f"{proto}://{headers['x-forwarded-host']}{headers.get('x-forwarded-uri', '/')}"
    return RedirectResponse(f"{login_url}?next={quote(back, safe='')}", status_code=302)


@login_router.get(PATH, response_class=HTMLResponse, include_in_schema=False)
def form(request: Request, next: str = "/") -> HTMLResponse:
    return _page(next, None, 200)


@login_router.post(PATH, include_in_schema=False)
async def sign_in(request: Request) -> Response:
    """Check the pasted token (it needs the `ui` scope) and set it as the cookie."""
    fields = parse_qs((await request.body()).decode("utf-8", "replace"))
    token = (fields.get("token") or [""])[0].strip()
    target = (fields.get("next") or ["/"])[0]
    try:
        principal = request.app.state.verifier.verify(token, UI_SCOPE)
    except AuthError as err:
        return _page(target, f"{err} Fix: {err.fix}", err.status)
    domain = request.app.state.settings.dagma_cookie_domain
    expires = jwt.decode(token, options={"verify_signature": False}).get("exp")
    response = RedirectResponse(safe_next(target, domain), status_code=303)
    response.set_cookie(
        COOKIE,
        token,
        max_age=max(int(expires - time.time()), 0) if expires else None,
        domain=domain,
        secure=_behind_tls(request),
        httponly=True,
        samesite="lax",
    )
    response.headers["X-Dagma-Subject"] = principal.subject
    return response


@login_router.post("/v1/auth/logout", include_in_schema=False)
def sign_out(request: Request) -> Response:
    response = RedirectResponse(PATH, status_code=303)
    response.delete_cookie(COOKIE, domain=request.app.state.settings.dagma_cookie_domain)
    return response


def _behind_tls(request: Request) -> bool:
    return request.url.scheme == "https" or request.headers.get("x-forwarded-proto") == "https"


def _page(target: str, problem: str | None, status: int) -> HTMLResponse:
    said = f'<p role="alert">{html.escape(problem)}</p>' if problem else ""
    body = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Sign in to Dagma</title></head>
<body style="font-family: sans-serif; max-width: 36em; margin: 4em auto">
<h1>Sign in to Dagma</h1>{said}
<form method="post" action="{PATH}">
<input type="hidden" name="next" value="{html.escape(target, quote=True)}">
<p><label>API token with the <code>ui</code> scope<br>
<input type="password" name="token" autocomplete="off" required style="width: 100%"></label></p>
<p><button type="submit">Sign in</button></p>
</form>
<p>Make one with <code>dagma token issue --scope ui --ttl 8h</code>.</p>
</body></html>
"""
    return HTMLResponse(body, status_code=status, headers={"Content-Security-Policy": _CSP})
