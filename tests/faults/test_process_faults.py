"""Processes killed with SIGKILL mid-load: a broker replica, a hub's simulated-site process."""

from __future__ import annotations

import asyncio
import time

import pytest

from broker.state.store import Store
from suanwang.soak import Client, Cluster, Wire
from tests.faults.helpers import LOAD_RATE, assert_recovered, bodies

# on a Redis of its own and on the three-master Redis Cluster (tests/faults/conftest.py `fault_redis`)
pytestmark = [pytest.mark.timeout(120), pytest.mark.parametrize("redis_kind", ["redis", "cluster"])]


async def test_broker_killed_mid_load_and_restarted_loses_nothing(cluster: Cluster, store: Store) -> None:
    """kill -9 of one replica while jobs pour in: the other serves, the restarted one rejoins, nothing leaks."""
    client = Client(cluster.urls)
    load = asyncio.create_task(client.load(bodies(), LOAD_RATE))
    await asyncio.sleep(3)
    cluster.procs["broker-0"].kill()
    await asyncio.sleep(2)
    cluster.procs["broker-0"].start()
    await load
    await cluster.ready()
    await assert_recovered(store, client)


async def _busiest_hub(cluster: Cluster, store: Store) -> tuple[str, dict[str, int]]:
    """The hub holding the most jobs now, and those jobs with their attempts."""
    best: tuple[str, dict[str, int]] = (cluster.hubs[0], {})
    for hub in cluster.hubs:
        jobs = [job for site in cluster.sites(hub) for job in await store.jobs_at(site)]
        rows = await store.get_jobs(jobs, "attempt")
        held = {job: int(attempt or 0) for job, (attempt,) in zip(jobs, rows, strict=True)}
        if len(held) > len(best[1]):
            best = (hub, held)
    return best


async def test_site_process_killed_gives_its_jobs_back_and_is_reconciled(
    cluster: Cluster, store: Store, wire: Wire
) -> None:
    """kill -9 of a hub's sites: their Last Will requeues every job they held, the jobs finish elsewhere, and
    the restarted sites are told (reconcile) which jobs are theirs, running nothing stale."""
    client = Client(cluster.urls)
    load = asyncio.create_task(client.load(bodies(), LOAD_RATE))
    await asyncio.sleep(4)
    hub, held = await _busiest_hub(cluster, store)
    assert held, "no site held any job four seconds into the load"
    sites = set(cluster.sites(hub))
    killed = cluster.procs[f"sim-{hub}"].kill()

    async with asyncio.timeout(10):  # the Last Will is published as soon as the connections drop
        while True:
            rows = await store.get_jobs(list(held), "state", "site")
            if not [state for state, site in rows if site in sites and state in ("assigned", "running")]:
                break
            await asyncio.sleep(0.1)
    requeued_s = time.time() - killed

    await asyncio.sleep(1)
    restarted = time.time()
    cluster.procs[f"sim-{hub}"].start()
    await load
    await cluster.ready()
    await assert_recovered(store, client)

    assert requeued_s < cluster.site_ttl_s + 2, f"jobs of the killed sites went back only after {requeued_s:.1f}s"
    for job, attempt in held.items():
        history = await store.history(job)
        ends = [e for e in history if e.get("attempt") == attempt and e["event"] in ("completed", "requeued", "failed")]
        assert ends, (job, history)
        if ends[0]["event"] == "requeued":
            assert "went offline" in (ends[0].get("reason") or ""), ends[0]
    reconciled = {site for at, site, _ in wire.reconciles if at >= restarted}
    assert sites <= reconciled, f"restarted sites never reconciled: {sorted(sites - reconciled)}"
    stale = [(at, event) for at, event in wire.events
             if at >= restarted and event["site"] in sites and held.get(event["job"]) == event["attempt"]]  # fmt: skip
    assert not stale, f"restarted sites reported stale work: {stale[:5]}"


async def test_site_that_stops_heartbeating_gives_its_jobs_back(cluster: Cluster, store: Store) -> None:
    """A hub's site process frozen (SIGSTOP) past the site TTL, its connections still open: the heartbeat check
    requeues its jobs, they finish elsewhere, and when it wakes its stale work changes nothing."""
    client = Client(cluster.urls)
    load = asyncio.create_task(client.load(bodies(), LOAD_RATE))
    await asyncio.sleep(4)
    hub, held = await _busiest_hub(cluster, store)
    assert held, "no site held any job four seconds into the load"
    sim = cluster.procs[f"sim-{hub}"]
    sim.freeze()
    frozen = time.monotonic()

    async def still_held() -> list[str]:
        rows = await store.get_jobs(list(held), "state", "site")
        return [job for job, (state, site) in zip(held, rows, strict=True)
                if state in ("assigned", "running") and site in cluster.sites(hub)]  # fmt: skip

    try:
        await asyncio.sleep(cluster.site_ttl_s)  # nothing can move before the TTL
        still = await still_held()
        while still and time.monotonic() - frozen < cluster.site_ttl_s + 10:  # then the sweeper's next passes
            await asyncio.sleep(0.2)
            still = await still_held()
    finally:
        sim.freeze(False)
    assert not still, f"{len(still)} jobs still held by sites silent for {time.monotonic() - frozen:.1f}s"
    await load
    await cluster.ready()
    await assert_recovered(store, client)
    for job, attempt in held.items():
        history = await store.history(job)
        ends = [e for e in history if e.get("attempt") == attempt and e["event"] in ("completed", "requeued", "failed")]
        if ends and ends[0]["event"] == "requeued":
            # by the heartbeat check, or (an assignment the site froze before accepting, whose accept deadline
            # came first) by the accept timeout: either way the broker took it back from the silent site
            reason = ends[0].get("reason") or ""
            assert "stopped sending heartbeats" in reason or "did not accept the assignment" in reason, ends[0]
