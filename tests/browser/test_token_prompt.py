"""The dashboard with authentication on: without a token it asks for one, and then starts as usual."""

from __future__ import annotations

import pytest
from playwright.async_api import Browser

from broker.service import Broker

pytestmark = pytest.mark.browser
WAIT_MS = 15_000


async def test_page_asks_for_a_token_and_starts_with_an_operators(browser: Browser, broker: Broker,
                                                                   operator_token: str) -> None:  # fmt: skip
    """A fresh browser sees the token prompt; a refused token asks again; an operator's token starts the page,
    is kept in localStorage and opens the live stream with it."""
    context = await browser.new_context()
    page = await context.new_page()
    try:
        await page.goto(broker.url + "/")
        await page.wait_for_selector("#token-overlay:not([hidden])", timeout=WAIT_MS)
        assert await page.get_attribute("body", "data-ready") == "token"
        await page.fill("#token-input", "sw_not-a-real-token")
        await page.click("#token-form button")
        await page.wait_for_function("() => document.querySelector('#token-reason').textContent.includes('refused')",
                                     timeout=WAIT_MS)  # fmt: skip
        await page.fill("#token-input", operator_token)
        await page.click("#token-form button")
        await page.wait_for_selector("body[data-ready='true']", timeout=WAIT_MS)
        await page.wait_for_selector("#stream-state[data-state='live']", timeout=WAIT_MS)
        assert await page.evaluate("localStorage.getItem('suanwang.token')") == operator_token
    finally:
        await context.close()


async def test_token_in_the_address_is_kept_and_removed_from_it(browser: Browser, broker: Broker,
                                                                 operator_token: str) -> None:  # fmt: skip
    """`/?token=...` (what `suanwang demo` prints) starts the page and leaves the address without the token."""
    context = await browser.new_context()
    page = await context.new_page()
    try:
        await page.goto(f"{broker.url}/?token={operator_token}")
        await page.wait_for_selector("body[data-ready='true']", timeout=WAIT_MS)
        assert "token=" not in page.url
        assert await page.evaluate("localStorage.getItem('suanwang.token')") == operator_token
    finally:
        await context.close()
