"""Redis state: the one source of truth. Every state change is one Lua script or one transaction.

Redis errors are translated into `StoreUnavailable` (broker.state.connection), so nothing outside
`broker.state` imports redis. The store's methods live by subject: sites (broker.state.sites) and jobs
(broker.state.jobs).
"""

from __future__ import annotations

from redis import exceptions as redis_errors
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from broker.state.archive import JobArchive, Retention
from broker.state.connection import redis_client, translated
from broker.state.holds import Hold, HoldBook, HoldOption, TakenHold
from broker.state.jobs import (
    IDEMPOTENCY_TTL_S,
    PRIORITY_HANDICAP_MS,
    PRIORITY_RANK,
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
    "Hold",
    "HoldOption",
    "Store",
    "Submission",
    "SubmitRate",
    "TakenHold",
    "queue_score",
]


class Store(SiteState, HoldBook, JobArchive):
    @classmethod
    def from_url(cls, url: str, namespace: str = "sw", max_connections: int = 64,
                 retention: Retention | None = None, job_shards: int = 1) -> Store:  # fmt: skip
        """A store on a blocking pool: a burst of callers waits for a connection instead of failing."""
        # A connection Redis closed (a restart) fails its next command before the command reaches Redis;
        # that command is sent again once on a fresh connection instead of failing the caller. Only for
        # connection errors, not timeouts: every script is fenced on what it finds (a job's state, its
        # attempt, an existing job id), so even a command that did run before its reply was lost is safe
        # to send again.
        # Through Sentinel (a `redis+sentinel://` URL) a new connection asks the sentinels for the primary, so
        # after a failover the retried command reaches the promoted replica. On Redis Cluster (`redis+cluster://`)
        # the namespace lives on the node serving its hash tag's slot, and the client follows it there
        # (broker.state.cluster).
        client = redis_client(
            url, max_connections=max_connections, timeout=10, socket_timeout=5, socket_connect_timeout=2,
            health_check_interval=15,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2, supported_errors=(redis_errors.ConnectionError,)),
        )  # fmt: skip
        store = cls(client, Keys(namespace, job_shards))
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
