"""The audit against a real redis-server: state built by the real scripts, then broken by hand the way a bug
(or a site) would break it; read in small pages, so every check runs across page boundaries."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from broker.model.job import JobSpec
from broker.model.records import Placement
from broker.state.audit import Report, Violation, audit, audit_report, site_findings
from broker.state.keys import Keys
from broker.state.store import Store
from common.protocol import Capacity
from suanwang.servers import RedisServer
from tests.support import site_keys

HUB, MODEL = "guizhou", "A100-80G"
PAGE = 3  # smaller than the number of sites and jobs, so the audit reads several pages of each


@pytest.fixture
def store(redis_client: aioredis.Redis, namespace: str) -> Store:
    return Store(redis_client, Keys(namespace))


def capacity(site: str, seq: int, total: int, external: int = 0) -> Capacity:
    return Capacity.model_validate({
        "schema": "suanwang.capacity/1", "site": site, "hub": HUB, "cluster": "guian", "seq": seq,
        "pools": [{"arch": "GPU", "model": MODEL, "memory_gb": 80, "total": total, "in_use_external": external,
                   "per_node": 8, "price_cny_per_hour": 10.0}],
    })  # fmt: skip


def spec(count: int, tenant: str = "acme") -> JobSpec:
    return JobSpec.model_validate({"name": "audit", "resources": {"arch": "GPU", "models": [MODEL], "count": count},
                                   "origin": "guiyang", "duration_hours": 1, "tenant": tenant})  # fmt: skip


async def place(store: Store, job: str, site: str, count: int, tenant: str = "acme") -> None:
    """Submit `job` and allocate it at `site` through the real scripts."""
    await store.submit(job, spec(count, tenant))
    (commit,) = await store.allocate([Placement(job, site, HUB, MODEL, count, 10.0, 5.0)], accept_timeout_ms=60_000)
    assert commit.ok, commit


async def network(store: Store, sites: int = 7, total: int = 8) -> list[str]:
    """`sites` online sites, each with one job holding 4 of its `total` devices, and a queued job per tenant."""
    names = [f"audit-{i:02d}" for i in range(sites)]
    for i, site in enumerate(names):
        assert await store.apply_capacity(capacity(site, 1, total))
        await place(store, f"j-held-{i:02d}", site, 4, tenant=("acme", "initech")[i % 2])
    for tenant in ("acme", "initech"):
        await store.submit(f"j-queued-{tenant}", spec(64, tenant))
    return names


def kinds(found: list[Violation]) -> set[tuple[str, str]]:
    return {(v.kind, v.subject) for v in found}


async def test_a_consistent_network_has_no_findings(store: Store) -> None:
    """Sites, held, queued and parked jobs made by the scripts, read a few at a time: no violation, no warning."""
    await network(store)
    await store.set_reasons({"j-queued-acme": "fits nowhere"}, park=["j-queued-acme"])
    assert await store.redis.zscore(store.keys.only.tenant_parked("acme"), "j-queued-acme") is not None
    report = await audit_report(store, page=PAGE)
    assert report.violations == [] and report.warnings == []


# --------------------------------------------------------------------------- shrink vs over-allocation


async def test_a_site_that_shrank_below_its_allocation_is_a_warning_not_a_violation(store: Store) -> None:
    """The broker takes all 8 devices; the site then reports only 4 (a real capacity message): a warning
    naming the shrink, and no over-allocation, since the broker had 8 usable when it allocated."""
    site = (await network(store, sites=1, total=8))[0]
    await place(store, "j-full", site, 4)
    cap = (await site_keys(store, site)).capacity(site)
    # what reserve.lua saw when it allocated: 8 usable (set here if the script does not record it)
    await store.redis.hsetnx(cap, f"p:{MODEL}", 8)
    assert await store.apply_capacity(capacity(site, 2, total=4))
    assert int(await store.redis.hget(cap, f"t:{MODEL}")) == 4 and int(await store.redis.hget(cap, f"a:{MODEL}")) == 8

    report = await audit_report(store, page=PAGE)
    assert report.violations == []
    assert kinds(report.warnings) == {("site_shrank", f"{site}/{MODEL}")}
    assert "shrank below its allocation" in report.warnings[0].detail
    assert report.warnings[0].severity == "warning"
    assert await audit(store) == []  # what the fault tests and the soak check


async def test_more_allocated_than_the_site_had_at_allocation_is_an_over_allocation(store: Store) -> None:
    """A pool where the broker holds 12 devices though the site had 8 usable when it last allocated there
    (the capacity check bypassed, as a bug would): an error, not a shrink."""
    site = (await network(store, sites=1, total=8))[0]
    cap = (await site_keys(store, site)).capacity(site)
    await store.redis.hset(cap, f"t:{MODEL}", 16)  # the check sees room for a second job ...
    await place(store, "j-over", site, 8)
    await store.redis.hset(cap, mapping={f"t:{MODEL}": 8, f"p:{MODEL}": 8})  # ... the site never had it

    report = await audit_report(store, page=PAGE)
    assert kinds(report.violations) == {("over_allocated", f"{site}/{MODEL}")}
    assert "only 8 usable when the broker last allocated" in report.violations[0].detail
    assert report.warnings == []


async def test_an_over_allocation_without_a_record_of_the_pool_at_allocation_stays_an_error(store: Store) -> None:
    """Without the pool's size at its last allocation nothing shows the site shrank: an error, as before."""
    site = (await network(store, sites=1, total=8))[0]
    await place(store, "j-full", site, 4)
    await store.redis.hdel((await site_keys(store, site)).capacity(site), f"p:{MODEL}")
    assert await store.apply_capacity(capacity(site, 2, total=6, external=1))

    report = await audit_report(store, page=PAGE)
    assert kinds(report.violations) == {("over_allocated", f"{site}/{MODEL}")}
    assert "no record" in report.violations[0].detail and report.warnings == []


@pytest.mark.parametrize(("total", "external", "allocated", "basis", "expected"), [
    (8, 0, 8, None, None),  # full, not over
    (4, 0, 8, 8, "site_shrank"),
    (8, 4, 8, 8, "site_shrank"),  # the site took 4 back for its own use
    (8, 0, 12, 8, "over_allocated"),
    (8, 0, 12, 16, "site_shrank"),  # it had 16 usable at the last allocation, 8 now
    (8, 0, 12, None, "over_allocated"),
])  # fmt: skip
def test_over_allocation_and_shrink_are_told_apart_by_the_pool_at_its_last_allocation(
    total: int, external: int, allocated: int, basis: int | None, expected: str | None
) -> None:
    """The pure rule: more allocated than usable is a shrink when it fits what the pool had when the broker
    last allocated there, else an over-allocation."""
    cap = {f"t:{MODEL}": total, f"x:{MODEL}": external, f"a:{MODEL}": allocated}
    if basis is not None:
        cap[f"p:{MODEL}"] = basis
    entries = {"j1": ("1", MODEL, allocated)}
    owners = {"j1": ("running", "s1", MODEL, allocated, "acme", "1")}
    found, held = site_findings("s1", cap, entries, owners)
    assert [v.kind for v in found] == ([expected] if expected else [])
    assert held == {"acme": allocated}


# --------------------------------------------------------------------------- every check, across pages

Break = tuple[str, str]  # (kind, subject) the audit must report


async def _counter_off(store: Store, sites: list[str]) -> Break:
    await store.redis.hincrby((await site_keys(store, sites[5])).capacity(sites[5]), f"a:{MODEL}", 1)
    return "allocation_mismatch", f"{sites[5]}/{MODEL}"


async def _left_its_site(store: Store, sites: list[str]) -> Break:
    """The job still holds its devices there, but its site's ledger no longer has it (nor counts its 4)."""
    k = await site_keys(store, sites[4])
    await store.redis.hdel(k.held(sites[4]), "j-held-04")
    await store.redis.hincrby(k.capacity(sites[4]), f"a:{MODEL}", -4)
    return "placement", "j-held-04"


async def _held_twice(store: Store, sites: list[str]) -> Break:
    """A second site's ledger counts the job's devices too (held at sites[1])."""
    k = await site_keys(store, sites[6])
    await store.redis.hset(k.held(sites[6]), "j-held-01", f"1 {MODEL} 4 99")
    await store.redis.hincrby(k.capacity(sites[6]), f"a:{MODEL}", 4)
    return "placement", "j-held-01"


async def _assigned_yet_queued(store: Store, sites: list[str]) -> Break:
    await store.redis.zadd(store.keys.only.queue, {"j-held-02": 1})
    return "queue", "j-held-02"


async def _queued_not_in_queue(store: Store, sites: list[str]) -> Break:
    await store.redis.zrem(store.keys.only.tenant_queue("initech"), "j-queued-initech")
    return "queue", "j-queued-initech"


async def _parked_and_in_window(store: Store, sites: list[str]) -> Break:
    await store.redis.zadd(store.keys.only.tenant_parked("initech"), {"j-queued-initech": 0})
    return "queue", "j-queued-initech"


async def _queue_count_off(store: Store, sites: list[str]) -> Break:
    await store.redis.zincrby(store.keys.only.queued_tenants, 2, "acme")
    return "queue_count", "acme"


async def _usage_off(store: Store, sites: list[str]) -> Break:
    await store.redis.hincrby(store.keys.only.tenant_usage, "initech", -4)
    return "tenant_usage", "initech"


async def _state_without_event(store: Store, sites: list[str]) -> Break:
    await store.redis.hset(store.keys.only.job("j-queued-acme"), "state", "failed")
    return "event_log", "j-queued-acme"


async def _queued_ghost(store: Store, sites: list[str]) -> Break:
    await store.redis.zadd(store.keys.only.queue, {"j-ghost": 5})
    return "unknown_job", "j-ghost"


@pytest.mark.parametrize("corrupt", [_counter_off, _left_its_site, _held_twice, _assigned_yet_queued,
                                     _queued_not_in_queue, _parked_and_in_window, _queue_count_off, _usage_off,
                                     _state_without_event, _queued_ghost])  # fmt: skip
async def test_each_broken_invariant_is_found_whatever_page_it_is_on(store: Store, corrupt) -> None:
    """One invariant broken by hand on a network larger than a page is reported, as an error."""
    sites = await network(store)
    expected = await corrupt(store, sites)
    report = await audit_report(store, page=PAGE)
    assert expected in kinds(report.violations), report
    assert all(v.severity == "error" for v in report.violations) and report.warnings == []


# --------------------------------------------------------------------------- a live system


async def test_a_busy_system_audits_clean(own_redis: RedisServer, namespace: str) -> None:
    """Jobs placed, moved and ended while the audit reads page by page: what a page catches mid-change is read
    again consistently, so no violation is reported."""
    client = aioredis.Redis.from_url(own_redis.url)
    store = Store(client, Keys(namespace))
    sites = await network(store, sites=6, total=64)
    stop = asyncio.Event()
    churned = 0

    async def churn() -> None:
        nonlocal churned
        while not stop.is_set():
            job, site = f"j-churn-{churned}", sites[churned % len(sites)]
            await place(store, job, site, 2, tenant=("acme", "initech")[churned % 2])
            await store.transition(job, "rejected", site, 1)  # back to the queue, then elsewhere
            await place_again(store, job, sites[(churned + 3) % len(sites)])
            await store.transition(job, "completed", sites[(churned + 3) % len(sites)], 2)
            churned += 1

    task = asyncio.create_task(churn())
    try:
        reports = [await audit_report(store, page=10) for _ in range(5)]
    finally:
        stop.set()
        await asyncio.gather(task, return_exceptions=True)
    try:
        assert churned > 10, "the churn did not overlap the audits"
        assert [v for r in reports for v in r.violations] == []
        assert await audit_report(store, page=10) == Report()
    finally:
        await client.aclose()


async def place_again(store: Store, job: str, site: str) -> None:
    (commit,) = await store.allocate([Placement(job, site, HUB, MODEL, 2, 10.0, 5.0)], accept_timeout_ms=60_000)
    assert commit.ok, commit
