"""A real broker with simulated sites, and Debian's Chromium driven by Playwright, for the dashboard tests.

Chromium comes from the system's packages (installed here when missing, as tests/conftest.py does for
the servers); Playwright never downloads a browser of its own. A test that cannot get a browser fails
and says why: the dashboard is part of the product, so its tests are never skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson
import pytest
from playwright.async_api import Browser, ConsoleMessage, Page, async_playwright

from adapters.sim import run_sim
from broker.service import Broker
from broker.state.tokens import Tokens
from common.config import MqttTarget
from suanwang.servers import MosquittoServer, RedisServer
from tests.support import running_broker

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
SIM_HUBS = ("guizhou", "neimenggu", "yangtze")  # two western hubs and an eastern one
SITES_PER_HUB = 3
WAIT = 15.0
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "browser: runs the web dashboard in a real headless Chromium")


def _apt_install(package: str) -> subprocess.CompletedProcess[str]:
    """`apt-get install`, refreshing the package lists once if the first attempt fails (a fresh machine)."""
    command = ["apt-get", "install", "-y", "-q", package]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, check=False)
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    return result


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Debian's Chromium, installed if missing; a clear failure if that is impossible."""
    if not CHROMIUM.exists():
        if shutil.which("apt-get") is None:
            pytest.fail(f"{CHROMIUM} is missing and apt-get is not available to install Debian's chromium package")
        result = _apt_install("chromium")
        if result.returncode != 0 or not CHROMIUM.exists():
            pytest.fail(f"could not install Debian's chromium package (apt-get exit {result.returncode}):\n"
                        f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}")  # fmt: skip
    # Hub names are Chinese: without a CJK font the screenshot shows empty boxes (tests pass either way).
    fonts = subprocess.run(["fc-list", ":lang=zh"], capture_output=True, text=True, check=False).stdout
    if not fonts.strip() and shutil.which("apt-get"):
        _apt_install("fonts-wqy-microhei")
    return CHROMIUM


@pytest.fixture
async def broker(redis_server: RedisServer, own_mosquitto: MosquittoServer, namespace: str) -> AsyncIterator[Broker]:
    async with running_broker(redis_server, own_mosquitto, namespace, auth="required") as running:
        yield running


@pytest.fixture
async def operator_token(broker: Broker) -> str:
    """A token the page uses, as an operator pastes it into the prompt."""
    token, _ = await Tokens(broker.store.redis, broker.store.keys).create("operator", "ops", "browser tests")
    return token


@pytest.fixture
async def http(broker: Broker) -> AsyncIterator[aiohttp.ClientSession]:
    """An admin's client: it may submit for any tenant (X-Suanwang-Tenant)."""
    token, _ = await Tokens(broker.store.redis, broker.store.keys).create("admin", "ops", "browser tests")
    async with aiohttp.ClientSession(base_url=broker.url, headers={"Authorization": f"Bearer {token}"}) as session:
        yield session


@pytest.fixture
async def sites(broker: Broker, own_mosquitto: MosquittoServer, http: aiohttp.ClientSession) -> AsyncIterator[int]:
    """Simulated sites in SIM_HUBS, online before the test starts; yields how many."""
    stop = asyncio.Event()
    target = MqttTarget.from_url(own_mosquitto.url)
    sims = [asyncio.create_task(run_sim(target, hub, SITES_PER_HUB, time_scale=1800.0, interval=0.5, stop=stop))
            for hub in SIM_HUBS]  # fmt: skip
    expected = len(SIM_HUBS) * SITES_PER_HUB
    try:
        async with asyncio.timeout(WAIT):
            while True:
                async with http.get("/v1/sites") as response:
                    listed = (await response.json())["sites"]
                if sum(s["status"] == "online" for s in listed) >= expected:
                    break
                await asyncio.sleep(0.1)
        yield expected
    finally:
        stop.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*sims, return_exceptions=True), 10)


@dataclass
class Console:
    """What the page said: console errors and uncaught exceptions, for the no-errors assertion."""

    errors: list[str] = field(default_factory=list)

    def on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(f"console: {message.text} @ {message.location}")

    def on_page_error(self, error: Exception) -> None:
        self.errors.append(f"page error: {error}")


@pytest.fixture
async def browser(chromium: Path) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=str(chromium), headless=True, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


@dataclass
class Dashboard:
    page: Page
    console: Console
    url: str


@pytest.fixture
async def dashboard(browser: Browser, broker: Broker, sites: int, operator_token: str) -> AsyncIterator[Dashboard]:
    """The dashboard open in a fresh page with an operator's token stored, fully started (map drawn, stream
    connected)."""
    context = await browser.new_context(viewport={"width": 1600, "height": 960}, device_scale_factor=1)
    await context.add_init_script(f"localStorage.setItem('suanwang.token', {orjson.dumps(operator_token).decode()})")
    page = await context.new_page()
    console = Console()
    page.on("console", console.on_console)
    page.on("pageerror", console.on_page_error)
    try:
        await page.goto(broker.url + "/", wait_until="load")
        await page.wait_for_selector("body[data-ready='true']", timeout=WAIT * 1000)
        await page.wait_for_selector("#stream-state[data-state='live']", timeout=WAIT * 1000)
        yield Dashboard(page, console, broker.url)
    finally:
        await context.close()


@pytest.fixture(scope="session")
def artifacts() -> Iterator[Path]:
    ARTIFACTS.mkdir(exist_ok=True)
    yield ARTIFACTS
