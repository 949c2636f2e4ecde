"""No head-of-line blocking inside a tenant: jobs that fit nowhere leave the tenant's window (parked) until
capacity they could use may have grown, so its later, placeable jobs are looked at; work per pass stays
bounded."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from broker.matching.snapshot import Snapshot
from broker.model.job import JobSpec
from broker.scheduling.scheduler import Scheduler
from broker.state.keys import Keys
from broker.state.store import Store
from common.protocol import Capacity
from regions import load_geography
from tests.http.doubles import RecordingPublisher

SITE, MODEL = "guian-01", "A100-80G"
GEO = load_geography()


def spec(count: int) -> JobSpec:
    return JobSpec.model_validate({"name": "finetune", "tenant": "acme", "origin": "shanghai", "duration_hours": 1,
                                   "resources": {"arch": "GPU", "models": [MODEL], "count": count}})  # fmt: skip


async def online_site(store: Store, total: int = 16) -> None:
    await store.apply_capacity(Capacity.model_validate({
        "schema": "suanwang.capacity/1", "site": SITE, "hub": "guizhou", "cluster": "guian", "seq": 1,
        "pools": [{"arch": "GPU", "model": MODEL, "memory_gb": 80, "total": total, "per_node": 8,
                   "price_cny_per_hour": 12.5}],
    }))  # fmt: skip


class CountingScheduler(Scheduler):
    """Records how many jobs each pass matched."""

    matched: list[int]

    async def _plan(self, batch: Any) -> Any:
        self.matched.append(len(batch.requests))
        return await super()._plan(batch)


async def test_many_unplaceable_jobs_do_not_hide_a_tenants_placeable_one(
    redis_client: aioredis.Redis, namespace: str
) -> None:
    store = Store(redis_client, Keys(namespace))
    await online_site(store)
    scheduler = CountingScheduler(store, Snapshot(GEO), RecordingPublisher(), batch=8)
    scheduler.matched = []
    for i in range(60):  # first in the queue: 64 devices each, more than any site has
        await store.submit(f"big-{i:02d}", spec(64))
    await store.submit("small", spec(8))
    for _ in range(12):
        await scheduler.run_once()
        job = await store.get_job("small")
        assert job is not None
        if job["state"] == "assigned":
            break
    assert job["state"] == "assigned", "the placeable job was never looked at"
    assert max(scheduler.matched) <= 16  # the window and as many woken parked jobs, no more
    big = await store.get_job("big-00")
    assert big is not None and big["state"] == "queued" and "64" in big["reason"]


async def test_a_parked_job_is_placed_when_devices_come_free(redis_client: aioredis.Redis, namespace: str) -> None:
    store = Store(redis_client, Keys(namespace))
    await online_site(store)
    scheduler = Scheduler(store, Snapshot(GEO), RecordingPublisher(), batch=8, reserve_after_s=3600)
    await store.submit("first", spec(16))
    assert await scheduler.run_once() == 1
    await store.submit("second", spec(16))
    assert await scheduler.run_once() == 0  # nothing free: parked
    assert await redis_client.zscore(store.keys.only.tenant_parked("acme"), "second") is not None
    assert await scheduler.run_once() == 0
    assert await store.transition("first", "completed", SITE, 1) == "completed"
    assert await scheduler.run_once() == 1
    second = await store.get_job("second")
    assert second is not None and second["state"] == "assigned"
    assert await redis_client.zcard(store.keys.only.tenant_parked("acme")) == 0


async def test_a_parked_job_can_be_cancelled_and_leaves_no_trace(redis_client: aioredis.Redis, namespace: str) -> None:
    store = Store(redis_client, Keys(namespace))
    await online_site(store, total=8)
    scheduler = Scheduler(store, Snapshot(GEO), RecordingPublisher(), batch=8)
    await store.submit("huge", spec(64))
    await scheduler.run_once()
    assert await redis_client.zscore(store.keys.only.tenant_parked("acme"), "huge") is not None
    assert await store.transition("huge", "cancel", reason="by user") == "cancelled"
    assert await redis_client.zcard(store.keys.only.tenant_parked("acme")) == 0
    assert await redis_client.zscore(store.keys.only.queued_tenants, "acme") is None


async def test_a_waiting_reason_never_lands_on_a_job_another_replica_placed(
    redis_client: aioredis.Redis, namespace: str
) -> None:
    store = Store(redis_client, Keys(namespace))
    await online_site(store)
    await store.submit("j1", spec(8))
    other = Scheduler(store, Snapshot(GEO), RecordingPublisher())
    assert await other.run_once() == 1  # placed by the other replica after this one decided it waits
    assert await store.set_reasons({"j1": "no site has 8 x A100-80G free"}, park={"j1"}) == 0
    job = await store.get_job("j1")
    assert job is not None and job["state"] == "assigned" and job["reason"] == ""
    assert await redis_client.zcard(store.keys.only.tenant_parked("acme")) == 0


class CapacityArrivesWhileParking(Store):
    """A site's first capacity lands after the pass read the view, just before it parks the job."""

    arrived = False

    async def set_reasons(self, reasons: Any, park: Any = (), seen: int = 0) -> int:
        if park and not self.arrived:
            self.arrived = True
            await online_site(self)
        return await super().set_reasons(reasons, park, seen)


async def test_capacity_arriving_while_a_job_is_parked_still_wakes_it(
    redis_client: aioredis.Redis, namespace: str
) -> None:
    store = CapacityArrivesWhileParking(redis_client, Keys(namespace))
    scheduler = Scheduler(store, Snapshot(GEO), RecordingPublisher(), batch=8)
    await store.submit("j1", spec(8))
    assert await scheduler.run_once() == 0  # no site yet in the view: parked
    assert store.arrived
    assert await scheduler.run_once() == 1  # the arrival woke it
