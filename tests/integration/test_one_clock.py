"""Time comes from Redis: a replica whose own clock is skewed neither expires fresh assignments nor refills
a submission bucket. Each test skews the broker process's clock (what it would have used) by an hour."""

from __future__ import annotations

import time

import pytest
import redis.asyncio as aioredis

from broker.model.job import JobSpec
from broker.model.records import Placement
from broker.sites.lifecycle import sweep
from broker.state import connection, jobs
from broker.state.keys import Keys
from broker.state.store import Store, SubmitRate
from common.errors import TooManyRequests
from common.protocol import Capacity
from tests.http.doubles import RecordingPublisher

SITE, MODEL = "guian-01", "A100-80G"
HOUR_MS = 3_600_000
SPEC = JobSpec.model_validate({"name": "finetune", "resources": {"arch": "GPU", "models": [MODEL], "count": 8},
                               "origin": "shanghai", "duration_hours": 1})  # fmt: skip


def skew(monkeypatch: pytest.MonkeyPatch, by_ms: int) -> None:
    """The replica's own clock, wherever the store could read it, off by `by_ms`."""

    def skewed() -> int:
        return int(time.time() * 1000) + by_ms

    monkeypatch.setattr(connection, "now_ms", skewed)
    monkeypatch.setattr(jobs, "now_ms", skewed)


@pytest.fixture
async def store(redis_client: aioredis.Redis, namespace: str) -> Store:
    store = Store(redis_client, Keys(namespace))
    await store.apply_capacity(Capacity.model_validate({
        "schema": "suanwang.capacity/1", "site": SITE, "hub": "guizhou", "cluster": "guian", "seq": 1,
        "pools": [{"arch": "GPU", "model": MODEL, "memory_gb": 80, "total": 16, "per_node": 8,
                   "price_cny_per_hour": 12.5}],
    }))  # fmt: skip
    return store


async def test_a_replica_an_hour_behind_does_not_expire_the_assignments_it_makes(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.submit("j1", SPEC)
    skew(monkeypatch, -HOUR_MS)
    (commit,) = await store.allocate([Placement("j1", SITE, "guizhou", MODEL, 8, 12.5, 24.0)], 60_000)
    assert commit.ok
    moved = await sweep(store, RecordingPublisher(), site_ttl_ms=30_000)
    assert moved["accept_timeout"] == 0
    job = await store.get_job("j1")
    assert job is not None and job["state"] == "assigned"
    assert abs(int(job["assigned_at"]) - await store.clock_ms()) < 60_000


async def test_a_replica_an_hour_ahead_does_not_refill_the_submission_bucket(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    rate = SubmitRate("tenant:acme", per_s=0.01, burst=2)
    await store.submit("j1", SPEC, rate_limit=rate)
    await store.submit("j2", SPEC, rate_limit=rate)
    skew(monkeypatch, +HOUR_MS)  # another replica, whose clock runs an hour ahead
    with pytest.raises(TooManyRequests):
        await store.submit("j3", SPEC, rate_limit=rate)


async def test_jobs_are_ordered_by_redis_time_whatever_replica_submits_them(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    skew(monkeypatch, +HOUR_MS)
    await store.submit("early", SPEC)
    skew(monkeypatch, -HOUR_MS)
    await store.submit("late", SPEC)
    assert await store.queued(0, 10) == ["early", "late"]
    late = await store.get_job("late")
    assert late is not None and abs(int(late["created"]) - await store.clock_ms()) < 60_000


async def test_an_idempotent_retry_costs_no_rate_token(store: Store) -> None:
    rate = SubmitRate("tenant:acme", per_s=0.01, burst=1)
    await store.submit("j1", SPEC, idempotency_key="k1", body_hash="h", rate_limit=rate)
    job, created = await store.submit("j1-retry", SPEC, idempotency_key="k1", body_hash="h", rate_limit=rate)
    assert not created and job["id"] == "j1"
