"""A new Redis primary (a failover, a restart): the first replica to notice it moves every site's assignment
sequence ahead and reconciles every site; whoever notices second, or a deployment on its first primary,
does nothing. Against a real redis-server."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from broker.sites.lifecycle import sweep
from broker.state.keys import Keys
from broker.state.sites import SEQ_AHEAD
from broker.state.store import Store
from tests.integration.test_store import capacity, placement, site_with_job, spec
from tests.support import site_keys

OTHER = "guian-02"


@pytest.fixture
def store(redis_client: aioredis.Redis, namespace: str) -> Store:
    return Store(redis_client, Keys(namespace))


async def failed_over(store: Store) -> None:
    """Every shard's recorded primary made an old one's, as a failover of the (one) Redis leaves them."""
    for key in [store.keys.only.primary, *(store.keys.hub(hub).primary for hub in await store.hub_ids())]:
        await store.redis.set(key, "the-old-primary's-id")


async def aseq(store: Store, site: str) -> int:
    return int(await store.redis.hget((await site_keys(store, site)).site(site), "aseq") or 0)


async def test_a_first_primary_is_recorded_and_changes_nothing(store: Store) -> None:
    await site_with_job(store)
    before = await aseq(store, "guian-01")
    assert before == 1
    assert await store.new_primary() == []
    recorded = await store.redis.get(store.keys.only.primary)
    assert recorded == (await store.redis.info("replication"))["master_replid"].encode()
    assert await store.new_primary() == [] and await aseq(store, "guian-01") == before


async def test_a_new_primary_moves_every_sequence_ahead_once_and_names_every_site(store: Store) -> None:
    await site_with_job(store)
    assert await store.apply_capacity(capacity(1, {"A100-80G": (16, 0)}, site=OTHER))
    assert await store.new_primary() == []
    await failed_over(store)
    replicas = [Store(store.redis, store.keys) for _ in range(2)]  # replicas that last saw the old primary
    renewed = await asyncio.gather(*(replica.new_primary() for replica in replicas))  # noticing at once
    assert sorted(renewed[0] + renewed[1]) == sorted(["guian-01", OTHER]), renewed
    assert [] in renewed, "both replicas moved the sequences"
    assert await aseq(store, "guian-01") == 1 + SEQ_AHEAD
    assert await aseq(store, OTHER) == SEQ_AHEAD
    upto, listed = await store.reconcile_list("guian-01")
    assert upto == 1 + SEQ_AHEAD and listed == [("j1", 1)]
    # a run assigned after the move carries a seq past the stamp, so the reconcile list cannot stop it
    await store.submit("j2", spec(count=8))
    [commit] = await store.allocate([placement("j2")], 30_000)
    assert commit.ok
    assert await aseq(store, "guian-01") == 2 + SEQ_AHEAD


async def test_the_sweep_reconciles_every_site_after_a_new_primary(store: Store) -> None:
    await site_with_job(store)
    await store.new_primary()
    await failed_over(store)
    replica = Store(store.redis, store.keys)  # a replica that last saw the old primary
    told: list[tuple[str, dict[str, Any]]] = []

    async def publish(site: str, payload: bytes) -> None:
        told.append((site, orjson.loads(payload)))

    await sweep(replica, publish, site_ttl_ms=3_600_000)
    reconciles = [(site, body) for site, body in told if body.get("reconcile")]
    assert [site for site, _ in reconciles] == ["guian-01"], told
    body = reconciles[0][1]
    assert body["upto"] == 1 + SEQ_AHEAD
    assert [(a["job"], a["attempt"]) for a in body["assignments"]] == [("j1", 1)]
    told.clear()
    await sweep(replica, publish, site_ttl_ms=3_600_000)
    await sweep(Store(store.redis, store.keys), publish, site_ttl_ms=3_600_000)  # one that never saw it either
    assert not [site for site, body in told if body.get("reconcile")], "reconciled again on the same primary"
