"""Local HS256 tokens against a real uvicorn: each bad token's status, message and challenge.

Also `dagma token issue` as a real command, the gateway's forward-auth check (header and
cookie) and each unusable setting. The OIDC issuer's tokens are tests/api/test_auth_oidc.py's.
"""

from __future__ import annotations

import datetime
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from pydantic import SecretStr

from dagma import env_secrets
from dagma.api.auth import (
    COOKIE,
    SUBJECT_HEADER,
    AuthError,
    AuthSettingsError,
    TokenVerifier,
    issue_token,
)
from dagma.settings import Settings
from tests.api.auth_servers import api_app, problem, serving
from tests.app._support import free_port

SECRET = secrets.token_urlsafe(32)
# model_validate reads neither the environment nor a .env: these settings and nothing else.
SETTINGS = Settings.model_validate({"dagma_api_secret": SecretStr(SECRET)})
HOUR = datetime.timedelta(hours=1)


@pytest.fixture(scope="module")
def api() -> Iterator[str]:
    with serving(api_app(TokenVerifier.from_settings(SETTINGS))) as url:
        yield url


def signed(key: Any = SECRET, algorithm: str = "HS256", **changes: Any) -> str:
    """A local token with `changes` to its claims (None removes one)."""
    now = int(time.time())
    claims = {"iss": "dagma", "sub": "bob", "aud": "dagma-api", "iat": now, "exp": now + 600}
    claims |= {"scope": "predict"}
    claims.update(changes)
    claims = {name: value for name, value in claims.items() if value is not None}
    return jwt.encode(claims, key, algorithm=algorithm)


def test_a_local_token_with_the_scope_is_accepted(api: str) -> None:
    token = issue_token(SETTINGS, ["predict", "search"], HOUR, subject="carol")
    for path in ("/v1/predict", "/v1/search"):
        response = httpx.get(api + path, headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 200, response.text
        assert response.json() == {"subject": "carol", "scopes": ["predict", "search"]}


BAD_TOKENS: dict[str, tuple[Callable[[], str], str]] = {
    "expired": (lambda: signed(exp=int(time.time()) - 120), "the token has expired"),
    "wrong audience": (lambda: signed(aud="billing-api"), "audience (`aud`) is not 'dagma-api'"),
    "forged": (lambda: signed(key=secrets.token_urlsafe(32)), "signature does not verify"),
    "alg none": (lambda: signed(key=None, algorithm="none"), "signed with alg 'none'"),
    "RS256 locally": (
        lambda: signed(key=_rsa_pem(), algorithm="RS256"),
        "accepts only HS256 local tokens",
    ),
    "no expiry": (lambda: signed(exp=None), "lacks the `exp` claim"),
    "another issuer": (lambda: signed(iss="someone-else"), "not issued by 'dagma'"),
    "not a JWT": (lambda: "not-a-jwt", "is not a JWT"),
}


def _rsa_pem() -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@pytest.mark.parametrize("case", list(BAD_TOKENS))
def test_each_bad_token_gets_401_with_its_own_message_and_challenge(api: str, case: str) -> None:
    make, message = BAD_TOKENS[case]
    response = httpx.get(api + "/v1/predict", headers={"Authorization": f"Bearer {make()}"})
    assert response.status_code == 401, response.text
    body = problem(response)
    assert message in body["error"]
    assert "dagma token issue --scope predict" in body["fix"]
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="dagma-api", error="invalid_token"'


def test_no_token_gets_401_and_a_challenge_without_an_error_code(api: str) -> None:
    response = httpx.get(api + "/v1/ask")
    assert response.status_code == 401
    assert "no bearer token" in problem(response)["error"]
    assert "dagma token issue --scope ask" in problem(response)["fix"]
    # RFC 6750 3.1: a request without credentials gets no error code.
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="dagma-api"'


def test_another_authorization_scheme_is_named(api: str) -> None:
    response = httpx.get(api + "/v1/ask", auth=("user", "password"))
    assert response.status_code == 401
    assert "scheme 'Basic'" in problem(response)["error"]
    assert 'error="invalid_request"' in response.headers["WWW-Authenticate"]
    empty = httpx.get(api + "/v1/ask", headers={"Authorization": "Bearer"})
    assert empty.status_code == 401 and "no bearer token" in problem(empty)["error"]


def test_the_secret_dagma_secrets_init_writes_signs_tokens_the_api_accepts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("DAGMA_API_SECRET=change-me-api-secret\n")  # pragma: allowlist secret
    for name in ("DAGMA_API_SECRET", "DAGMA_OIDC_ISSUER", "DAGMA_API_AUDIENCE"):
        monkeypatch.delenv(name, raising=False)
    report = env_secrets.init(env_file, environ={})
    assert "DAGMA_API_SECRET" in report.generated
    monkeypatch.chdir(tmp_path)
    written = Settings()  # reads ./.env
    token = issue_token(written, ["search"], HOUR)
    assert TokenVerifier.from_settings(written).verify(token, "search").subject == "dagma-cli"


def test_a_token_without_the_scope_gets_403_naming_the_scope_and_how_to_get_it(api: str) -> None:
    token = issue_token(SETTINGS, ["search"], HOUR)
    response = httpx.get(api + "/v1/predict", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 403, response.text
    body = problem(response)
    assert "lacks the scope 'predict'" in body["error"] and "(it has: search)" in body["error"]
    assert body["fix"] == "make one with `dagma token issue --scope predict --ttl 1h`"
    assert response.headers["WWW-Authenticate"] == (
        'Bearer realm="dagma-api", error="insufficient_scope", scope="predict"'
    )


def test_the_forward_auth_check_reads_the_header_or_the_cookie(api: str) -> None:
    check = api + "/v1/auth/check"
    token = issue_token(SETTINGS, ["ui"], HOUR, subject="dana")
    by_header = httpx.get(check, headers={"Authorization": f"Bearer {token}"})
    by_cookie = httpx.get(check, cookies={COOKIE: token})
    for response in (by_header, by_cookie):
        assert response.status_code == 200, response.text
        assert response.headers[SUBJECT_HEADER] == "dana"
    assert httpx.get(check, params={"scope": "ui"}, cookies={COOKIE: token}).status_code == 200

    missing = httpx.get(check)
    assert missing.status_code == 401
    assert missing.json()["error"].startswith("no token: send `Authorization: Bearer <token>`")
    assert f"the cookie {COOKIE}" in missing.json()["error"]
    forged = httpx.get(check, cookies={COOKIE: signed(key=secrets.token_urlsafe(32))})
    assert forged.status_code == 401 and "signature does not verify" in forged.json()["error"]
    assert SUBJECT_HEADER not in forged.headers

    predict_only = issue_token(SETTINGS, ["predict"], HOUR)
    refused = httpx.get(check, params={"scope": "ui"}, cookies={COOKIE: predict_only})
    assert refused.status_code == 403 and "lacks the scope 'ui'" in refused.json()["error"]
    unknown = httpx.get(check, params={"scope": "admin"}, cookies={COOKIE: token})
    assert unknown.status_code == 400 and "unknown scope 'admin'" in unknown.json()["error"]


def dagma_token(*args: str, secret: str = SECRET) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGMA_API", "DAGMA_OIDC"))}
    env["DAGMA_API_SECRET"] = secret
    dagma = Path(sys.executable).with_name("dagma")
    return subprocess.run(
        [str(dagma), "token", "issue", *args],
        env=env,
        cwd=Path(__file__).parent,  # no .env here
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_dagma_token_issue_prints_only_a_token_the_api_accepts(api: str) -> None:
    done = dagma_token("--scope", "ask", "-s", "search", "--ttl", "30m", "--subject", "erin")
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    assert done.stdout == token + "\n"
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], audience="dagma-api")
    assert claims["exp"] - claims["iat"] == 30 * 60
    response = httpx.get(api + "/v1/ask", headers={"Authorization": f"Bearer {token}"})
    assert response.json() == {"subject": "erin", "scopes": ["ask", "search"]}


@pytest.mark.parametrize(
    ("args", "secret", "message"),
    [
        (["--scope", "admin"], SECRET, "unknown scope(s) admin: name one or more of predict"),
        (["--scope", "ask", "--ttl", "1x"], SECRET, "--ttl '1x' is not a lifetime"),
        (["--scope", "ask", "--ttl", "0d"], SECRET, "--ttl '0d' is not a lifetime"),
        (["--scope", "ask"], "too-short", "DAGMA_API_SECRET has 9 bytes; HS256 needs at least"),
    ],
)
def test_dagma_token_issue_refuses_bad_input_on_stderr(
    args: list[str], secret: str, message: str
) -> None:
    done = dagma_token(*args, secret=secret)
    assert done.returncode == 2
    assert done.stdout == ""
    assert message in done.stderr


def settings(**values: Any) -> Settings:
    return Settings.model_validate(values)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({}, "neither DAGMA_API_SECRET nor DAGMA_OIDC_ISSUER is set; run `dagma secrets init`"),
        ({"dagma_api_secret": SecretStr("x" * 31)}, "has 31 bytes; HS256 needs at least 32"),
        ({"dagma_api_secret": SecretStr("change-me-api-secret-" + "x" * 20)}, "is a placeholder"),
        ({"dagma_oidc_issuer": "idp.example.com"}, "is not an http(s) URL"),
        ({"dagma_oidc_issuer": "http://idp.example.com"}, "plain http to a remote host"),
        ({"dagma_oidc_issuer": "https://i.example.com", "dagma_api_audience": " "}, "is empty"),
    ],
)
def test_each_unusable_setting_is_refused_naming_it(values: dict[str, Any], message: str) -> None:
    with pytest.raises(AuthSettingsError) as caught:
        TokenVerifier.from_settings(settings(**values))
    assert message in str(caught.value)


def test_local_tokens_are_refused_when_an_issuer_is_set() -> None:
    oidc = settings(dagma_oidc_issuer="https://idp.example.com", dagma_api_secret=SecretStr(SECRET))
    with pytest.raises(AuthSettingsError, match="accepts only that issuer's tokens"):
        issue_token(oidc, ["predict"], HOUR)


def test_an_unreachable_issuer_gets_503_naming_it() -> None:
    issuer = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    verifier = TokenVerifier.from_settings(settings(dagma_oidc_issuer=issuer))
    token = jwt.encode({"sub": "x"}, _rsa_pem(), algorithm="RS256", headers={"kid": "k1"})
    with pytest.raises(AuthError) as caught:
        verifier.verify(token, "predict")
    assert caught.value.status == 503
    with serving(api_app(verifier)) as api:
        response = httpx.get(api + "/v1/predict", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 503
    body = problem(response)
    assert f"cannot read the discovery document of DAGMA_OIDC_ISSUER at {issuer}/" in body["error"]
    assert "reachable from the API" in body["fix"]
