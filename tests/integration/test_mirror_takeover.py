"""The MQTT mirror's consumer group against a real Redis: a dead replica's unacknowledged events are taken over
and published, a publish that failed is done again, and nothing is published twice once acknowledged."""

from __future__ import annotations

import asyncio
from collections import Counter

import orjson
import pytest
import redis.asyncio as aioredis

from broker.state import events
from broker.state.events import MIRROR_GROUP, run_mirror
from broker.state.keys import Keys
from broker.state.store import Store
from tests.integration.test_store import spec
from tests.support import eventually


@pytest.fixture
def store(redis_client: aioredis.Redis, namespace: str) -> Store:
    return Store(redis_client, Keys(namespace))


async def test_a_dead_replicas_events_are_taken_over_and_a_failed_publish_is_done_again(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(events, "CLAIM_IDLE_MS", 200)
    log = store.keys.only.events
    await store.redis.xgroup_create(log, MIRROR_GROUP, id="$", mkstream=True)
    for i in range(3):
        await store.submit(f"dead{i}", spec())
    # a replica read them and died before acknowledging them
    taken = await store.redis.xreadgroup(MIRROR_GROUP, "dead", {log: ">"}, count=10)
    assert len(taken[0][1]) == 3
    published: Counter[str] = Counter()
    failures = [1]  # the first publish of a live event fails (the MQTT broker away)

    async def publish(batch: list[bytes]) -> None:
        jobs = [orjson.loads(e)["job"] for e in batch]
        if failures and any(j.startswith("live") for j in jobs):
            failures.pop()
            raise ConnectionError("MQTT away")
        published.update(jobs)

    stop = asyncio.Event()
    mirror = asyncio.create_task(run_mirror(store, "alive", publish, stop))
    try:

        async def taken_over() -> bool:
            return all(published[f"dead{i}"] for i in range(3))

        await eventually(taken_over, "the dead replica's events published")
        for i in range(2):
            await store.submit(f"live{i}", spec())

        async def all_published() -> bool:
            return all(published[f"live{i}"] for i in range(2))

        await eventually(all_published, "the live events, after the failed publish")
        assert failures == [], "the first publish failed"

        async def acknowledged() -> bool:
            return (await store.redis.xpending(log, MIRROR_GROUP))["pending"] == 0

        await eventually(acknowledged, "every entry acknowledged")
        assert set(published.values()) == {1}, f"each event published once: {published}"
    finally:
        stop.set()
        await asyncio.wait_for(mirror, 10)
