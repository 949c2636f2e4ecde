"""Submits made at the same moment share a round trip (group commit), and each keeps its own answer."""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis

from broker.state.jobs import SubmitRate
from broker.state.keys import Keys
from broker.state.store import Store
from common.errors import StoreUnavailable, TooManyRequests
from suanwang.servers import RedisServer
from tests.integration.test_store import spec


def _counted(store: Store, monkeypatch: Any) -> list[int]:
    """The number of scripts in each pipelined round trip the store sends."""
    sizes: list[int] = []
    real = store.run_scripts

    async def counted(calls: Any, **kw: Any) -> Any:
        sizes.append(len(calls))
        return await real(calls, **kw)

    monkeypatch.setattr(store, "run_scripts", counted)
    return sizes


async def test_concurrent_submits_share_round_trips(redis_client: aioredis.Redis, namespace: str,
                                                    monkeypatch: Any) -> None:  # fmt: skip
    store = Store(redis_client, Keys(namespace))
    sizes = _counted(store, monkeypatch)
    await store.submit("alone", spec())
    assert sizes == [1], "a lone submit goes at once, by itself"
    results = await asyncio.gather(*(store.submit(f"job-{i}", spec()) for i in range(64)))
    assert [stored["id"] for stored, created in results] == [f"job-{i}" for i in range(64)]
    assert all(created for _, created in results)
    assert sum(sizes) == 65 and len(sizes) < 10, f"64 concurrent submits in a few round trips, not 64: {sizes}"
    assert await redis_client.zcard(store.keys.only.queue) == 65


async def test_each_gathered_submit_keeps_its_own_limits_and_replays(redis_client: aioredis.Redis,
                                                                     namespace: str) -> None:  # fmt: skip
    store = Store(redis_client, Keys(namespace))
    tight = SubmitRate(f"{namespace}-tight", per_s=0.001, burst=2)
    loose = SubmitRate(f"{namespace}-loose", per_s=1000, burst=1000)
    calls = [store.submit(f"t-{i}", spec(), rate_limit=tight) for i in range(4)]
    calls += [store.submit(f"l-{i}", spec(), rate_limit=loose) for i in range(4)]
    calls += [store.submit("k-1", spec(), idempotency_key=f"{namespace}-key"),
              store.submit("k-2", spec(), idempotency_key=f"{namespace}-key")]  # fmt: skip
    results = await asyncio.gather(*calls, return_exceptions=True)
    tight_results, loose_results, keyed = results[:4], results[4:8], results[8:]
    assert sum(isinstance(r, TooManyRequests) for r in tight_results) == 2, "the tight caller's burst is 2"
    assert all(isinstance(r, tuple) and r[1] for r in loose_results)
    assert isinstance(keyed[0], tuple) and keyed[0][1] and keyed[0][0]["id"] == "k-1"
    assert isinstance(keyed[1], tuple) and not keyed[1][1] and keyed[1][0]["id"] == "k-1", "the same key: a replay"


async def test_every_gathered_submit_learns_that_redis_is_away(own_redis: RedisServer, namespace: str) -> None:
    client = aioredis.Redis.from_url(own_redis.url, socket_connect_timeout=1)
    try:
        store = Store(client, Keys(namespace))
        await store.submit("before", spec())
        own_redis.stop()
        results = await asyncio.gather(*(store.submit(f"job-{i}", spec()) for i in range(8)), return_exceptions=True)
        assert all(isinstance(r, StoreUnavailable) for r in results), results
        own_redis.start()
        stored, created = await store.submit("after", spec())
        assert created and stored["id"] == "after", "the next submit goes through once Redis is back"
    finally:
        await client.aclose()


async def test_more_submits_than_one_round_trip_carries(redis_client: aioredis.Redis, namespace: str) -> None:
    n = 300  # past MAX_GATHERED: the rest go in the next round trip
    store = Store(redis_client, Keys(namespace))
    results = await asyncio.gather(*(store.submit(f"job-{i}", spec()) for i in range(n)))
    assert len({stored["id"] for stored, _ in results}) == n
    assert await redis_client.zcard(store.keys.only.queue) == n


async def test_connections_redis_closed_are_replaced_without_failing_the_caller(own_redis: RedisServer,
                                                                                namespace: str) -> None:  # fmt: skip
    """After Redis drops every client connection (as a restart does), the next submit is sent again on a
    fresh connection instead of failing with a 503."""
    store = Store.from_url(own_redis.url, namespace)
    admin = aioredis.Redis.from_url(own_redis.url)
    try:
        await store.submit("before", spec())
        await admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        stored, created = await store.submit("after", spec())
        assert created and stored["id"] == "after"
    finally:
        await store.close()
        await admin.aclose()


async def test_a_submission_sent_twice_makes_one_job(redis_client: aioredis.Redis, namespace: str) -> None:
    """A submit whose reply was lost and that was sent again finds its job made and does not queue it twice."""
    store = Store(redis_client, Keys(namespace))
    first, created = await store.submit("job-1", spec())
    again, created_again = await store.submit("job-1", spec())
    assert created and not created_again and again["id"] == first["id"] == "job-1"
    assert await redis_client.zcard(store.keys.only.queue) == 1
    assert int(await redis_client.zscore(store.keys.only.queued_tenants, first["tenant"]) or 0) == 1
