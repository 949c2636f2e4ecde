"""A site's place comes from the registry (or its first report), and liveness is apart from `seq`:
against a real Redis, through the store's capacity and status scripts."""

from __future__ import annotations

from typing import Any

import pytest
import redis.asyncio as aioredis

from broker.model.records import Applied
from broker.state.keys import Keys
from broker.state.registry import SiteRegistry
from broker.state.store import Store
from common.protocol import Capacity
from regions import load_geography

SITE = "guian-01"


@pytest.fixture
def store(redis_client: aioredis.Redis, namespace: str) -> Store:
    return Store(redis_client, Keys(namespace))


def capacity(seq: int, total: int = 64, *, hub: str = "guizhou", cluster: str | None = "guian",
             boot: str | None = "boot-a", site: str = SITE) -> Capacity:  # fmt: skip
    body: dict[str, Any] = {
        "schema": "suanwang.capacity/1", "site": site, "hub": hub, "cluster": cluster, "seq": seq, "boot": boot,
        "pools": [{"arch": "GPU", "model": "A100-80G", "memory_gb": 80, "total": total, "per_node": 8,
                   "price_cny_per_hour": 12.5}],
    }  # fmt: skip
    return Capacity.model_validate(body)


async def site_fields(store: Store, *names: str) -> list[str | None]:
    hub = await store.hub_of(SITE)
    if hub is None:
        return [None] * len(names)
    raw = await store.redis.hmget(store.keys.hub(hub).site(SITE), list(names))
    return [v.decode() if v is not None else None for v in raw]


async def test_a_lower_seq_is_still_a_heartbeat(store):
    """A live site whose counter went back (a clock stepped back) is not declared silent."""
    assert await store.apply_capacity(capacity(100), at_ms=1_000) is Applied.APPLIED
    assert await store.apply_capacity(capacity(50, total=32), at_ms=9_000) is Applied.STALE
    assert await site_fields(store, "seen", "seq") == ["9000", "100"]  # seen moves on, the content does not
    assert await store.silent_sites(5_000) == []
    assert (await store.load_sites([SITE]))[0].counts("A100-80G").total == 64


async def test_a_new_boot_starts_the_order_again(store):
    """After an adapter restart (a new boot id) its fresh counter's first message is applied at once."""
    await store.apply_capacity(capacity(100), at_ms=1_000)
    assert await store.apply_capacity(capacity(1, total=16, boot="boot-b"), at_ms=2_000) is Applied.APPLIED
    assert (await store.load_sites([SITE]))[0].counts("A100-80G").total == 16
    assert await store.apply_capacity(capacity(2, total=8, boot="boot-b"), at_ms=3_000) is Applied.APPLIED
    assert await store.apply_capacity(capacity(1, total=99, boot="boot-b"), at_ms=4_000) is Applied.STALE
    assert (await store.load_sites([SITE]))[0].counts("A100-80G").total == 8


async def test_a_repeated_message_is_no_sign_of_life(store):
    """The same (boot, seq) again, a retained replay or a QoS 1 redelivery, neither counts as a heartbeat nor
    revives a silent site."""
    await store.apply_capacity(capacity(100), at_ms=1_000)
    assert await store.set_site_status(SITE, "stale", expect="online")
    assert await store.apply_capacity(capacity(100), at_ms=9_000) is Applied.STALE
    assert await site_fields(store, "seen", "status") == ["1000", "stale"]
    assert await store.apply_capacity(capacity(90), at_ms=10_000) is Applied.REVIVED  # fresh, if older content
    assert await site_fields(store, "seen", "status") == ["10000", "online"]


async def test_a_retained_online_does_not_revive_a_silent_site(store):
    """`online` (replayed retained to a starting replica) leaves a stale site stale; after `offline` it counts."""
    await store.apply_capacity(capacity(100), at_ms=1_000)
    assert await store.set_site_status(SITE, "stale", expect="online")
    assert not await store.set_site_status(SITE, "online")
    assert await site_fields(store, "status") == ["stale"]
    assert await store.set_site_status(SITE, "offline")
    assert await store.set_site_status(SITE, "online")


async def test_an_unregistered_site_keeps_the_hub_it_first_reported(store):
    """A site cannot move itself to another hub by its payload: the message is refused and nothing changes."""
    await store.apply_capacity(capacity(1), at_ms=1_000)
    moved = capacity(2, total=8, hub="neimenggu", cluster="horinger")
    assert await store.apply_capacity(moved, at_ms=2_000) is Applied.MOVED
    assert await site_fields(store, "hub", "cluster", "seq", "seen") == ["guizhou", "guian", "1", "1000"]


@pytest.mark.parametrize(("hub", "cluster", "expected"), [
    ("guizhou", "guian", Applied.APPLIED), ("guizhou", None, Applied.APPLIED),
    ("neimenggu", "horinger", Applied.MOVED), ("guizhou", "horinger", Applied.MOVED),
])  # fmt: skip
async def test_a_registered_site_is_where_the_registry_says(store, hub, cluster, expected):
    """A registered site's hub and cluster are the registry's; a payload that disagrees is refused."""
    await SiteRegistry(store.redis, store.keys).register(SITE, "guizhou", "guian", load_geography())
    assert await store.apply_capacity(capacity(1, hub=hub, cluster=cluster), at_ms=1_000) is expected
    if expected is Applied.APPLIED:
        assert await site_fields(store, "hub", "cluster") == ["guizhou", "guian"]
    else:
        assert await site_fields(store, "hub") == [None]
