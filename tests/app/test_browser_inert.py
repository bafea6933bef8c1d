"""In headless Chromium: an executed notebook's page runs no script and loads nothing remote."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dagma.lib.inert_html import CSP
from tests.app._support import APP, free_port, running
from tests.notebooks.test_inert_html import HOSTILE

TIMEOUT_MS = 90_000
# Each would mark the window it ran in; none may.
SCRIPTS = (
    "<script>window.ran = 'script'</script>"
    "<img src=x onerror=\"window.ran = 'onerror'\">"
    "<svg onload=\"window.ran = 'onload'\"></svg>"
)

pytestmark = pytest.mark.integration


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context()
    try:
        yield context.new_page()
    finally:
        context.close()


def watch(page: Any) -> list[str]:
    """The attacker's URLs the page really fetches (a request the policy blocks never gets here)."""
    fetched: list[str] = []

    def refuse(route: Any) -> None:
        fetched.append(route.request.url)
        route.abort()

    page.route("http://attacker.example/**", refuse)
    return fetched


def visit(page: Any, html: str) -> tuple[Any, list[str]]:
    """Open `html` as a page; what ran in it and the remote URLs it fetched."""
    fetched = watch(page)
    page.route(
        "http://dagma.test/", lambda route: route.fulfill(body=html, content_type="text/html")
    )
    page.goto("http://dagma.test/")
    page.wait_for_timeout(500)
    return page.evaluate("() => window.ran"), fetched


def test_the_pages_policy_stops_scripts_and_remote_loads_even_if_cleaning_missed_them(page: Any):
    body = f"<body><main>{SCRIPTS}{HOSTILE}</main></body>"
    ran, fetched = visit(page, f"<!DOCTYPE html><html><head></head>{body}</html>")
    assert ran and fetched  # without the policy, both happen
    page.unroute_all()
    policy = f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
    ran, fetched = visit(page, f"<!DOCTYPE html><html><head>{policy}</head>{body}</html>")
    assert ran is None and fetched == []


def test_the_notebooks_page_runs_nothing_from_an_old_hostile_copy(
    page: Any, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    folder = home / "runs" / "run-1" / "hostile"
    folder.mkdir(parents=True)
    legacy = f"<html><head></head><body><main>{SCRIPTS}{HOSTILE}<p>kept</p></main></body></html>"
    (folder / "hostile.html").write_text(legacy)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "QDRANT_URL")}
    env["DAGMA_HOME"] = str(home)
    url = f"http://127.0.0.1:{free_port()}"
    argv = [sys.executable, "-m", "streamlit", "run", str(APP), "--server.headless", "true"]
    argv += ["--server.address", "127.0.0.1", "--server.port", url.rsplit(":", 1)[1]]
    argv += ["--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"]
    with running(argv, env, tmp_path / "streamlit.log", f"{url}/_stcore/health", timeout=90):
        fetched = watch(page)
        page.goto(f"{url}/notebooks")
        notebook = page.frame_locator("iframe").first
        notebook.get_by_text("kept").wait_for(timeout=TIMEOUT_MS)
        page.wait_for_timeout(500)
        frame = next(f for f in page.frames if f != page.main_frame)
        assert frame.evaluate("() => window.ran") is None
        assert page.evaluate("() => window.ran") is None
        assert fetched == []
