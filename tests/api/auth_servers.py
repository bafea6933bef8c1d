"""Real uvicorn servers on free loopback ports for the auth tests: a tiny API and an issuer."""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations, which name
# a scope local to `api_app`.

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Annotated, Any

import httpx
import jwt
import uvicorn
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fastapi import Depends, FastAPI

from dagma.api.auth import SCOPES, Principal, TokenVerifier, auth_router, require_scope
from tests.app._support import free_port


@contextlib.contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """`app` under a real uvicorn on a free loopback port; yields its base URL."""
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def api_app(verifier: TokenVerifier) -> FastAPI:
    """One endpoint per scope behind `require_scope`, plus the forward-auth check."""
    app = FastAPI()
    app.state.verifier = verifier
    app.include_router(auth_router)

    def endpoint(scope: str) -> Any:
        def handler(principal: Annotated[Principal, Depends(require_scope(scope))]) -> Any:
            return {"subject": principal.subject, "scopes": sorted(principal.scopes)}

        return handler

    for scope in SCOPES:
        app.get(f"/v1/{scope}")(endpoint(scope))
    return app


def problem(response: httpx.Response) -> dict[str, str]:
    """The `{"error", "fix"}` body (FastAPI's default handler nests it under `detail`)."""
    body = response.json()
    return dict(body.get("detail", body))


class Issuer:
    """An OpenID Connect issuer: a discovery document and a JWKS whose keys a test changes."""

    def __init__(self) -> None:
        self.published: dict[str, dict[str, Any]] = {}
        self.private: dict[str, Any] = {}
        self.jwks_fetches = 0
        self.url = ""
        self.overrides: dict[str, Any] = {}  # changes to the discovery document
        self.app = FastAPI()
        self.app.get("/.well-known/openid-configuration")(self.discovery)
        self.app.get("/jwks")(self.jwks)

    def discovery(self) -> dict[str, Any]:
        doc = {"issuer": self.url, "jwks_uri": f"{self.url}/jwks"} | self.overrides
        return {name: value for name, value in doc.items() if value is not None}

    def jwks(self) -> dict[str, Any]:
        self.jwks_fetches += 1
        return {"keys": list(self.published.values())}

    def add_key(self, kid: str, kind: str = "RSA", *, publish: bool = True) -> None:
        if kind == "RSA":
            key: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            jwk = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
            alg = "RS256"
        else:
            key = ec.generate_private_key(ec.SECP256R1())
            jwk = jwt.algorithms.ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
            alg = "ES256"
        self.private[kid] = (key, alg)
        if publish:
            self.published[kid] = {**jwk, "kid": kid, "use": "sig", "alg": alg}

    def retire(self, kid: str) -> None:
        self.published.pop(kid)

    def token(self, kid: str, **claims: Any) -> str:
        key, alg = self.private[kid]
        now = int(time.time())
        payload = {"iss": self.url, "aud": "dagma-api", "sub": "alice", "iat": now}
        payload |= {"exp": now + 600, **claims}
        return jwt.encode(payload, key, algorithm=alg, headers={"kid": kid})
