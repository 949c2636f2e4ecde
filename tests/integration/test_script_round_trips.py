"""Scripts in pipelines cost one round trip: no `SCRIPT EXISTS` before each, and a flushed script cache is
reloaded without losing or repeating a call."""

from __future__ import annotations

import redis.asyncio as aioredis

from broker.state.jobs import Submission
from broker.state.keys import Keys
from broker.state.store import Store
from suanwang.servers import RedisServer
from tests.integration.test_store import MODEL, SITE, capacity, outcomes, placement, spec


async def _script_commands(redis: aioredis.Redis) -> dict[str, int]:
    stats = await redis.info("commandstats")
    return {name: int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("script|exists", "evalsha")}


async def test_submit_allocate_and_transition_send_no_script_exists(own_redis: RedisServer, namespace: str) -> None:
    redis = aioredis.Redis.from_url(own_redis.url)
    try:
        store = Store(redis, Keys(namespace))
        assert await store.apply_capacity(capacity(1, {MODEL: (16, 0)}))
        await redis.config_resetstat()
        await store.submit("job-1", spec())
        await store.submit_many([])
        assert outcomes(await store.allocate([placement("job-1")], 30_000)) == [1]
        assert await store.transition("job-1", "running", SITE, 1) == "running"
        calls = await _script_commands(redis)
        assert calls["script|exists"] == 0, "each pipeline is its EVALSHAs alone"
        assert calls["evalsha"] >= 3
    finally:
        await redis.aclose()


async def test_a_flushed_script_cache_is_reloaded_and_every_call_runs_once(own_redis: RedisServer,
                                                                           namespace: str) -> None:  # fmt: skip
    redis = aioredis.Redis.from_url(own_redis.url)
    try:
        store = Store(redis, Keys(namespace))
        assert await store.apply_capacity(capacity(1, {MODEL: (64, 0)}))
        await store.submit("job-0", spec())
        await redis.script_flush()  # as after a Redis restart
        results = await store.submit_many([Submission(f"job-{i}", spec()) for i in range(1, 6)])
        assert all(not isinstance(r, Exception) and r[1] for r in results)
        assert await redis.zcard(store.keys.only.queue) == 6, "each job queued once, none twice, none lost"
        await redis.script_flush()
        commits = await store.allocate([placement(f"job-{i}") for i in range(6)], 30_000)
        assert outcomes(commits) == [1] * 6
    finally:
        await redis.aclose()
