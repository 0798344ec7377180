"""A real headless Chromium for the console's tests: Debian's `chromium`, driven by Playwright.

The Playwright wheel brings its driver but no browser; the browser is the machine's own
(`executable_path`), installed with apt-get when missing. Where it cannot be had the tests skip,
unless AVR_LLM_PROXY_REQUIRE_BROWSER is set (CI sets it): then they fail.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, async_playwright

from tests.machine import apt_install, which

REQUIRED = "AVR_LLM_PROXY_REQUIRE_BROWSER"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
# Chromium on a machine without the internet: no background fetches, no GPU, root without a sandbox.
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium() -> str:
    found = which("chromium")
    if found is None:
        problem = apt_install("chromium")
        found = which("chromium")
        if found is None:
            (pytest.fail if os.environ.get(REQUIRED) else pytest.skip)(f"no Debian chromium here: {problem}")
    assert found is not None
    return found


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=chromium(), args=FLAGS)
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    context = await browser.new_context(viewport={"width": 1280, "height": 720})
    opened = await context.new_page()
    try:
        yield opened
    finally:
        await context.close()


async def screenshot(page: Page, name: str) -> Path:
    """Keep what the page looked like, as a test artefact (tests/artifacts/, not committed)."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    return path
