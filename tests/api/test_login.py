"""A browser behind the gateway signs in once: the check sends it to the sign-in page, which
sets the token as an HttpOnly cookie for every UI host and sends it back, never elsewhere."""

from __future__ import annotations

import datetime
import secrets
from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from fastapi import FastAPI
from pydantic import SecretStr

from dagma.api.auth import COOKIE, SUBJECT_HEADER, TokenVerifier, auth_router, issue_token
from dagma.api.login import login_router, safe_next
from dagma.settings import Settings
from tests.api.auth_servers import serving

LOGIN = "https://api.dagma.localhost/v1/auth/login"
SETTINGS = Settings.model_validate(
    {
        "dagma_api_secret": SecretStr(secrets.token_urlsafe(32)),
        "dagma_login_url": LOGIN,
        "dagma_cookie_domain": "dagma.localhost",
    }
)
HOUR = datetime.timedelta(hours=1)
# What Traefik's forwardAuth sends for a browser's page request to the Dagster UI.
BROWSER = {
    "Accept": "text/html,application/xhtml+xml",
    "X-Forwarded-Proto": "https",
    "X-Forwarded-Host": "dagster.dagma.localhost",
    "X-Forwarded-Uri": "/runs?tab=queued",
}


@pytest.fixture(scope="module")
def api() -> Iterator[str]:
    app = FastAPI()
    app.state.settings = SETTINGS
    app.state.verifier = TokenVerifier.from_settings(SETTINGS)
    app.include_router(auth_router)
    app.include_router(login_router)
    with serving(app) as url:
        yield url


def test_a_browser_without_a_token_is_sent_to_sign_in_and_a_script_gets_401(api: str) -> None:
    page = httpx.get(f"{api}/v1/auth/check?scope=ui", headers=BROWSER)
    assert page.status_code == 302
    target = urlsplit(page.headers["location"])
    assert f"{target.scheme}://{target.netloc}{target.path}" == LOGIN
    assert parse_qs(target.query)["next"] == ["https://dagster.dagma.localhost/runs?tab=queued"]
    script = httpx.get(f"{api}/v1/auth/check?scope=ui", headers={**BROWSER, "Accept": "*/*"})
    assert script.status_code == 401 and script.json()["error"].startswith("no token")


def test_the_sign_in_page_runs_nothing_and_escapes_where_it_returns(api: str) -> None:
    page = httpx.get(f"{api}/v1/auth/login", params={"next": '"><script>alert(1)</script>'})
    assert page.status_code == 200
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert "<script>" not in page.text and "&quot;&gt;&lt;script&gt;" in page.text
    assert 'type="password" name="token"' in page.text


def test_signing_in_sets_an_httponly_cookie_for_every_ui_host_and_returns(api: str) -> None:
    token = issue_token(SETTINGS, ["ui"], HOUR, subject="dana")
    back = "https://dagster.dagma.localhost/runs?tab=queued"
    done = httpx.post(
        f"{api}/v1/auth/login",
        data={"token": token, "next": back},
        headers={"X-Forwarded-Proto": "https"},
    )
    assert done.status_code == 303 and done.headers["location"] == back
    cookie = done.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}={token};")
    for part in ("HttpOnly", "Secure", "SameSite=lax", "Domain=dagma.localhost"):
        assert part.lower() in cookie.lower(), cookie
    max_age = int(cookie.lower().split("max-age=")[1].split(";")[0])
    assert 3500 <= max_age <= 3600  # the cookie ends with the token
    check = httpx.get(f"{api}/v1/auth/check?scope=ui", headers=BROWSER, cookies={COOKIE: token})
    assert check.status_code == 200 and check.headers[SUBJECT_HEADER] == "dana"


@pytest.mark.parametrize(
    ("token", "status", "said"),
    [
        (lambda: issue_token(SETTINGS, ["search"], HOUR), 403, "lacks the scope &#x27;ui&#x27;"),
        (lambda: "not-a-jwt", 401, "is not a JWT"),
    ],
)
def test_a_token_that_may_not_open_the_uis_sets_no_cookie(api: str, token, status, said) -> None:
    page = httpx.post(f"{api}/v1/auth/login", data={"token": token(), "next": "/"})
    assert page.status_code == status and "set-cookie" not in page.headers
    assert said in page.text and "Fix:" in page.text


@pytest.mark.parametrize(
    ("target", "where"),
    [
        ("/runs", "/runs"),
        ("https://mlflow.dagma.localhost/#/models", "https://mlflow.dagma.localhost/#/models"),
        ("https://evil.example/steal", "/"),
        ("//evil.example/steal", "/"),
        ("https://dagma.localhost.evil.example/", "/"),
        ("http://dagster.dagma.localhost/", "/"),
        ("/\\evil.example", "/"),
    ],
)
def test_after_signing_in_the_browser_goes_back_only_to_the_lab(target: str, where: str) -> None:
    assert safe_next(target, "dagma.localhost") == where


def test_signing_out_clears_the_cookie(api: str) -> None:
    done = httpx.post(f"{api}/v1/auth/logout")
    assert done.status_code == 303
    assert done.headers["set-cookie"].startswith(f'{COOKIE}="";') or "max-age=0" in (
        done.headers["set-cookie"].lower()
    )
