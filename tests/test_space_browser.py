"""The Space in a real browser: Debian's chromium, headless, driven by playwright (golden A behind it)."""

import pathlib
import re
import shutil
import time

import pytest

from tests.test_space_support import expected_answer, golden_with_tokenizer, running_app


sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TEXT = "Marta keeps three blue herons in a glass barn on the hill above Lindow; she feeds them at dawn."
QUESTION = "Where are the herons kept?"
STATS_SHOW = "(document.querySelector('#memory-stats')?.innerText || '').includes('%s')"
pytestmark = [
    pytest.mark.skipif(
        not pathlib.Path(CHROMIUM).exists(), reason="needs Debian's chromium (apt-get install chromium)"
    ),
    pytest.mark.filterwarnings("ignore::Warning:gradio.queueing"),
]


def letters(text: str) -> str:
    """What survives Markdown rendering of the byte tokenizer's answers: letters and digits."""
    return re.sub(r"[^0-9A-Za-z]", "", text)


def bot_text(page, chat: str) -> str:
    messages = page.query_selector_all(f"#{chat} [data-testid=bot]")
    return messages[-1].inner_text() if messages else ""


def test_browser_injects_asks_and_compares(tmp_path):
    model = golden_with_tokenizer()
    expected = letters(expected_answer(model, [TEXT], QUESTION, 8)), letters(expected_answer(model, [], QUESTION, 8))
    with running_app(model, max_new_tokens=8) as (url, demo), sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        outside = []
        page.route("**/*", lambda route: _local_only(route, url, outside))
        page.goto(url)
        # the page's load event shows the empty memory; injecting before it has answered races with it
        page.wait_for_function(STATS_SHOW % "Injections absorbed: 0", timeout=60_000)
        page.fill("#inject-text textarea", TEXT)
        page.click("#inject-btn")
        page.wait_for_function(STATS_SHOW % "Injections absorbed: 1", timeout=60_000)
        assert "#1" in page.inner_text("#provenance-chart")
        page.check("#compare input")
        page.fill("#question textarea", QUESTION)
        page.click("#ask-btn")
        deadline = time.monotonic() + 60
        while letters(bot_text(page, "chat-plain")) != expected[1] and time.monotonic() < deadline:
            time.sleep(0.2)  # the answer with memory streams first, then the one without
        with_memory, without = bot_text(page, "chat-memory"), bot_text(page, "chat-plain")
        shot = tmp_path / "space.png"
        page.screenshot(path=str(shot), full_page=True)
        page.close()
        deadline = time.monotonic() + 20
        while len(demo.memory_space.store) and time.monotonic() < deadline:  # closing the tab drops the session
            time.sleep(0.2)
        sessions_left = len(demo.memory_space.store)
        browser.close()
    assert (letters(with_memory), letters(without)) == expected and expected[0] not in ("", expected[1])
    assert outside == []  # the page renders offline: nothing but the app itself is fetched
    assert sessions_left == 0
    _assert_not_blank(shot)


def _local_only(route, url: str, outside: list) -> None:
    request_url = route.request.url
    if request_url.startswith(url.rstrip("/")) or request_url.startswith(("data:", "blob:")):
        route.continue_()
    else:
        outside.append(request_url)
        route.abort()


def _assert_not_blank(path: pathlib.Path) -> None:
    from PIL import Image

    assert path.stat().st_size > 20_000
    with Image.open(path) as image:
        gray = image.convert("L")
        low, high = gray.getextrema()
        colors = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert high - low > 100 and len(colors) > 50, (low, high, len(colors))
