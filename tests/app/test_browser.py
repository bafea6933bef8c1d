"""The app in a real browser: `streamlit run` on the demo state, driven by headless Chromium.

Each page is screenshotted into $DAGMA_TEST_ARTIFACTS (default test-artifacts/screenshots).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dagma.settings import PROJECT_ROOT
from tests.api.conftest import LabApi, lab_api  # noqa: F401 - the session's served API
from tests.app._support import APP, free_port, running
from tests.app.conftest import CHROMIUM
from tests.conftest import require

QUESTION = "How do I catch an exception?"
ANSWER_TIMEOUT_MS = 180_000
PAGE_TIMEOUT_MS = 90_000

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", autouse=True)
def chromium() -> None:
    require(CHROMIUM.exists(), f"no Chromium at {CHROMIUM}")


# Page path, then a text that shows its real content has rendered.
PAGES = [
    ("", "Read from the embedded Dagster instance"),
    ("experiments", "Parameters that differ"),
    ("notebooks", "Download HTML"),
    ("model", "Predicted class"),
    ("search", "Collection dagma_docs"),
    ("chat", "Ask a question below."),
]


@pytest.fixture(scope="module")
def artifacts() -> Path:
    folder = Path(
        os.environ.get("DAGMA_TEST_ARTIFACTS") or PROJECT_ROOT / "test-artifacts" / "screenshots"
    )
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def app_url(demo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`streamlit run` of the app on a free port, over the demo's lab home."""
    settings, _ = demo
    url = f"http://127.0.0.1:{free_port()}"
    argv = [sys.executable, "-m", "streamlit", "run", str(APP), "--server.headless", "true"]
    argv += ["--server.address", "127.0.0.1", "--server.port", url.rsplit(":", 1)[1]]
    argv += ["--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"]
    env = {
        **os.environ,
        "DAGMA_HOME": str(settings.home),
        "DAGSTER_UI_URL": f"http://127.0.0.1:{free_port()}",
    }
    log = tmp_path_factory.mktemp("streamlit") / "streamlit.log"
    with running(argv, env, log, f"{url}/_stcore/health", timeout=90):
        yield url


@pytest.fixture(scope="module")
def api_app_url(lab_api: LabApi, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:  # noqa: F811
    """The app in API mode: DAGMA_API_URL at `dagma serve`, and a DAGMA_HOME with no lab."""
    url = f"http://127.0.0.1:{free_port()}"
    argv = [sys.executable, "-m", "streamlit", "run", str(APP), "--server.headless", "true"]
    argv += ["--server.address", "127.0.0.1", "--server.port", url.rsplit(":", 1)[1]]
    argv += ["--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"]
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MLFLOW_TRACKING_URI", "QDRANT_URL", "DAGSTER_HOME")
    }
    folder = tmp_path_factory.mktemp("streamlit-api")
    env |= {
        "DAGMA_HOME": str(folder / "no-lab"),
        "DAGSTER_UI_URL": f"http://127.0.0.1:{free_port()}",
        "DAGMA_API_URL": lab_api.url,
        "DAGMA_API_TOKEN": lab_api.token(["search"]),
    }
    with running(argv, env, folder / "streamlit.log", f"{url}/_stcore/health", timeout=90):
        yield url


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    try:
        yield context.new_page()
    finally:
        context.close()


def wait_until_idle(page: Any, timeout: float = PAGE_TIMEOUT_MS) -> None:
    """Until the script run ends: no status widget and no spinner."""
    page.wait_for_function(
        "() => !document.querySelector('[data-testid=stStatusWidget], [data-testid=stSpinner]')",
        timeout=timeout,
    )


def screenshot(page: Any, path: Path) -> None:
    """The whole page: Streamlit scrolls inside its main block, so grow the viewport to fit."""
    height = 900
    page.wait_for_timeout(500)
    for _ in range(10):
        needed = page.evaluate(
            """() => Math.max(document.documentElement.scrollHeight,
                ...[...document.querySelectorAll('[data-testid]')]
                    .filter(e => ['auto', 'scroll'].includes(getComputedStyle(e).overflowY))
                    .map(e => e.scrollHeight + e.getBoundingClientRect().top))"""
        )
        needed = min(max(900, int(needed)), 12_000)
        if needed <= height:
            break
        height = needed
        page.set_viewport_size({"width": 1400, "height": height})
        page.wait_for_timeout(500)
    page.screenshot(path=str(path), full_page=True)


def assert_no_error(page: Any) -> None:
    """No exception, and no warning (which is how the app reports failures)."""
    for test_id in ("stException", "stAlertContentWarning", "stAlertContentError"):
        assert page.get_by_test_id(test_id).count() == 0, page.get_by_test_id(
            test_id
        ).all_inner_texts()


@pytest.mark.parametrize(("path", "expected"), PAGES, ids=[p or "overview" for p, _ in PAGES])
def test_page_renders_in_a_browser(
    path: str, expected: str, app_url: str, page: Any, artifacts: Path
):
    page.goto(f"{app_url}/{path}")
    page.get_by_text(expected).first.wait_for(timeout=PAGE_TIMEOUT_MS)
    if path == "search":
        query = page.get_by_label("Query")
        query.fill(QUESTION)
        query.press("Enter")
        page.get_by_test_id("stExpander").first.wait_for(timeout=PAGE_TIMEOUT_MS)
    wait_until_idle(page)
    assert_no_error(page)
    if path == "search":
        labels = page.get_by_test_id("stExpander").all_inner_texts()
        assert len(labels) == 5 and any("pydoc:" in label for label in labels)
    if path == "notebooks":
        notebook = page.frame_locator("iframe").first
        notebook.locator("body").wait_for(timeout=PAGE_TIMEOUT_MS)
        assert notebook.locator(".jp-Cell, .cell").count() > 0
    screenshot(
        page, artifacts / f"{PAGES.index((path, expected)) + 1:02d}-{path or 'overview'}.png"
    )


def test_chat_streams_an_answer_with_sources_in_a_browser(app_url: str, page: Any, artifacts: Path):
    page.goto(f"{app_url}/chat")
    box = page.get_by_test_id("stChatInputTextArea")
    box.wait_for(timeout=PAGE_TIMEOUT_MS)
    box.fill(QUESTION)
    box.press("Enter")
    messages = page.get_by_test_id("stChatMessage")
    messages.nth(1).get_by_test_id("stTable").wait_for(timeout=ANSWER_TIMEOUT_MS)
    wait_until_idle(page, ANSWER_TIMEOUT_MS)
    assert_no_error(page)
    assert messages.count() == 2
    assert QUESTION in messages.nth(0).inner_text()
    answer = messages.nth(1).get_by_test_id("stMarkdown").first.inner_text()
    assert len(answer.strip()) > 20
    sources = messages.nth(1).get_by_test_id("stTable").inner_text()
    assert "source" in sources and "pydoc:" in sources
    screenshot(page, artifacts / "07-chat-answer.png")


def test_search_goes_through_the_api_in_a_browser(
    api_app_url: str,
    lab_api: LabApi,  # noqa: F811
    page: Any,
    artifacts: Path,
) -> None:
    """The app has no lab of its own here: every hit comes from `dagma serve`."""
    page.goto(f"{api_app_url}/search")
    page.get_by_text("Searched through the Dagma API").first.wait_for(timeout=PAGE_TIMEOUT_MS)
    query = page.get_by_label("Query")
    query.fill(QUESTION)
    query.press("Enter")
    page.get_by_test_id("stExpander").first.wait_for(timeout=PAGE_TIMEOUT_MS)
    wait_until_idle(page)
    assert_no_error(page)
    with lab_api.client(["search"]) as api:
        hits = api.search(QUESTION, k=5).hits
    labels = page.get_by_test_id("stExpander").all_inner_texts()
    assert len(labels) == 5
    assert all(f"{h.score:.3f}" in label for h, label in zip(hits, labels, strict=True))
    assert hits[0].id in page.get_by_test_id("stJson").first.inner_text()
    screenshot(page, artifacts / "08-search-over-the-api.png")
