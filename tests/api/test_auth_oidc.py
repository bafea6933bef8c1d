"""OIDC tokens against a local issuer the test serves (discovery and JWKS), both under uvicorn.

The API verifies RS256 and ES256 tokens with the issuer's published keys, refuses HS256 and
keys the issuer does not publish, and follows a key rotation without a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from jwt.utils import base64url_encode

from dagma.api.auth import TokenVerifier
from tests.api.auth_servers import Issuer, api_app, problem, serving

LIFESPAN = 1.0  # seconds the API keeps the JWKS; short so a retired key ages out quickly


@pytest.fixture
def issuer() -> Iterator[Issuer]:
    issuer = Issuer()
    issuer.add_key("rsa-1")
    issuer.add_key("ec-1", "EC")
    with serving(issuer.app) as url:
        issuer.url = url
        yield issuer


@pytest.fixture
def api(issuer: Issuer) -> Iterator[str]:
    verifier = TokenVerifier(
        audience="dagma-api", issuer=issuer.url, jwks_lifespan=LIFESPAN, jwks_cooldown=0.0
    )
    with serving(api_app(verifier)) as url:
        yield url


def hs256_by_hand(claims: dict[str, Any], secret: bytes, kid: str) -> str:
    header = {"alg": "HS256", "typ": "JWT", "kid": kid}
    signing_input = b".".join(
        base64url_encode(json.dumps(part).encode()) for part in (header, claims)
    )
    signature = hmac.new(secret, signing_input, hashlib.sha256).digest()
    return (signing_input + b"." + base64url_encode(signature)).decode()


def call(api: str, path: str, token: str) -> httpx.Response:
    return httpx.get(api + path, headers={"Authorization": f"Bearer {token}"})


def test_rs256_and_es256_tokens_of_the_issuer_are_accepted_and_the_jwks_is_cached(
    api: str, issuer: Issuer
) -> None:
    rsa = call(api, "/v1/predict", issuer.token("rsa-1", scope="openid predict search"))
    assert rsa.status_code == 200, rsa.text
    assert rsa.json() == {"subject": "alice", "scopes": ["openid", "predict", "search"]}
    ec = call(api, "/v1/ask", issuer.token("ec-1", scp=["ask"], sub="bob"))
    assert ec.status_code == 200, ec.text
    assert ec.json()["subject"] == "bob"
    for _ in range(5):
        assert call(api, "/v1/search", issuer.token("rsa-1", scope="search")).status_code == 200
    assert issuer.jwks_fetches == 1


def test_the_issuers_tokens_are_checked_for_audience_expiry_issuer_and_scope(
    api: str, issuer: Issuer
) -> None:
    cases = {
        "the token has expired": issuer.token("rsa-1", scope="ask", exp=int(time.time()) - 120),
        "audience (`aud`) is not 'dagma-api'": issuer.token("rsa-1", scope="ask", aud="other"),
        "the token was not issued by": issuer.token("rsa-1", scope="ask", iss="https://evil"),
    }
    for message, token in cases.items():
        response = call(api, "/v1/ask", token)
        assert response.status_code == 401, (message, response.text)
        assert message in problem(response)["error"]
        assert f"get a token from {issuer.url}" in problem(response)["fix"]
    refused = call(api, "/v1/ask", issuer.token("rsa-1", scope="search"))
    assert refused.status_code == 403
    assert "lacks the scope 'ask'" in problem(refused)["error"]


def test_hs256_none_and_unpublished_keys_are_refused(api: str, issuer: Issuer) -> None:
    claims: dict[str, Any] = {"iss": issuer.url, "aud": "dagma-api", "sub": "mallory"}
    claims |= {"scope": "predict", "exp": int(time.time()) + 600}
    rsa_key, _ = issuer.private["rsa-1"]
    public_pem = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # Algorithm confusion: HS256 "signed" with the issuer's public key as the secret (by hand:
    # PyJWT refuses to make such a token).
    confused = hs256_by_hand(claims, public_pem, kid="rsa-1")
    unsigned = jwt.encode(claims, "", algorithm="none", headers={"kid": "rsa-1"})
    issuer.add_key("rogue", publish=False)
    rogue_kid = issuer.token("rogue", scope="predict")
    # Signed by another key, claiming the issuer's kid.
    impostor = jwt.encode(claims, issuer.private["rogue"][0], "RS256", headers={"kid": "rsa-1"})
    cases = {
        "signed with alg 'HS256'; this API accepts only RS256/ES256": confused,
        "signed with alg 'none'": unsigned,
        "signed with key 'rogue', which": rogue_kid,
        "signature does not verify with a key": impostor,
    }
    for message, token in cases.items():
        response = call(api, "/v1/predict", token)
        assert response.status_code == 401, (message, response.text)
        assert message in problem(response)["error"]
        assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]


def test_a_rotated_key_is_followed_without_a_restart(api: str, issuer: Issuer) -> None:
    old = issuer.token("rsa-1", scope="predict")
    assert call(api, "/v1/predict", old).status_code == 200

    issuer.add_key("rsa-2")  # the issuer starts signing with a new key
    new = issuer.token("rsa-2", scope="predict")
    accepted = call(api, "/v1/predict", new)
    assert accepted.status_code == 200, accepted.text
    assert issuer.jwks_fetches == 2  # the unknown kid refetched the JWKS once

    issuer.retire("rsa-1")
    time.sleep(LIFESPAN + 0.5)  # the API's copy of the JWKS ages out
    refused = call(api, "/v1/predict", old)
    assert refused.status_code == 401
    assert "signed with key 'rsa-1', which" in problem(refused)["error"]
    assert call(api, "/v1/predict", new).status_code == 200


@pytest.mark.parametrize(
    ("path", "overrides", "message"),
    [
        ("/realms/other", {}, "cannot read the discovery document"),  # a 404
        ("", {"issuer": "https://idp.example.com"}, "names issuer 'https://idp.example.com'"),
        ("", {"jwks_uri": None}, "has no https `jwks_uri` (found None)"),
        ("", {"jwks_uri": "http://keys.example.com/jwks"}, "has no https `jwks_uri`"),
    ],
)
def test_an_unusable_discovery_document_gets_503_naming_it(
    issuer: Issuer, path: str, overrides: dict[str, Any], message: str
) -> None:
    issuer.overrides = overrides
    verifier = TokenVerifier(audience="dagma-api", issuer=issuer.url + path)
    with serving(api_app(verifier)) as api:
        response = call(api, "/v1/predict", issuer.token("rsa-1", scope="predict"))
    assert response.status_code == 503, response.text
    assert message in problem(response)["error"]
    assert "WWW-Authenticate" not in response.headers


def test_tokens_with_made_up_kids_do_not_make_the_api_hammer_the_issuer(issuer: Issuer) -> None:
    verifier = TokenVerifier(audience="dagma-api", issuer=issuer.url)  # the default cooldown
    with serving(api_app(verifier)) as api:
        assert call(api, "/v1/search", issuer.token("rsa-1", scope="search")).status_code == 200
        for n in range(5):
            issuer.add_key(f"made-up-{n}", publish=False)
            forged = call(api, "/v1/search", issuer.token(f"made-up-{n}", scope="search"))
            assert forged.status_code == 401
    assert issuer.jwks_fetches == 1
