"""Replicas divide the queue: a pass claims the heads it reads, so another replica's concurrent pass reads
other jobs and their commits are not refused for it; a dead replica's claims lapse and its jobs are read by
the others."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence

import redis.asyncio as aioredis

from broker.matching.snapshot import Snapshot
from broker.model.job import JobSpec
from broker.model.records import Commit, Placement
from broker.scheduling.scheduler import Scheduler
from broker.state.keys import Keys
from broker.state.store import Store
from common.protocol import Capacity
from regions import load_geography
from tests.http.doubles import RecordingPublisher
from tests.support import eventually

GEO = load_geography()
MODEL = "A100-80G"
SPEC = JobSpec.model_validate({"name": "finetune", "resources": {"arch": "GPU", "models": [MODEL], "count": 1},
                               "origin": "shanghai", "duration_hours": 1})  # fmt: skip


async def sites(store: Store, n: int) -> None:
    for i in range(n):
        await store.apply_capacity(Capacity.model_validate({
            "schema": "suanwang.capacity/1", "site": f"guian-{i:02d}", "hub": "guizhou", "cluster": "guian",
            "seq": 1, "pools": [{"arch": "GPU", "model": MODEL, "memory_gb": 80, "total": 64, "per_node": 8,
                                 "price_cny_per_hour": 12.5}],
        }))  # fmt: skip


async def test_two_replicas_read_different_heads_and_a_dead_ones_lapse(
    redis_client: aioredis.Redis, namespace: str
) -> None:
    store = Store(redis_client, Keys(namespace))
    for i in range(24):
        await store.submit(f"j{i:02d}", SPEC)
    a = [job for job, *_ in await store.queue_heads(8, claimer="A", claim_ms=400)]
    b = [job for job, *_ in await store.queue_heads(8, claimer="B", claim_ms=400)]
    assert len(a) == len(b) == 8 and not set(a) & set(b)
    assert [job for job, *_ in await store.queue_heads(8, claimer="A", claim_ms=400)] == a  # its own, renewed
    # A dies: after its claims lapse, B reads A's jobs too
    await eventually(lambda: _reads(store, "B", set(a)), "A's jobs read by B once A's claims lapsed", 5.0)


async def _reads(store: Store, claimer: str, jobs: set[str]) -> bool:
    return jobs <= {job for job, *_ in await store.queue_heads(24, claimer=claimer, claim_ms=400)}


class Commits(Store):
    """Counts what the commits of every pass came to."""

    outcomes: Counter[str]

    async def allocate(self, placements: Sequence[Placement], accept_timeout_ms: int) -> list[Commit]:
        commits = await super().allocate(placements, accept_timeout_ms)
        self.outcomes.update("ok" if c.ok else str(c.refusal) for c in commits)
        return commits


async def test_concurrent_passes_of_two_replicas_place_everything_without_refused_commits(
    redis_client: aioredis.Redis, namespace: str
) -> None:
    store = Commits(redis_client, Keys(namespace))
    store.outcomes = Counter()
    await sites(store, 20)
    for i in range(300):
        await store.submit(f"j{i:03d}", SPEC)
    replicas = [Scheduler(store, Snapshot(GEO), RecordingPublisher(), batch=32, replica=name) for name in "AB"]
    for _ in range(30):
        placed = await asyncio.gather(*(r.run_once() for r in replicas))
        if not any(placed) and await store.queue_length() == 0:
            break
    assert await store.queue_length() == 0
    assert store.outcomes["ok"] == 300
    assert sum(replica.placed for replica in replicas) == 300
    assert min(replica.placed for replica in replicas) > 50  # both did a share of the work
    assert store.outcomes["ok"] == sum(store.outcomes.values()), store.outcomes  # nothing refused
