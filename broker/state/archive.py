"""Keeping the hot set bounded: finished jobs leave it after a retention, and the global usage log is trimmed.

A job that reaches a final state is listed in `finished` by its finish time (transition.lua). After
`finished_hours` the sweeper's `retire` turns its hash and history list into one archived string (with
its own time-to-live, `archive_days`; 0 keeps it), and takes it out of its tenant's job and state indexes,
so listings show the jobs of the retention window while the job and its history stay readable by id. The
global usage stream keeps `usage_days` of records for operators' reads across tenants and the dashboard;
each tenant's own usage stream is the bill and is not trimmed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis

from broker.state.base import StoreBase
from broker.state.connection import translated
from broker.state.keys import Keys
from common import logs

log = logs.get("suanwang.archive")

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS


@dataclass(frozen=True)
class Retention:
    """How long finished jobs stay hot, archived jobs stay at all, and the global usage log reaches back."""

    finished_hours: float = 168.0
    usage_days: float = 35.0
    archive_days: float = 365.0  # 0: archived jobs are kept until deleted by hand
    batch: int = 200  # most jobs archived per sweep, so one script call stays short


@dataclass(frozen=True)
class Archived:
    """A finished job read back from the archive: its hash as it was, its transitions, and when it moved."""

    job: dict[str, str]
    history: list[dict[str, Any]]
    archived_ms: int


async def read_archived(redis: aioredis.Redis, keys: Keys, job_id: str) -> Archived | None:
    """The archived record of `job_id`, or None when there is none."""
    async with translated():
        raw = await redis.get(keys.for_id(job_id).archived_job(job_id))
    if raw is None:
        return None
    record = orjson.loads(raw)
    return Archived(job=record["job"], history=record["history"], archived_ms=int(record["archived"]))


class JobArchive(StoreBase):
    retention: Retention = Retention()

    async def retire(self, now_ms: int) -> int:
        """One bounded step of upkeep: archive up to `retention.batch` jobs finished before the retention, and
        trim the global usage log (approximately, whole stream nodes at a time). Returns how many jobs were
        archived."""
        r = self.retention
        finished_before = now_ms - int(r.finished_hours * HOUR_MS)
        ttl = int(r.archive_days * DAY_MS)
        shards = self.keys.each_shard
        calls = [(self._archive, [sk.finished, sk.prefix + ":"], [finished_before, r.batch, ttl, now_ms])
                 for sk in shards]  # fmt: skip
        async with translated():
            archived = sum(int(n) for n in await self.run_scripts(calls))
            pipe = self.redis.pipeline(transaction=False)
            for sk in shards:
                pipe.xtrim(sk.usage, minid=str(now_ms - int(r.usage_days * DAY_MS)), approximate=True)
            await pipe.execute()
        if archived:
            log.info("jobs.archived", jobs=archived, finished_before=finished_before)
        return archived

    async def archived(self, job_id: str) -> Archived | None:
        return await read_archived(self.redis, self.keys, job_id)
