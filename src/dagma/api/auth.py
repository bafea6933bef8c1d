"""Who may call the API: JWT bearer tokens checked by PyJWT, and the scope each endpoint needs.

One machine signs its own tokens with HS256 and `DAGMA_API_SECRET` (`dagma token issue`). With
`DAGMA_OIDC_ISSUER` set, only that issuer's RS256/ES256 tokens are accepted, checked with the
keys its discovery document's `jwks_uri` publishes: PyJWKClient caches them and refetches once
when a token names an unknown `kid`, so a rotated key is picked up without a restart.
"""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any

import jwt
from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel

from dagma.api.oidc import AuthSettingsError, IssuerError, IssuerKeys
from dagma.env_secrets import placeholder_reason
from dagma.errors import DagmaError
from dagma.settings import Settings

SCOPES = ("predict", "search", "ask")
# Not an endpoint's: the gateway's forward-auth asks for it (`/v1/auth/check?scope=ui`).
UI_SCOPE = "ui"
TOKEN_SCOPES = (*SCOPES, UI_SCOPE)
LOCAL_ISSUER = "dagma"
LOCAL_ALGORITHM = "HS256"
OIDC_ALGORITHMS = ("RS256", "ES256")
MIN_SECRET_BYTES = 32  # HS256 needs a key of at least 256 bits (RFC 7518 3.2)
LEEWAY = datetime.timedelta(seconds=30)
COOKIE = "dagma_token"
SUBJECT_HEADER = "X-Dagma-Subject"
REALM = "dagma-api"
SETUP_FIX = (
    "run `dagma secrets init` (writes a random DAGMA_API_SECRET into .env), "
    "or set DAGMA_OIDC_ISSUER to use your identity provider's tokens"
)


class AuthError(DagmaError):
    """A request's token cannot be used: `str(err)` is the problem, `fix` what to do.

    `status` is 401 (no usable token), 403 (a valid token without the scope) or 503 (the
    issuer's keys cannot be fetched); `code` is the RFC 6750 error code.
    """

    exit_code = 2

    def __init__(
        self,
        problem: str,
        fix: str,
        status: int = 401,
        code: str | None = "invalid_token",
        scope: str | None = None,
    ) -> None:
        super().__init__(problem)
        self.status = status
        self.fix = fix
        self.code = code
        self.scope = scope

    @property
    def headers(self) -> dict[str, str]:
        """The `WWW-Authenticate` challenge of RFC 6750 (none for a 503)."""
        if self.status == 503:
            return {}
        challenge = f'Bearer realm="{REALM}"'
        if self.code:
            challenge += f', error="{self.code}"'
        if self.code == "insufficient_scope" and self.scope:
            challenge += f', scope="{self.scope}"'
        return {"WWW-Authenticate": challenge}

    def detail(self) -> dict[str, str]:
        return {"error": str(self), "fix": self.fix}


class Principal(BaseModel):
    """Who a valid token speaks for, and what it may do."""

    subject: str
    scopes: frozenset[str]


def _issuer(settings: Settings) -> str | None:
    issuer = (settings.dagma_oidc_issuer or "").strip()
    return issuer.rstrip("/") or None


def local_secret(settings: Settings) -> bytes:
    """`DAGMA_API_SECRET` as bytes, refused when unset, a placeholder or shorter than 32 bytes."""
    raw = settings.dagma_api_secret.get_secret_value() if settings.dagma_api_secret else ""
    if not raw.strip():
        raise AuthSettingsError(f"DAGMA_API_SECRET is not set; {SETUP_FIX}")
    why = placeholder_reason(raw)
    if why:
        raise AuthSettingsError(f"DAGMA_API_SECRET {why}, known to everyone; {SETUP_FIX}")
    secret = raw.encode("utf-8")
    if len(secret) < MIN_SECRET_BYTES:
        raise AuthSettingsError(
            f"DAGMA_API_SECRET has {len(secret)} bytes; HS256 needs at least {MIN_SECRET_BYTES} "
            "(256 bits). Replace it with a random one: remove it from .env and run "
            "`dagma secrets init`, or set it to the output of "
            "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return secret


def _scopes(claims: Mapping[str, Any]) -> frozenset[str]:
    """OAuth2's space-separated `scope` and/or a `scp` list (as Azure AD and Okta write it)."""
    found: set[str] = set()
    for name in ("scope", "scp"):
        value = claims.get(name)
        if isinstance(value, str):
            found.update(value.split())
        elif isinstance(value, list):
            found.update(item for item in value if isinstance(item, str))
    return frozenset(found)


class TokenVerifier:
    """Checks bearer tokens: signature, algorithm, issuer, audience, expiry, then the scope.

    Local mode (`secret`): HS256 only. OIDC mode (`issuer`): RS256/ES256 only, keys from the
    issuer's JWKS (`dagma.api.oidc.IssuerKeys`), first fetched on the first token, so an issuer
    that is down gives 503s rather than an API that will not start.
    """

    def __init__(
        self,
        *,
        audience: str,
        secret: bytes | None = None,
        issuer: str | None = None,
        jwks_lifespan: float = 300.0,
        jwks_cooldown: float = 10.0,
        timeout: float = 5.0,
        leeway: datetime.timedelta = LEEWAY,
    ) -> None:
        if (secret is None) == (issuer is None):
            raise AuthSettingsError(
                "a token verifier needs exactly one of a local secret and an OIDC issuer"
            )
        if not audience.strip():
            raise AuthSettingsError(
                "DAGMA_API_AUDIENCE is empty; unset it (default dagma-api) or set the audience "
                "your tokens carry as `aud`"
            )
        self.audience = audience
        self.issuer = issuer
        self._secret = secret
        self._leeway = leeway
        self._keys = (
            IssuerKeys(issuer, lifespan=jwks_lifespan, cooldown=jwks_cooldown, timeout=timeout)
            if issuer is not None
            else None
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenVerifier:
        """OIDC when `DAGMA_OIDC_ISSUER` is set, else the local secret (refused if unusable)."""
        issuer = _issuer(settings)
        audience = settings.dagma_api_audience
        if issuer:
            return cls(audience=audience, issuer=issuer)
        if not settings.dagma_api_secret or not settings.dagma_api_secret.get_secret_value():
            raise AuthSettingsError(
                "the API has no way to check tokens: neither DAGMA_API_SECRET nor "
                f"DAGMA_OIDC_ISSUER is set; {SETUP_FIX}"
            )
        return cls(audience=audience, secret=local_secret(settings))

    @property
    def oidc(self) -> bool:
        return self.issuer is not None

    def _token_fix(self, scope: str) -> str:
        if self.oidc:
            return (
                f"get a token from {self.issuer} for audience {self.audience!r} with the "
                f"scope {scope!r}"
            )
        return f"make one with `dagma token issue --scope {scope} --ttl 1h`"

    def verify(self, token: str, scope: str | None = None) -> Principal:
        """The token's principal; raises AuthError (401, 403 or 503) saying what is wrong."""
        token = token.strip()
        fix = self._token_fix(scope or UI_SCOPE)
        if not token:
            raise AuthError("no bearer token: send `Authorization: Bearer <token>`", fix, code=None)
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise AuthError(
                f"the bearer token is not a JWT ({exc})",
                f"send the whole token; {fix}",
            ) from exc
        allowed = OIDC_ALGORITHMS if self.oidc else (LOCAL_ALGORITHM,)
        alg = header.get("alg")
        if alg not in allowed:
            where = f"tokens of {self.issuer}" if self.oidc else "local tokens"
            raise AuthError(
                f"the token is signed with alg {alg!r}; this API accepts only "
                f"{'/'.join(allowed)} {where}",
                fix,
            )
        if self.oidc:
            claims = self._decode_oidc(token, header, fix)
        else:
            claims = self._decode(token, self._secret or b"", [LOCAL_ALGORITHM], LOCAL_ISSUER, fix)
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise AuthError("the token's `sub` claim is not a string", fix)
        principal = Principal(subject=subject, scopes=_scopes(claims))
        if scope is not None and scope not in principal.scopes:
            held = ", ".join(sorted(principal.scopes)) or "none"
            raise AuthError(
                f"the token of {subject!r} lacks the scope {scope!r} this endpoint needs "
                f"(it has: {held})",
                self._token_fix(scope),
                status=403,
                code="insufficient_scope",
                scope=scope,
            )
        return principal

    def _decode_oidc(self, token: str, header: Mapping[str, Any], fix: str) -> dict[str, Any]:
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise AuthError(
                "the token names no signing key (`kid` header); this API checks only tokens "
                f"signed with a key that {self.issuer} publishes",
                fix,
            )
        if self._keys is None:
            raise AuthError("this API checks local tokens only", fix)
        try:
            key = self._keys.signing_key(kid)
            issuer = self._keys.token_issuer
        except IssuerError as exc:
            status = 503 if exc.unavailable else 401
            raise AuthError(str(exc), exc.fix, status=status) from exc
        return self._decode(token, key, list(OIDC_ALGORITHMS), issuer, fix)

    def _decode(
        self, token: str, key: jwt.PyJWK | bytes, algorithms: list[str], issuer: str, fix: str
    ) -> dict[str, Any]:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=algorithms,
                audience=self.audience,
                issuer=issuer,
                leeway=self._leeway,
                options={
                    "require": ["exp", "iss", "aud", "sub"],
                    "enforce_minimum_key_length": True,
                },
            )
        except jwt.ExpiredSignatureError as exc:
            raise AuthError("the token has expired", f"get a new one: {fix}") from exc
        except jwt.InvalidAudienceError as exc:
            raise AuthError(
                f"the token is not for this API: its audience (`aud`) is not {self.audience!r}",
                f"{fix}; or, if the API should accept it, set DAGMA_API_AUDIENCE",
            ) from exc
        except jwt.InvalidIssuerError as exc:
            raise AuthError(f"the token was not issued by {issuer!r} (`iss`)", fix) from exc
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"the token lacks the `{exc.claim}` claim", fix) from exc
        except jwt.InvalidSignatureError as exc:
            where = f"a key {self.issuer} publishes" if self.oidc else "this API's DAGMA_API_SECRET"
            raise AuthError(
                f"the token's signature does not verify with {where}: it is forged or was "
                "signed by another machine",
                fix,
            ) from exc
        except (jwt.ImmatureSignatureError, jwt.InvalidIssuedAtError) as exc:
            raise AuthError(
                f"the token is not valid yet ({exc}); is this machine's clock right?", fix
            ) from exc
        except jwt.InvalidTokenError as exc:
            raise AuthError(f"the token is invalid: {exc}", fix) from exc
        return claims


def issue_token(
    settings: Settings,
    scopes: Sequence[str],
    ttl: datetime.timedelta,
    subject: str = "dagma-cli",
) -> str:
    """A local HS256 token for `subject` with `scopes`, valid for `ttl`."""
    if _issuer(settings):
        raise AuthSettingsError(
            f"DAGMA_OIDC_ISSUER is set ({_issuer(settings)}), so the API accepts only that "
            "issuer's tokens, never local ones: get a token from the issuer, or unset "
            "DAGMA_OIDC_ISSUER to use local tokens"
        )
    unknown = sorted(set(scopes) - set(TOKEN_SCOPES))
    if unknown or not scopes:
        what = f"unknown scope(s) {', '.join(unknown)}" if unknown else "no scope"
        raise AuthSettingsError(
            f"{what}: name one or more of {', '.join(TOKEN_SCOPES)} "
            "(e.g. --scope predict --scope search)"
        )
    if ttl <= datetime.timedelta(0):
        raise AuthSettingsError(f"a token's lifetime must be positive, not {ttl}")
    if not subject.strip():
        raise AuthSettingsError("a token's subject is empty; name who will use it")
    now = datetime.datetime.now(datetime.UTC)
    claims = {
        "iss": LOCAL_ISSUER,
        "sub": subject,
        "aud": settings.dagma_api_audience,
        "iat": now,
        "exp": now + ttl,
        "jti": uuid.uuid4().hex,
        "scope": " ".join(sorted(set(scopes))),
    }
    return jwt.encode(claims, local_secret(settings), algorithm=LOCAL_ALGORITHM)


_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="bearer",
    bearerFormat="JWT",
    description="`dagma token issue --scope ...`, or a token of DAGMA_OIDC_ISSUER",
)


def _verifier(request: Request) -> TokenVerifier:
    verifier = getattr(request.app.state, "verifier", None)
    if not isinstance(verifier, TokenVerifier):
        raise HTTPException(
            status_code=503,
            detail={
                "error": "the API has no token verifier",
                "fix": "build the app with dagma.api.app.create_app (it sets app.state.verifier)",
            },
        )
    return verifier


def _http_error(err: AuthError) -> HTTPException:
    return HTTPException(status_code=err.status, detail=err.detail(), headers=err.headers)


def require_scope(scope: str) -> Callable[..., Principal]:
    """A FastAPI dependency: the caller's Principal, when its bearer token has `scope`."""
    if scope not in TOKEN_SCOPES:
        raise AuthSettingsError(f"unknown scope {scope!r}; the scopes are {TOKEN_SCOPES}")

    # Sync on purpose: FastAPI runs it in a worker thread, where a JWKS fetch may block.
    def dependency(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> Principal:
        verifier = _verifier(request)
        header = request.headers.get("authorization", "")
        scheme = header.split(maxsplit=1)[0] if header.strip() else ""
        if credentials is None and scheme and scheme.lower() != "bearer":
            err = AuthError(
                f"the Authorization header does not hold a bearer token (scheme {scheme!r})",
                "send `Authorization: Bearer <token>`",
                code="invalid_request",
            )
            raise _http_error(err)
        try:
            principal = verifier.verify(credentials.credentials if credentials else "", scope)
        except AuthError as err:
            raise _http_error(err) from err
        request.state.principal = principal
        return principal

    return dependency


auth_router = APIRouter(tags=["auth"])


@auth_router.get("/v1/auth/check")
@auth_router.head("/v1/auth/check", include_in_schema=False)  # one operation in the OpenAPI
def check(
    request: Request,
    scope: Annotated[
        str | None,
        Query(
            description=f"A scope the token must have ({', '.join(TOKEN_SCOPES)}); any valid "
            "token when omitted. The gateway asks for `ui`."
        ),
    ] = None,
) -> Response:
    """The gateway's forward-auth target: 200 with `X-Dagma-Subject` for a valid token.

    The token comes from `Authorization: Bearer` or else the `dagma_token` cookie.
    """
    verifier = _verifier(request)
    if scope is not None and scope not in TOKEN_SCOPES:
        return JSONResponse(
            {
                "error": f"unknown scope {scope!r} in the forward-auth URL",
                "fix": f"use one of {', '.join(TOKEN_SCOPES)}, or none",
            },
            status_code=400,
        )
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        token = value
    else:
        token = request.cookies.get(COOKIE, "")
    try:
        principal = verifier.verify(token, scope)
    except AuthError as err:
        if not token:
            err = AuthError(
                f"no token: send `Authorization: Bearer <token>` or the cookie {COOKIE}",
                err.fix,
                code=None,
            )
        settings = getattr(request.app.state, "settings", None)
        if settings is not None and settings.dagma_login_url:
            from dagma.api.login import login_redirect

            redirect = login_redirect(request, settings.dagma_login_url)
            if redirect is not None:
                return redirect
        return JSONResponse(err.detail(), status_code=err.status, headers=err.headers)
    return JSONResponse(
        {"subject": principal.subject, "scopes": sorted(principal.scopes)},
        headers={SUBJECT_HEADER: principal.subject},
    )
