"""An OpenID Connect issuer's signing keys: its discovery document, then its JWKS.

The discovery document (`<issuer>/.well-known/openid-configuration`) is fetched on the first
token and kept. PyJWKClient keeps the JWKS `lifespan` seconds and refetches it once when a token
names an unknown `kid` (a rotated key), at most every `cooldown` seconds, so tokens with made-up
`kid`s cannot make the API hammer the issuer.
"""

from __future__ import annotations

import ipaddress
import threading
from typing import Any
from urllib.parse import urlparse

import httpx
import jwt

from dagma.errors import DagmaError


class AuthSettingsError(DagmaError):
    """The authentication settings cannot work; the message names the setting and the fix."""

    exit_code = 2


class IssuerError(DagmaError):
    """The issuer cannot vouch for a token: down (`unavailable`) or it has no such key."""

    def __init__(self, problem: str, fix: str, *, unavailable: bool) -> None:
        super().__init__(problem)
        self.fix = fix
        self.unavailable = unavailable


REACH_FIX = "check that the issuer is up and reachable from the API, then retry"


def check_issuer_url(issuer: str) -> None:
    """Refuse an issuer URL that is not http(s), or plain http to a host other than loopback."""
    url = urlparse(issuer)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise AuthSettingsError(
            f"DAGMA_OIDC_ISSUER={issuer!r} is not an http(s) URL; set it to the issuer's base "
            "URL, the one its tokens carry as `iss` (e.g. https://idp.example.com/realms/dagma)"
        )
    if url.scheme == "http" and not _loopback(url.hostname):
        raise AuthSettingsError(
            f"DAGMA_OIDC_ISSUER={issuer!r} uses plain http to a remote host: anyone on the way "
            "could replace its signing keys. Use the issuer's https URL"
        )


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _discovery_problem(doc: object, issuer: str) -> str | None:
    if not isinstance(doc, dict):
        return "is not a JSON object"
    named = doc.get("issuer")
    if not isinstance(named, str) or named.rstrip("/") != issuer:
        return f"names issuer {named!r}, not {issuer!r}"
    jwks_uri = doc.get("jwks_uri")
    url = urlparse(jwks_uri if isinstance(jwks_uri, str) else "")
    if url.scheme != "https" and not (url.scheme == "http" and _loopback(url.hostname or "")):
        return f"has no https `jwks_uri` (found {jwks_uri!r})"
    return None


class IssuerKeys:
    """The signing keys of `issuer` (a base URL without the trailing slash)."""

    def __init__(
        self, issuer: str, *, lifespan: float = 300.0, cooldown: float = 10.0, timeout: float = 5.0
    ) -> None:
        check_issuer_url(issuer)
        self.issuer = issuer
        self._lifespan = lifespan
        self._cooldown = cooldown
        self._timeout = timeout
        self._lock = threading.Lock()
        self._discovery: dict[str, Any] | None = None
        self._jwks: jwt.PyJWKClient | None = None

    def discovery(self) -> dict[str, Any]:
        """The issuer's discovery document, fetched once and kept; IssuerError when unusable."""
        with self._lock:
            if self._discovery is not None:
                return self._discovery
            url = f"{self.issuer}/.well-known/openid-configuration"
            try:
                response = httpx.get(url, timeout=self._timeout, follow_redirects=False)
                response.raise_for_status()
                doc = response.json()
            except (httpx.HTTPError, ValueError) as exc:
                raise IssuerError(
                    f"cannot read the discovery document of DAGMA_OIDC_ISSUER at {url}: {exc}",
                    f"{REACH_FIX}; DAGMA_OIDC_ISSUER must be its base URL (the `iss` its "
                    "tokens carry)",
                    unavailable=True,
                ) from exc
            problem = _discovery_problem(doc, self.issuer)
            if problem:
                raise IssuerError(
                    f"the discovery document at {url} {problem}",
                    "set DAGMA_OIDC_ISSUER to the issuer's exact base URL, the `issuer` its "
                    "discovery document names",
                    unavailable=True,
                )
            self._discovery = doc
            self._jwks = jwt.PyJWKClient(
                doc["jwks_uri"],
                cache_jwk_set=True,
                lifespan=self._lifespan,
                timeout=self._timeout,
                cooldown_duration=self._cooldown,
            )
            return doc

    @property
    def token_issuer(self) -> str:
        """The `iss` the issuer's tokens carry: its discovery document's `issuer`, verbatim."""
        return str(self.discovery()["issuer"])

    def signing_key(self, kid: str) -> jwt.PyJWK:
        """The published key `kid`; IssuerError when the issuer is down or publishes no such key."""
        self.discovery()
        client = self._jwks
        if client is None:  # set with the discovery document, under the lock
            raise IssuerError("no JWKS client", REACH_FIX, unavailable=True)
        try:
            return client.get_signing_key(kid)
        except jwt.PyJWKClientConnectionError as exc:
            raise IssuerError(
                f"cannot fetch the signing keys of {self.issuer} from {client.uri}: {exc}",
                REACH_FIX,
                unavailable=True,
            ) from exc
        except jwt.PyJWKClientError as exc:
            raise IssuerError(
                f"the token is signed with key {kid!r}, which {self.issuer} does not publish "
                "(forged, from another issuer, or a key that was retired)",
                f"get a new token from {self.issuer}",
                unavailable=False,
            ) from exc
        except jwt.PyJWKSetError as exc:
            raise IssuerError(
                f"the JWKS of {self.issuer} at {client.uri} holds no usable key: {exc}",
                "fix the issuer's key set (RS256 or ES256 signing keys with a `kid`)",
                unavailable=True,
            ) from exc
