"""Holds against a real Redis: a quote's devices reserved at its price, handed to the job submitted with the
hold in one transaction, or given back when the hold expires or is released; each ending happens once."""

from __future__ import annotations

import asyncio

import pytest

from broker.model.records import Placement, Refusal
from broker.state.audit import audit, audit_report
from broker.state.history import check_history
from broker.state.holds import Hold, HoldOption
from broker.state.keys import Keys
from broker.state.store import Store
from common.errors import Conflict, HoldNotStanding
from tests.integration.test_store import MODEL, SITE, capacity, counters, event_types, spec
from tests.support import ledger, site_keys

OTHER = "guian-02"


@pytest.fixture
def store(redis_client, namespace) -> Store:
    return Store(redis_client, Keys(namespace))


def option(site: str = SITE, count: int = 8, price: float = 12.5) -> HoldOption:
    offer = {"site": site, "hub": "guizhou", "model": MODEL, "arch": "GPU", "devices": count,
             "price_cny_per_hour": price, "latency_ms": 24.0, "est_hours": 2.0, "stack": None, "image": None,
             "cost_cny_per_hour": price * count, "unit_price_cny_per_hour": price, "score": 90.0, "scores": {}}
    return HoldOption.of_offer(offer)


async def usage(store: Store, tenant: str = "default") -> int:
    return int(await store.redis.hget(store.keys.only.tenant_usage, tenant) or 0)


async def test_a_hold_takes_the_devices_and_the_held_job_gets_them_at_the_quoted_price(store: Store) -> None:
    await store.apply_capacity(capacity(1, {MODEL: (16, 0)}))
    job = spec(count=8)
    taken = await store.take_hold("h1", "default", [option(price=12.5)], 60_000, job.placement_hash())
    assert taken.hold is not None and taken.hold.standing and taken.choice == 0
    assert (await counters(store))[f"a:{MODEL}"] == 8, "held devices are taken from the pool"
    assert await usage(store) == 8, "and count against the tenant"
    # the site's price went up meanwhile: the job still pays what was quoted
    await store.apply_capacity(capacity(2, {MODEL: (16, 0)}))
    result = await store.submit_held("j1", job.model_copy(update={"hold": "h1", "name": "renamed"}), 30_000)
    assert not isinstance(result, Exception)
    record, created, commit = result
    assert created and commit is not None and commit.ok and commit.attempt == 1
    assert (record["state"], record["site"], float(record["price"]), record["hold"]) == ("assigned", SITE, 12.5, "h1")
    assert (await counters(store))[f"a:{MODEL}"] == 8, "the hold's devices passed to the job, not taken twice"
    assert await usage(store) == 8
    hold = await store.get_hold("h1")
    assert hold is not None and (hold.state, hold.job) == ("used", "j1")
    assert await store.list_holds() == [] and await store.jobs_at(SITE) == ["j1"]
    assert set(await ledger(store, SITE)) == {"j1"}, "the hold's ledger entry passed to the job"
    # a hold is used once
    again = await store.submit_held("j2", job.model_copy(update={"hold": "h1"}), 30_000)
    assert isinstance(again, HoldNotStanding) and again.state == "used"
    assert await store.get_job("j2") is None, "a job refused for its hold is not stored"


def placement_on_hold(job: str, hold: Hold) -> Placement:
    """The scheduler's placement of `job` exactly on its hold (as commit_hold makes it)."""
    return Placement(job, hold.site, hold.hub, hold.model, hold.count, hold.price, hold.latency_ms, arch=hold.arch,
                     hold=hold.id)  # fmt: skip


async def test_a_job_on_a_hold_whose_site_went_away_is_stored_and_waits(store: Store) -> None:
    """The hold stands, but its site is offline: the job is stored and queued (site_not_online), not assigned
    to a site that is gone, and the hold keeps its devices."""
    await store.apply_capacity(capacity(1, {MODEL: (16, 0)}))
    job = spec(count=8)
    taken = await store.take_hold("h1", "default", [option()], 60_000, job.placement_hash())
    assert taken.hold is not None
    assert await store.set_site_status(SITE, "offline")
    result = await store.submit_held("j1", job.model_copy(update={"hold": "h1"}), 30_000)
    assert not isinstance(result, Exception)
    record, created, commit = result
    assert created and commit is not None and commit.refusal is Refusal.SITE_NOT_ONLINE, commit
    assert record["state"] == "queued" and (await store.get_job("j1") or {})["state"] == "queued"
    hold = await store.get_hold("h1")
    assert hold is not None and hold.standing
    assert set(await ledger(store, SITE)) == {"hold:h1"}
    (again,) = await store.allocate([placement_on_hold("j1", hold)], 30_000)
    assert again.refusal is Refusal.SITE_NOT_ONLINE, "nor does the scheduler's commit place it there"
    assert (await store.get_job("j1") or {})["state"] == "queued"


async def test_a_hold_past_its_time_refuses_the_job_and_the_sweep_gives_the_devices_back(store: Store) -> None:
    await store.apply_capacity(capacity(1, {MODEL: (16, 0)}))
    now = await store.clock_ms()
    job = spec(count=8)
    await store.take_hold("h1", "default", [option()], 1, job.placement_hash(), now_ms=now - 10)
    refused = await store.submit_held("j1", job.model_copy(update={"hold": "h1"}), 30_000)
    assert isinstance(refused, HoldNotStanding) and refused.state == "expired" and refused.code == "hold_expired"
    assert await store.get_job("j1") is None
    assert [h for h, _ in await store.due_holds(await store.clock_ms())] == ["h1"]
    assert await store.expire_holds(["h1"]) == [True]
    assert await store.expire_holds(["h1"]) == [False], "an ended hold ends once"
    assert (await counters(store))[f"a:{MODEL}"] == 0 and await usage(store) == 0
    hold = await store.get_hold("h1")
    assert hold is not None and hold.state == "expired"
    assert "hold_expired" in await event_types(store)


async def test_a_standing_hold_is_not_expired_before_its_time(store: Store) -> None:
    await store.apply_capacity(capacity(1, {MODEL: (16, 0)}))
    await store.take_hold("h1", "default", [option()], 60_000, "x")
    assert await store.expire_holds(["h1"]) == [False]
    assert (await counters(store))[f"a:{MODEL}"] == 8


async def test_a_hold_for_another_job_or_tenant_is_refused(store: Store) -> None:
    await store.apply_capacity(capacity(1, {MODEL: (16, 0)}))
    job = spec(count=8)
    await store.take_hold("h1", "default", [option()], 60_000, job.placement_hash())
    other = job.model_copy(update={"hold": "h1", "origin": "beijing"})
    mismatch = await store.submit_held("j1", other, 30_000)
    assert isinstance(mismatch, Conflict) and mismatch.code == "hold_mismatch"
    stranger = await store.submit_held("j2", job.model_copy(update={"hold": "h1", "tenant": "acme"}), 30_000)
    assert isinstance(stranger, HoldNotStanding) and stranger.state == "unknown", "another tenant's hold is not named"
    assert not await store.release_hold("h1", tenant="acme"), "nor released by another tenant"
    assert await store.release_hold("h1", tenant="default")
    assert (await counters(store))[f"a:{MODEL}"] == 0 and await usage(store) == 0


async def test_a_hold_falls_back_in_order_and_refuses_like_a_commit(store: Store) -> None:
    await store.apply_capacity(capacity(1, {MODEL: (16, 12)}))  # 4 free
    await store.apply_capacity(capacity(1, {MODEL: (16, 0)}, site=OTHER))
    taken = await store.take_hold("h1", "default", [option(), option(OTHER)], 60_000, "x")
    assert taken.choice == 1 and taken.hold is not None and taken.hold.site == OTHER
    refused = await store.take_hold("h2", "default", [option(count=12)], 60_000, "x")
    assert refused.hold is None and refused.refusal is Refusal.STALE_VIEW
    await store.set_tenant_limit("default", 10)
    limited = await store.take_hold("h3", "default", [option(OTHER, count=4)], 60_000, "x")
    assert limited.refusal is Refusal.TENANT_LIMIT, "a hold counts against the tenant's limit"
    await store.set_tenant_limit("default", None)
    many = await store.take_hold("h4", "default", [option(OTHER, count=1)], 60_000, "x", max_holds=1)
    assert many.refusal is Refusal.TOO_MANY_HOLDS
    # at its limit the tenant is told so even where no devices are free, and nothing is reserved for it
    full = await store.take_hold("h5", "default", [option(count=12)], 60_000, "x", max_holds=1)
    assert full.refusal is Refusal.TOO_MANY_HOLDS
    again = await store.take_hold("h1", "default", [option(OTHER, count=1)], 60_000, "x")
    assert again.refusal is Refusal.HOLD_NOT_STANDING, "a hold id already taken"
    assert (await ledger(store, SITE)) == {}


async def test_racing_holds_never_take_more_than_the_pool_has(store: Store) -> None:
    await store.apply_capacity(capacity(1, {MODEL: (16, 0)}))
    takes = await asyncio.gather(*(store.take_hold(f"h{i}", "default", [option(count=4)], 60_000, "x")
                                   for i in range(10)))  # fmt: skip
    assert sum(t.hold is not None for t in takes) == 4
    assert (await counters(store))[f"a:{MODEL}"] == 16


async def test_audit_counts_standing_holds_and_finds_devices_no_hold_accounts_for(store: Store) -> None:
    await store.apply_capacity(capacity(1, {MODEL: (16, 0)}))
    job = spec(count=8)
    await store.take_hold("h1", "default", [option(count=4)], 60_000, "x")
    await store.take_hold("h2", "default", [option(count=8)], 60_000, job.placement_hash())
    result = await store.submit_held("j1", job.model_copy(update={"hold": "h2"}), 30_000)
    assert not isinstance(result, Exception) and result[2] is not None and result[2].ok
    report = await audit_report(store)
    assert report.violations == [] and report.warnings == [], "a standing hold and a used one are both accounted"
    await store.redis.hincrby((await site_keys(store, SITE)).capacity(SITE), f"a:{MODEL}", 2)  # devices nobody holds
    assert {v.kind for v in await audit(store)} == {"allocation_mismatch"}


async def test_the_history_checker_knows_a_hold_ends_once(store: Store) -> None:
    await store.apply_capacity(capacity(1, {MODEL: (16, 0)}))
    job = spec(count=8)
    await store.take_hold("h1", "default", [option()], 60_000, job.placement_hash())
    await store.take_hold("h2", "default", [option(count=2)], 60_000, "x")
    await store.release_hold("h2")
    await store.submit_held("j1", job.model_copy(update={"hold": "h1"}), 30_000)
    assert (await check_history(store)).ok
    # a hold ended a second time after it was used: the log the scripts never write
    await store.redis.xadd(store.keys.only.events, {"type": "hold_expired", "hold": "h1", "site": SITE, "model": MODEL,
                                               "count": 8})  # fmt: skip
    report = await check_history(store)
    assert [(v.job, v.kind) for v in report.violations] == [("h1", "hold")]
