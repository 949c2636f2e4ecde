"""Helpers shared by the tests that drive real servers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from adapters.site import SiteLink
from broker.service import Broker, start_broker
from broker.state.keys import HubKeys
from broker.state.store import Store
from common.config import Settings
from suanwang.servers import MosquittoServer, RedisClusterGroup, RedisServer

WAIT = 15.0
T = TypeVar("T")


async def eventually(probe: Callable[[], Awaitable[T | None]], what: str = "condition", timeout: float = WAIT) -> T:
    """Poll `probe` until it returns something truthy; fail after `timeout` seconds naming `what`."""
    last: T | None = None
    try:
        async with asyncio.timeout(timeout):
            while True:
                last = await probe()
                if last:
                    return last
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}; last probe: {last!r}") from None


@asynccontextmanager
async def running_broker(redis: RedisServer | RedisClusterGroup, mqtt: MosquittoServer, namespace: str, **overrides: Any
                         ) -> AsyncIterator[Broker]:  # fmt: skip
    """An in-process broker replica, connected to MQTT before it is handed out."""
    settings = Settings(redis_url=redis.url, mqtt_url=mqtt.url, http="127.0.0.1:0", namespace=namespace,
                        **overrides)  # fmt: skip
    broker = await start_broker(settings)
    try:
        async with asyncio.timeout(WAIT):
            await broker.mqtt.connected.wait()
        yield broker
    finally:
        await broker.close()


@asynccontextmanager
async def linked(link: SiteLink) -> AsyncIterator[SiteLink]:
    """A site's MQTT link running, connected before it is handed out, stopped (gracefully, then cancelled)
    after."""
    task = asyncio.create_task(link.run(), name=f"link-{link.site}")
    try:
        async with asyncio.timeout(WAIT):
            await link.connected.wait()
        yield link
    finally:
        link.stop()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), 5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def site_keys(store: Store, site: str) -> HubKeys:
    """The keys of the hub shard that holds `site` (its place)."""
    hub = await store.hub_of(site)
    assert hub is not None, f"{site} has no place"
    return store.keys.hub(hub)


async def ledger(store: Store, site: str) -> dict[str, tuple[int, str, int, int]]:
    """The site's ledger: owner (a job id or `hold:<id>`) -> (attempt, model, count, seq); empty for a site
    with no place."""
    hub = await store.hub_of(site)
    if hub is None:
        return {}
    raw = await store.redis.hgetall(store.keys.hub(hub).held(site))
    out: dict[str, tuple[int, str, int, int]] = {}
    for owner, value in raw.items():
        attempt, model, count, seq = (value.decode() if isinstance(value, bytes) else value).split(" ")
        out[owner.decode() if isinstance(owner, bytes) else owner] = (int(attempt), model, int(count), int(seq))
    return out
