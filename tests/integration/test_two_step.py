"""The two-step protocol across the site and job shards (broker.state.ledger), with a broker that stops
between its steps: a real redis-server, each step run by hand as the store would, then the sweeper."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from broker.state.audit import audit
from broker.state.keys import Keys
from broker.state.ledger import GONE_MS, LEASE_MS, MARGIN_MS, OUTBOX_AGE_MS, Reserved
from broker.state.store import Store
from tests.integration.test_store import MODEL, SITE, T0, capacity, counters, placement, spec
from tests.support import ledger, site_keys


@pytest.fixture
def store(redis_client: aioredis.Redis, namespace: str) -> Store:
    return Store(redis_client, Keys(namespace))


async def _reserve(store: Store, job: str, count: int = 8, call: str = "call-1") -> list[int] | int:
    """Step one alone, as call `call`: the devices reserved for the job's first attempt, as a broker stopped after
    it left them (or the refusal)."""
    hub = await store.hub_of(SITE)
    assert hub is not None
    (reply,) = await store.run_scripts([store.reserve_call(hub, job, 1, [(SITE, MODEL, count)], call=call)])
    return [int(v) for v in reply] if isinstance(reply, list) else int(reply)


async def test_a_reservation_never_bound_is_released_by_the_sweeper_once_its_lease_is_over(store: Store) -> None:
    await store.apply_capacity(capacity(1, {MODEL: (8, 0)}))
    await store.submit("j1", spec(count=8), at_ms=T0)
    _choice, _seq, lease_end = await _reserve(store, "j1")  # type: ignore[misc]
    assert (await counters(store))[f"a:{MODEL}"] == 8 and "j1" in await ledger(store, SITE)
    # on its lease it is on its way: the sweeper leaves it, the audit does not report it
    assert (await store.sweep_ledger(lease_end))["released"] == 0
    assert await audit(store) == []
    moved = await store.sweep_ledger(lease_end + MARGIN_MS + 1)
    assert moved["released"] == 1
    assert (await counters(store))[f"a:{MODEL}"] == 0 and await ledger(store, SITE) == {}
    assert (await store.get_job("j1") or {})["state"] == "queued"
    assert await audit(store) == []


async def test_a_binding_after_the_lease_is_refused_so_the_sweepers_read_cannot_go_stale(store: Store) -> None:
    await store.apply_capacity(capacity(1, {MODEL: (8, 0)}))
    await store.submit("j1", spec(count=8), at_ms=T0)
    choice, seq, lease_end = await _reserve(store, "j1")  # type: ignore[misc]
    p = placement("j1")
    over = Reserved(choice, seq, lease_end - LEASE_MS - 1)  # the lease as it stood, already over
    late = store._bind_call(p, (p.site, p.hub, p.model, p.count, p.price, p.latency_ms, p.arch), 30_000, 1, over)
    (reply,) = await store.run_scripts([late])
    assert int(reply) == -7
    assert (await store.get_job("j1") or {})["state"] == "queued"


async def test_the_same_reservation_asked_twice_takes_the_devices_once(store: Store) -> None:
    await store.apply_capacity(capacity(1, {MODEL: (8, 0)}))
    await store.submit("j1", spec(count=8), at_ms=T0)
    first = await _reserve(store, "j1")
    assert await _reserve(store, "j1") == first  # a reply lost, the step sent again
    assert (await counters(store))[f"a:{MODEL}"] == 8


async def test_a_reservation_has_one_binder_so_a_refused_bind_never_releases_anothers_devices(store: Store) -> None:
    """Two replicas place the same job at the same attempt and pool (one slow past its claim): the second's
    reservation is refused, not shared, so it neither binds nor releases. Were it given the first's, its bind
    would be refused (the job no longer queued) and its release would take the first's bound devices away."""
    await store.apply_capacity(capacity(1, {MODEL: (16, 0)}))
    await store.submit("j1", spec(count=8), at_ms=T0)
    choice, seq, lease_end = await _reserve(store, "j1", call="replica-a")  # type: ignore[misc]
    p = placement("j1")
    pool = (p.site, p.hub, p.model, p.count, p.price, p.latency_ms, p.arch)
    (bound,) = await store.run_scripts([store._bind_call(p, pool, 30_000, 1, Reserved(choice, seq, lease_end))])
    assert int(bound) == 1, "replica a bound it (and stopped before settling)"
    assert await _reserve(store, "j1", call="replica-b") == -8, "replica b is refused the reservation"
    assert (await ledger(store, SITE))["j1"][:3] == (1, MODEL, 8) and (await counters(store))[f"a:{MODEL}"] == 8
    assert (await store.get_job("j1") or {})["state"] == "assigned"


async def test_a_release_left_in_the_outbox_is_done_by_the_sweeper(store: Store) -> None:
    await store.apply_capacity(capacity(1, {MODEL: (8, 0)}))
    await store.submit("j1", spec(count=8), at_ms=T0)
    (commit,) = await store.allocate([placement("j1")], 30_000)
    assert commit.attempt == 1
    # the job shard's step alone, as a broker that stopped before the site shard's step would leave it
    k = store.keys
    reply = await store._transition(
        keys=[k.job("j1"), k.queue, k.assigned, k.events, k.sites, k.clock, k.prefix + ":", k.queued_tenants,
              k.tenant_usage, k.deadlines, k.job_history("j1"), k.queue_depth, k.usage],
        args=["j1", "completed", SITE, "1", "", "", store.events_maxlen, store.max_attempts, ""])  # fmt: skip
    assert reply[0] == b"completed"
    assert (await counters(store))[f"a:{MODEL}"] == 8, "the devices come back only with the second step"
    assert await audit(store) == [], "a step in the outbox is on its way, not a finding"
    now = await store.clock_ms()
    assert (await store.sweep_ledger(now))["steps"] == 0, "a fresh step is the broker's own to do"
    moved = await store.sweep_ledger(now + OUTBOX_AGE_MS + 1)
    assert moved["steps"] == 1
    assert (await counters(store))[f"a:{MODEL}"] == 0 and await ledger(store, SITE) == {}
    assert await store.redis.zcard(k.outbox) == 0
    # done again (a sweeper that stopped before removing the entry): nothing changes
    hub = (await site_keys(store, SITE)).hub_id
    (again,) = await store.run_scripts([store.ledger_call(hub, "release", SITE, "j1", 1)])
    assert int(again) == 0 and (await counters(store))[f"a:{MODEL}"] == 0
    assert await audit(store) == []


async def test_a_release_ahead_of_its_merge_leaves_a_tombstone_the_merge_obeys_and_the_sweeper_forgets(
    store: Store,
) -> None:
    """A hold's release done before the merge that would give it devices (a preemption's victims' merge left in the
    outbox): the release finds nothing and buries the hold; the merge, when it comes, gives the victim's devices
    back instead of making an entry for a hold that has ended. An hour on, the sweeper forgets the tombstone."""
    await store.apply_capacity(capacity(1, {MODEL: (8, 0)}))
    await store.submit("v", spec(count=8), at_ms=T0)
    (commit,) = await store.allocate([placement("v")], 30_000)
    assert commit.attempt == 1
    hub = (await site_keys(store, SITE)).hub_id
    (released,) = await store.run_scripts([store.ledger_call(hub, "release", SITE, "hold:p1", 0)])
    assert int(released) == 0
    (merged,) = await store.run_scripts([store.ledger_call(hub, "merge", SITE, "hold:p1", 0, 8, "v", 1)])
    assert int(merged) == 0
    assert await ledger(store, SITE) == {} and (await counters(store))[f"a:{MODEL}"] == 0
    gone = store.keys.hub(hub).prefix + ":gone"
    assert await store.redis.hlen(gone) == 2  # the hold, and the victim whose devices came back
    await store.sweep_ledger(await store.clock_ms() + GONE_MS + 1)
    assert await store.redis.hlen(gone) == 0
