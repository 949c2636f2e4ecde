"""Token buckets in Redis, shared by every replica: one small script (lua/bucket.lua) takes a token or
says how long until one is there, timed by Redis's own clock, so replicas with skewed clocks refill a
bucket alike. A bucket left alone expires once it would be full again."""

from __future__ import annotations

from importlib import resources

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from broker.state.connection import translated
from broker.state.keys import Keys


class RateBuckets:
    """Buckets by scope (what is limited, e.g. `quote`) and subject (who, e.g. a token id)."""

    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        script = (resources.files("broker.state") / "lua" / "bucket.lua").read_text()
        self._take: AsyncScript = redis.register_script(script)

    async def take(self, scope: str, subject: str, rate: float, burst: int) -> int:
        """Take one token from a bucket of `burst` refilled at `rate` per second: 0 when taken, else the
        milliseconds until one is there."""
        async with translated():
            wait = await self._take(keys=[self.keys.rate_bucket(scope, subject)], args=[rate, burst])
        return int(wait)
