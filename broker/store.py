"""Redis state: the one source of truth. Every state change is one Lua script or one transaction.

Redis errors are translated here into `StoreUnavailable`, so nothing above this module imports redis.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from broker.keys import Keys
from broker.schemas import Capacity, JobSpec, JobState
from suanwang.errors import StoreUnavailable

PRIORITY_RANK = {"high": 0, "normal": 1, "low": 2}
_RANK_SPAN = 10**13  # milliseconds since 1970 stay below this until the year 2286


def now_ms() -> int:
    return int(time.time() * 1000)


def queue_score(priority: str, created_ms: int) -> int:
    """Queue order: priority first, then submission time (a requeued job keeps its place)."""
    return PRIORITY_RANK[priority] * _RANK_SPAN + created_ms


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value


def decode_hash(raw: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in raw.items()}


@dataclass(frozen=True)
class Placement:
    """A decision to commit: `count` devices of `model` at `site` for `job`."""

    job: str
    site: str
    hub: str
    model: str
    count: int
    price: float
    latency_ms: float
    arch: str = ""
    decision: str = "{}"  # JSON: the chosen pool's named scores and the runners-up


@dataclass(frozen=True)
class SiteRecord:
    """A site as stored: identity, status, pool metadata and the capacity counters."""

    id: str
    hub: str
    cluster: str
    status: str
    seen_ms: int
    meta_version: int
    meta: dict[str, Any] | None
    capacity: dict[str, int]


@contextlib.asynccontextmanager
async def translated() -> AsyncIterator[None]:
    """Turn redis-py's connection and server errors into the project's own."""
    try:
        yield
    except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
        raise StoreUnavailable(f"Redis is unreachable: {exc}") from None
    except redis_errors.RedisError as exc:
        raise StoreUnavailable(f"Redis error: {exc}") from None


class Store:
    def __init__(self, redis: aioredis.Redis, keys: Keys, events_maxlen: int = 100_000) -> None:
        self.redis = redis
        self.keys = keys
        self.events_maxlen = events_maxlen
        lua = resources.files("broker") / "lua"
        self._capacity = redis.register_script((lua / "capacity.lua").read_text())
        self._status = redis.register_script((lua / "site_status.lua").read_text())
        self._allocate = redis.register_script((lua / "allocate.lua").read_text())
        self._transition = redis.register_script((lua / "transition.lua").read_text())

    @classmethod
    def from_url(cls, url: str, namespace: str = "sw", max_connections: int = 64) -> Store:
        """A store on a blocking pool: a burst of callers waits for a connection instead of failing."""
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=10, socket_timeout=5, socket_connect_timeout=2,
            health_check_interval=15,
        )  # fmt: skip
        return cls(aioredis.Redis(connection_pool=pool), Keys(namespace))

    async def close(self) -> None:
        await self.redis.aclose()

    async def ping(self) -> bool:
        try:
            async with translated():
                return bool(await self.redis.ping())
        except StoreUnavailable:
            return False

    # ------------------------------------------------------------------------------ sites

    async def apply_capacity(self, cap: Capacity, at_ms: int | None = None) -> bool:
        """Record a capacity message; False when its seq is not newer than the last one applied."""
        k = self.keys
        meta = orjson.dumps(
            {
                "pools": [p.model_dump(mode="json", exclude={"total", "in_use_external"}) for p in cap.pools],
                "energy": cap.energy.model_dump(),
                "latency_ms": cap.latency_ms,
            },
            option=orjson.OPT_SORT_KEYS,
        )
        args: list[Any] = [cap.site, cap.seq, at_ms or now_ms(), cap.hub, cap.cluster or "", meta, len(cap.pools)]
        for pool in cap.pools:
            args += [pool.model, pool.total, pool.in_use_external]
        keys = [k.site(cap.site), k.capacity(cap.site), k.sites, k.seen, k.clock]
        async with translated():
            return bool(await self._capacity(keys=keys, args=args))

    async def set_site_status(self, site: str, status: str, expect: str = "") -> bool:
        k = self.keys
        async with translated():
            return bool(await self._status(keys=[k.site(site), k.sites, k.clock], args=[site, status, expect]))

    async def changed_sites(self, since: int) -> list[tuple[str, int]]:
        """Sites changed after version `since`, with their versions, oldest first."""
        async with translated():
            rows = await self.redis.zrangebyscore(self.keys.sites, f"({since}", "+inf", withscores=True)
        return [(_text(site), int(version)) for site, version in rows]

    async def all_site_ids(self) -> list[str]:
        async with translated():
            return [_text(s) for s in await self.redis.zrange(self.keys.sites, 0, -1)]

    async def load_sites(self, ids: Sequence[str], known_meta: dict[str, int] | None = None) -> list[SiteRecord]:
        """Load sites in one round trip (two when pool metadata changed since `known_meta` versions)."""
        if not ids:
            return []
        k = self.keys
        async with translated():
            pipe = self.redis.pipeline(transaction=False)
            for site in ids:
                pipe.hmget(k.site(site), "hub", "cluster", "status", "seen", "mv")
                pipe.hgetall(k.capacity(site))
            raw = await pipe.execute()
            known = known_meta or {}
            need_meta = [
                site for i, site in enumerate(ids)
                if raw[2 * i][4] is not None and known.get(site) != int(raw[2 * i][4])
            ]  # fmt: skip
            metas: dict[str, dict[str, Any]] = {}
            if need_meta:
                pipe = self.redis.pipeline(transaction=False)
                for site in need_meta:
                    pipe.hget(k.site(site), "meta")
                for site, blob in zip(need_meta, await pipe.execute(), strict=True):
                    if blob:
                        metas[site] = orjson.loads(blob)
        records = []
        for i, site in enumerate(ids):
            hub, cluster, status, seen, mv = raw[2 * i]
            capacity = {_text(f): int(v) for f, v in raw[2 * i + 1].items()}
            records.append(
                SiteRecord(
                    id=site, hub=_text(hub), cluster=_text(cluster), status=_text(status) or "unknown",
                    seen_ms=int(seen or 0), meta_version=int(mv or 0), meta=metas.get(site), capacity=capacity,
                )
            )  # fmt: skip
        return records

    async def silent_sites(self, older_than_ms: int) -> list[str]:
        async with translated():
            return [_text(s) for s in await self.redis.zrangebyscore(self.keys.seen, "-inf", older_than_ms)]

    async def jobs_at(self, site: str) -> list[str]:
        async with translated():
            return [_text(j) for j in await self.redis.smembers(self.keys.site_jobs(site))]

    # ------------------------------------------------------------------------------ jobs

    async def submit(self, job_id: str, spec: JobSpec, at_ms: int | None = None) -> dict[str, str]:
        """Store a new job and queue it, in one transaction: after this returns the job is safe."""
        k = self.keys
        created = at_ms or now_ms()
        fields = {
            "id": job_id, "state": JobState.QUEUED.value, "spec": spec.model_dump_json(), "tenant": spec.tenant,
            "name": spec.name, "origin": spec.origin, "priority": spec.priority.value,
            "created": str(created), "updated": str(created), "attempt": "0",
            "qscore": str(queue_score(spec.priority.value, created)), "reason": "waiting for the matcher",
        }  # fmt: skip
        async with translated():
            pipe = self.redis.pipeline(transaction=True)
            pipe.hset(k.job(job_id), mapping=fields)
            pipe.zadd(k.queue, {job_id: int(fields["qscore"])})
            pipe.zadd(k.tenant_jobs(spec.tenant), {job_id: created})
            pipe.xadd(
                k.events,
                {"type": "queued", "job": job_id, "state": "queued", "tenant": spec.tenant, "origin": spec.origin,
                 "name": spec.name, "ts": str(created)},
                maxlen=self.events_maxlen, approximate=True,
            )  # fmt: skip
            await pipe.execute()
        return fields

    async def get_job(self, job_id: str) -> dict[str, str] | None:
        async with translated():
            raw = await self.redis.hgetall(self.keys.job(job_id))
        return decode_hash(raw) if raw else None

    async def get_jobs(self, ids: Sequence[str], *fields: str) -> list[list[str | None]]:
        async with translated():
            pipe = self.redis.pipeline(transaction=False)
            for job_id in ids:
                pipe.hmget(self.keys.job(job_id), *fields)
            rows = await pipe.execute()
        return [[v.decode() if v is not None else None for v in row] for row in rows]

    async def list_jobs(self, tenant: str, limit: int, state: str | None = None) -> list[dict[str, str]]:
        """Newest first; with a state filter, pages through the tenant's jobs until `limit` match."""
        jobs: list[dict[str, str]] = []
        start, page = 0, max(limit, 100)
        async with translated():
            while len(jobs) < limit:
                ids = await self.redis.zrevrange(self.keys.tenant_jobs(tenant), start, start + page - 1)
                if not ids:
                    break
                pipe = self.redis.pipeline(transaction=False)
                for job_id in ids:
                    pipe.hgetall(self.keys.job(_text(job_id)))
                for raw in await pipe.execute():
                    job = decode_hash(raw)
                    if job and (state is None or job.get("state") == state):
                        jobs.append(job)
                start += page
        return jobs[:limit]

    async def queued(self, start: int, count: int) -> list[str]:
        async with translated():
            return [_text(j) for j in await self.redis.zrange(self.keys.queue, start, start + count - 1)]

    async def queue_length(self) -> int:
        async with translated():
            return int(await self.redis.zcard(self.keys.queue))

    async def allocate(self, placements: Sequence[Placement], accept_timeout_ms: int) -> list[int]:
        """Commit placements in one round trip; per placement the attempt number, or <= 0 if refused."""
        if not placements:
            return []
        k = self.keys
        now = now_ms()
        async with translated():
            pipe = self.redis.pipeline(transaction=False)
            for p in placements:
                await self._allocate(
                    keys=[k.job(p.job), k.capacity(p.site), k.queue, k.site_jobs(p.site), k.assigned, k.events,
                          k.sites, k.clock, k.site(p.site)],
                    args=[p.job, p.site, p.model, p.count, p.price, p.latency_ms, now, now + accept_timeout_ms,
                          self.events_maxlen, p.hub, p.arch, p.decision],
                    client=pipe,
                )  # fmt: skip
            return [int(r) for r in await pipe.execute()]

    async def transition(
        self, job_id: str, action: str, site: str = "", attempt: int | str = "", reason: str = ""
    ) -> str:
        """Apply one lifecycle action; returns the new state, or '' when it did not apply."""
        return (await self.transitions([(job_id, action, site, attempt, reason)]))[0]

    async def transitions(self, actions: Iterable[tuple[str, str, str, int | str, str]]) -> list[str]:
        k = self.keys
        now = now_ms()
        async with translated():
            pipe = self.redis.pipeline(transaction=False)
            count = 0
            for job_id, action, site, attempt, reason in actions:
                await self._transition(
                    keys=[k.job(job_id), k.queue, k.assigned, k.events, k.sites, k.clock, k.prefix + ":"],
                    args=[job_id, action, site, str(attempt), reason, now, self.events_maxlen],
                    client=pipe,
                )
                count += 1
            if not count:
                return []
            return [_text(r) for r in await pipe.execute()]

    async def overdue_assignments(self, at_ms: int) -> list[str]:
        async with translated():
            return [_text(j) for j in await self.redis.zrangebyscore(self.keys.assigned, "-inf", at_ms)]

    async def set_reasons(self, reasons: dict[str, str]) -> None:
        """Record why queued jobs are still waiting (only jobs still queued are touched)."""
        if not reasons:
            return
        async with translated():
            pipe = self.redis.pipeline(transaction=False)
            for job_id, reason in reasons.items():
                pipe.hset(self.keys.job(job_id), "reason", reason)
            await pipe.execute()
