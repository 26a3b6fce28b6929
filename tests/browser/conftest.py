"""Fixtures for the browser tests: one headless Chromium (Debian's ``/usr/bin/chromium``,
driven by Playwright) for the whole folder, a fresh context and page per test.

Without Chromium (or Playwright) the tests are skipped, or fail when the environment
sets ``SSEHUB_REQUIRE_BROWSER=1`` (CI does): a missing browser must not pass silently.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import httpx
import pytest

if TYPE_CHECKING:
    from playwright.async_api import Browser, Page

CHROMIUM = os.environ.get("SSEHUB_CHROMIUM", "/usr/bin/chromium")
REQUIRE_BROWSER = os.environ.get("SSEHUB_REQUIRE_BROWSER") == "1"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
"""The closed network here refuses Chromium's own background connections: keep it quiet."""


def missing_browser() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    if importlib.util.find_spec("playwright") is None:
        return "Playwright is not installed (pip install -e '.[dev]')"
    if not os.access(CHROMIUM, os.X_OK):
        return f"no Chromium at {CHROMIUM} (apt-get install -y chromium, or set SSEHUB_CHROMIUM)"
    return None


@pytest.fixture(scope="package")
def anyio_backend() -> str:
    # Package scope: the browser below lives in one event loop for the whole folder.
    return "asyncio"


@pytest.fixture(scope="package")
async def browser() -> AsyncIterator[Browser]:
    missing = missing_browser()
    if missing is not None:
        if REQUIRE_BROWSER:
            pytest.fail(f"SSEHUB_REQUIRE_BROWSER=1 but {missing}", pytrace=False)
        pytest.skip(missing)
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield chromium
        finally:
            await chromium.close()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    """A page in a fresh browser context; an uncaught JavaScript error fails the test."""
    context = await browser.new_context()
    context.set_default_timeout(10_000)
    errors: list[str] = []
    new_page = await context.new_page()
    new_page.on("pageerror", lambda error: errors.append(f"{error.name}: {error.message}"))
    try:
        yield new_page
    finally:
        await context.close()
    assert not errors, f"uncaught JavaScript errors in the page: {errors}"


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None)) as client:
        yield client
