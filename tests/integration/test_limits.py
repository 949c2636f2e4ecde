"""Token caches and rate buckets against a real redis-server of the test's own, whose command counters
show what reached Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from broker.state.buckets import RateBuckets
from broker.state.keys import Keys
from broker.state.tokens import Tokens
from suanwang.servers import RedisServer
from tests.support import eventually


@pytest.fixture
async def private_redis(own_redis: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(own_redis.url)
    yield client
    await client.aclose()


async def lookups(redis: aioredis.Redis) -> int:
    """Token reads Redis has served (HGETALL is how a token is read)."""
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_hgetall", {}).get("calls", 0))


async def test_a_repeated_unknown_token_reaches_redis_once_per_cache_time(private_redis: aioredis.Redis,
                                                                          namespace: str) -> None:  # fmt: skip
    """A client repeating a bad token is answered from the replica's memory until the unknown-token cache
    time has passed; then Redis is asked again."""
    tokens = Tokens(private_redis, Keys(namespace), unknown_ttl_s=0.3)
    before = await lookups(private_redis)
    for _ in range(20):
        assert await tokens.lookup("sw_not-a-token") is None
    assert await lookups(private_redis) - before == 1

    async def asked_again() -> bool:
        await tokens.lookup("sw_not-a-token")
        return await lookups(private_redis) - before == 2

    await eventually(asked_again, "the unknown token to be looked up again", 5.0)


async def test_a_valid_token_is_cached_and_a_revoked_one_stops_within_the_cache_time(
    private_redis: aioredis.Redis, namespace: str
) -> None:
    """One Redis read serves many requests; a token revoked through another replica stops working on this
    one once the valid-token cache time has passed, and is then remembered as unknown."""
    here = Tokens(private_redis, Keys(namespace), valid_ttl_s=0.3)
    elsewhere = Tokens(private_redis, Keys(namespace))
    token, identity = await elsewhere.create("user", "acme")
    before = await lookups(private_redis)
    for _ in range(20):
        assert await here.lookup(token) == identity
    assert await lookups(private_redis) - before == 1
    assert here.cached(token) == identity

    await elsewhere.revoke(identity.id)
    assert await here.lookup(token) == identity  # within the cache time: still served from memory

    async def refused() -> bool:
        return await here.lookup(token) is None

    await eventually(refused, "the revoked token to be refused", 5.0)
    assert here.cached(token) is None
    settled = await lookups(private_redis)
    assert await here.lookup(token) is None and await lookups(private_redis) == settled


async def test_token_caches_stay_bounded(private_redis: aioredis.Redis, namespace: str) -> None:
    """A flood of distinct bad tokens keeps at most `cache_max` entries in memory."""
    tokens = Tokens(private_redis, Keys(namespace), cache_max=5)
    for i in range(50):
        assert await tokens.lookup(f"sw_flood-{i}") is None
    assert len(tokens._unknown) == 5


async def test_a_rate_bucket_is_shared_and_refills_by_redis_time(private_redis: aioredis.Redis, namespace: str) -> None:
    """Two replicas draw from one bucket per subject: `burst` at once, then a wait in milliseconds, until
    Redis's clock has refilled a token; another subject's bucket is apart."""
    keys = Keys(namespace)
    one, two = RateBuckets(private_redis, keys), RateBuckets(private_redis, keys)
    assert [await b.take("quote", "tok-a", 4.0, 3) for b in (one, two, one)] == [0, 0, 0]
    wait = await two.take("quote", "tok-a", 4.0, 3)
    assert 1 <= wait <= 250
    assert await one.take("quote", "tok-b", 4.0, 3) == 0
    assert await private_redis.pttl(keys.rate_bucket("quote", "tok-a")) > 0  # an idle bucket goes away

    async def refilled() -> bool:
        return await one.take("quote", "tok-a", 4.0, 3) == 0

    await eventually(refilled, "a token to be refilled", 5.0)
