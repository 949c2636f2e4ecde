"""Redis state: the one source of truth. Every state change is one Lua script or one transaction.

Redis errors are translated into `StoreUnavailable` (broker.state.connection), so nothing outside
`broker.state` imports redis. The store's methods live by subject: sites (broker.state.sites) and jobs
(broker.state.jobs).
"""

from __future__ import annotations

import redis.asyncio as aioredis

from broker.state.archive import JobArchive, Retention
from broker.state.connection import translated
from broker.state.jobs import (
    IDEMPOTENCY_TTL_S,
    PRIORITY_HANDICAP_MS,
    PRIORITY_RANK,
    JobQueue,
    Submission,
    SubmitRate,
    queue_score,
)
from broker.state.keys import Keys
from broker.state.sites import SiteState
from common.errors import StoreUnavailable

__all__ = [
    "IDEMPOTENCY_TTL_S",
    "PRIORITY_HANDICAP_MS",
    "PRIORITY_RANK",
    "Store",
    "Submission",
    "SubmitRate",
    "queue_score",
]


class Store(SiteState, JobQueue, JobArchive):
    @classmethod
    def from_url(cls, url: str, namespace: str = "sw", max_connections: int = 64,
                 retention: Retention | None = None) -> Store:  # fmt: skip
        """A store on a blocking pool: a burst of callers waits for a connection instead of failing."""
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=10, socket_timeout=5, socket_connect_timeout=2,
            health_check_interval=15,
        )  # fmt: skip
        store = cls(aioredis.Redis(connection_pool=pool), Keys(namespace))
        if retention is not None:
            store.retention = retention
        return store

    async def clock_ms(self) -> int:
        """Redis's clock (TIME), the one every replica compares deadlines and heartbeats against."""
        async with translated():
            seconds, micros = await self.redis.time()
        return int(seconds) * 1000 + int(micros) // 1000

    async def close(self) -> None:
        await self.redis.aclose()

    async def ping(self) -> bool:
        try:
            async with translated():
                return bool(await self.redis.ping())
        except StoreUnavailable:
            return False
