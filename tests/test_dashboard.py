"""GET /dashboard: one static page, and a real browser driving it against the running API."""

from __future__ import annotations

import os
import re
import tempfile
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from .conftest import OPS_KEY, STORE_KEY, create_sale
from .test_reservations import reserve

if TYPE_CHECKING:
    from playwright.async_api import Page

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


async def test_dashboard_page_needs_no_key_and_may_only_talk_to_its_own_origin(client: httpx.AsyncClient) -> None:
    r = await client.get("/dashboard", headers={"Authorization": ""})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|@import|url\(""", r.text)
    assert OPS_KEY not in r.text


async def test_dashboard_script_runs_under_its_own_content_security_policy(client: httpx.AsyncClient) -> None:
    """The policy names the hash of the page's one inline script and one inline style."""
    r = await client.get("/dashboard")
    csp = r.headers["content-security-policy"]
    assert re.search(r"script-src 'sha256-[A-Za-z0-9+/=]{44}';", csp)
    assert re.search(r"style-src 'sha256-[A-Za-z0-9+/=]{44}';", csp)


def screenshot_dir() -> Path:
    target = Path(os.environ.get("FLASHSALE_SCREENSHOT_DIR") or tempfile.gettempdir())
    target.mkdir(parents=True, exist_ok=True)
    return target


@pytest.fixture
async def page(app_url: str) -> AsyncIterator[Page]:
    """A fresh headless Chromium tab on the dashboard; closed before the app stops, so that its
    streams are gone by then."""
    if not CHROMIUM.exists():
        pytest.skip("needs Debian's chromium: apt-get install -y chromium")
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            tab = await browser.new_page(viewport={"width": 1280, "height": 900})
            await tab.goto(f"{app_url}/dashboard")
            yield tab
        finally:
            await browser.close()


async def test_dashboard_shows_live_numbers_and_its_pause_button_stops_reservations(
    client: httpx.AsyncClient, page: Page, app_url: str
) -> None:
    from playwright.async_api import expect

    sale = (
        await create_sale(
            client,
            name="Browser sale",
            items=[{"sku": "phone", "name": "Phone", "price_cents": 100, "stock": 50, "per_user_limit": 1}],
        )
    )["id"]
    requested: list[str] = []
    page.on("request", lambda req: requested.append(req.url))
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))

    await page.fill("#key", OPS_KEY)
    await page.click("#signin")
    card = page.locator(f'article[data-sale="{sale}"]')
    held = card.locator('[data-item="phone"] [data-field="held"]')
    await expect(card.locator('[data-field="status"]')).to_have_text("live")
    await expect(card.locator('[data-field="feed"]')).to_contain_text("live", timeout=5000)
    await expect(held).to_have_text("0")

    for n in range(7):
        assert (await reserve(client, sale, user=f"u{n}")).status_code == 201
    await expect(held).to_have_text("7", timeout=5000)
    await expect(card.locator('[data-item="phone"] [data-field="available"]')).to_have_text("43")
    await expect(card.locator('[data-field="res"]')).not_to_have_text("—")

    await card.locator('[data-action="pause"]').click()
    await expect(card.locator('[data-field="status"]')).to_have_text("paused", timeout=5000)
    refused = await reserve(client, sale, user="late")
    assert (refused.status_code, refused.json()["error"]["code"]) == (409, "sale_paused")
    await expect(card.locator('[data-item="phone"] [data-field="rejected"]')).to_contain_text(
        "sale_paused 1", timeout=5000
    )
    await expect(card.locator('[data-action="resume"]')).to_be_enabled()
    await card.locator('[data-series="sale_paused"]').wait_for(state="attached", timeout=5000)

    await page.screenshot(path=str(screenshot_dir() / "dashboard.png"), full_page=True)
    assert errors == []
    assert await page.evaluate("sessionStorage.getItem('flashsale.opsKey')") == OPS_KEY
    origin = urllib.parse.urlsplit(app_url).netloc
    assert requested and all(urllib.parse.urlsplit(u).netloc == origin for u in requested)
    assert not any(OPS_KEY in u for u in requested)  # the key travels in a header only


async def test_dashboard_refuses_a_storefront_key_and_forgets_it(client: httpx.AsyncClient, page: Page) -> None:
    from playwright.async_api import expect

    await create_sale(client)
    await page.fill("#key", STORE_KEY)
    await page.click("#signin")
    await expect(page.locator("#login-error")).to_have_text("That key is not an ops key.")
    await expect(page.locator("article.sale")).to_have_count(0)
    assert await page.evaluate("sessionStorage.getItem('flashsale.opsKey')") is None
