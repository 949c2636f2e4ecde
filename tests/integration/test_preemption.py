"""preempt.lua against a real Redis: all of a preemption or none of it, fenced on what the caller read; a
job preempted `max_preemptions` times is no longer preemptible; a preempted job does not preempt."""

from __future__ import annotations

import pytest

from broker.model.records import Refusal
from broker.state.audit import audit
from broker.state.history import check_history
from broker.state.keys import Keys
from broker.state.store import Store
from tests.integration.test_holds import option, usage
from tests.integration.test_store import MODEL, SITE, T0, capacity, counters, placement, spec


@pytest.fixture
def store(redis_client, namespace) -> Store:
    return Store(redis_client, Keys(namespace))


async def running_low(store: Store, job: str, count: int = 4, preemptible: bool = True) -> None:
    low = spec(priority="low", count=count).model_copy(update={"preemptible": preemptible, "grace_s": 2})
    await store.submit(job, low, at_ms=T0)
    (commit,) = await store.allocate([placement(job, count=count)], 60_000)
    assert commit.ok
    await store.transition(job, "running", SITE, 1)


async def test_a_preemption_requeues_the_victims_and_holds_their_devices_for_the_job(store: Store) -> None:
    await store.apply_capacity(capacity(1, {MODEL: (8, 0)}))
    await running_low(store, "low1")
    await running_low(store, "low2")
    await store.submit("urgent", spec(priority="high", count=8), at_ms=T0)
    until, refusal = await store.preempt("urgent", "p1", option(count=8), 2_000, 3, [("low1", 1), ("low2", 1)])
    assert refusal is None and until > 0
    for job in ("low1", "low2"):
        record = await store.get_job(job)
        assert record is not None and record["state"] == "queued"
        assert record["reason"] == "preempted by job urgent of tenant default"
    assert (await counters(store))[f"a:{MODEL}"] == 8, "the victims' devices are held, not freed for others"
    assert await usage(store) == 8
    handed = await store.commit_hold("p1", 30_000)
    assert handed is not None and handed[2].ok
    job = await store.get_job("urgent")
    assert job is not None and (job["state"], job["site"], job["hold"]) == ("assigned", SITE, "p1")
    assert await audit(store) == []
    assert (await check_history(store)).ok


async def test_a_victim_that_moved_means_no_preemption_at_all(store: Store) -> None:
    await store.apply_capacity(capacity(1, {MODEL: (8, 0)}))
    await running_low(store, "low1")
    await running_low(store, "low2")
    await store.transition("low2", "completed", SITE, 1)  # finished after the caller read it
    await store.submit("urgent", spec(priority="high", count=8), at_ms=T0)
    _, refusal = await store.preempt("urgent", "p1", option(count=8), 2_000, 3, [("low1", 1), ("low2", 1)])
    assert refusal is Refusal.VICTIM_MOVED
    low1 = await store.get_job("low1")
    assert low1 is not None and low1["state"] == "running", "nothing was preempted"
    assert await store.get_hold("p1") is None


@pytest.mark.parametrize(("preemptible", "priority"), [(False, "low"), (True, "high")])
async def test_only_preemptible_lower_priority_work_gives_way(store: Store, preemptible: bool, priority: str) -> None:
    await store.apply_capacity(capacity(1, {MODEL: (8, 0)}))
    victim = spec(priority=priority, count=8).model_copy(update={"preemptible": preemptible})
    await store.submit("v", victim, at_ms=T0)
    await store.allocate([placement("v", count=8)], 60_000)
    await store.submit("urgent", spec(priority="high", count=8), at_ms=T0)
    _, refusal = await store.preempt("urgent", "p1", option(count=8), 2_000, 3, [("v", 1)])
    assert refusal is Refusal.VICTIM_MOVED


async def test_a_job_preempted_n_times_is_no_longer_preemptible_and_never_preempts(store: Store) -> None:
    await store.apply_capacity(capacity(1, {MODEL: (8, 0)}))
    await running_low(store, "low", count=8)
    await store.submit("urgent", spec(priority="high", count=8), at_ms=T0)
    _, refusal = await store.preempt("urgent", "p1", option(count=8), 0, 1, [("low", 1)])
    assert refusal is None
    low = await store.get_job("low")
    assert low is not None and (low["preemptible"], low["preemptions"]) == ("0", "1")
    # the preempted job may not preempt in its turn (no cascades), even work it outranks
    await store.release_hold("p1")
    await store.submit("lower", spec(priority="low", count=8).model_copy(update={"preemptible": True}), at_ms=T0)
    await store.allocate([placement("lower", count=8)], 60_000)
    await store.redis.hset(store.keys.only.job("low"), "priority", "normal")  # as if it outranked the running one
    _, refusal = await store.preempt("low", "p2", option(count=8), 0, 3, [("lower", 1)])
    assert refusal is Refusal.NO_CASCADE


async def test_preemption_respects_the_tenant_limit(store: Store) -> None:
    await store.apply_capacity(capacity(1, {MODEL: (8, 0)}))
    await running_low(store, "low", count=8)
    await store.submit("urgent", spec(priority="high", count=8).model_copy(update={"tenant": "acme"}), at_ms=T0)
    await store.set_tenant_limit("acme", 4)
    _, refusal = await store.preempt("urgent", "p1", option(count=8), 0, 3, [("low", 1)])
    assert refusal is Refusal.TENANT_LIMIT
