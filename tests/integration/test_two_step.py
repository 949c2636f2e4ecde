"""The two-step protocol across the site and job shards (broker.state.ledger), with a broker that stops
between its steps: a real redis-server, each step run by hand as the store would, then the sweeper."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from broker.model.records import Placement
from broker.state.audit import audit
from broker.state.keys import Keys
from broker.state.ledger import GONE_MS, LEASE_MS, MARGIN_MS, MERGE_WAIT_MS, OUTBOX_AGE_MS, Reserved
from broker.state.store import Store
from tests.integration.test_holds import option
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
        keys=store.transition_keys("j1"),
        args=["j1", "completed", SITE, "1", "", "", store.events_maxlen, store.max_attempts, ""])  # fmt: skip
    assert reply[0] == b"completed"
    assert (await counters(store))[f"a:{MODEL}"] == 8, "the devices come back only with the second step"
    assert await audit(store) == [], "a step in the outbox is on its way, not a finding"
    now = await store.clock_ms()
    assert (await store.sweep_ledger(now))["steps"] == 0, "a fresh step is the broker's own to do"
    moved = await store.sweep_ledger(now + OUTBOX_AGE_MS + 1)
    assert moved["steps"] == 1
    assert (await counters(store))[f"a:{MODEL}"] == 0 and await ledger(store, SITE) == {}
    assert await store.redis.zcard(k.only.outbox) == 0
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


async def test_a_merge_waits_for_a_missing_source_only_so_long_then_goes_on_and_the_late_source_comes_free(
    store: Store,
) -> None:
    """A merge step whose source never comes (the step that was to bring it lost with a hub shard's unreplicated
    writes) waits in the outbox, redone by every sweep, only `MERGE_WAIT_MS`: then it goes on with the source
    that is there and buries the missing one, and a step that brings that one after all gives its devices back."""
    await store.apply_capacity(capacity(1, {MODEL: (8, 0)}))
    hub = (await site_keys(store, SITE)).hub_id
    a, v = await store.run_scripts([store.reserve_call(hub, "hold:a", 0, [(SITE, MODEL, 4)]),
                                    store.reserve_call(hub, "v", 1, [(SITE, MODEL, 4)])])  # fmt: skip
    assert isinstance(a, list) and isinstance(v, list)
    await store.run_scripts([store.ledger_call(hub, "settle", SITE, "hold:a", 0),
                             store.ledger_call(hub, "settle", SITE, "v", 1)])  # fmt: skip
    now = await store.clock_ms()
    step = "\t".join(["merge", hub, SITE, "j", "1", "4", "hold:a", "0", "hold:b", "0"])
    await store.redis.zadd(store.keys.only.outbox, {step: now})
    assert (await store.sweep_ledger(now + OUTBOX_AGE_MS + 1))["steps"] == 0, "hold:b may still come"
    assert set(await ledger(store, SITE)) == {"hold:a", "v"} and await store.redis.zcard(store.keys.only.outbox) == 1
    assert (await store.sweep_ledger(now + MERGE_WAIT_MS + 1))["steps"] == 1
    assert await store.redis.zcard(store.keys.only.outbox) == 0
    held = await ledger(store, SITE)
    assert set(held) == {"j", "v"} and held["j"][0] == 1 and held["j"][2] == 4
    assert (await counters(store))[f"a:{MODEL}"] == 8
    # the step that was to bring hold:b comes after all: v's devices come free instead of passing to hold:b
    (late,) = await store.run_scripts([store.ledger_call(hub, "merge", SITE, "hold:b", 0, 4, "v", 1)])
    assert int(late) == 0
    assert set(await ledger(store, SITE)) == {"j"} and (await counters(store))[f"a:{MODEL}"] == 4


async def test_a_batch_of_transitions_costs_two_round_trips_and_its_outbox_entries_go_with_the_next(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Jobs ending: their transitions on the job shard, then their releases on the site shard; the releases'
    outbox entries are removed with the store's next round trip instead of one of their own."""
    await store.apply_capacity(capacity(1, {MODEL: (8, 0)}))
    for job in ("j1", "j2"):
        await store.submit(job, spec(count=4), at_ms=T0)
    commits = await store.allocate([placement("j1", count=4), placement("j2", count=4)], 30_000)
    assert [c.attempt for c in commits] == [1, 1]
    hub = (await site_keys(store, SITE)).hub_id
    await store.transition("none", "completed")  # the scripts loaded: round trips of the steady state counted
    await store.run_scripts([store.ledger_call(hub, "settle", SITE, "none", 1)])
    sent: list[str] = []
    real_pipeline, real_command = store.redis.pipeline, store.redis.execute_command

    def pipeline(*args: object, **kwargs: object) -> object:
        pipe = real_pipeline(*args, **kwargs)  # type: ignore[arg-type]
        execute = pipe.execute

        async def counted(*a: object, **kw: object) -> object:
            sent.append("pipeline")
            return await execute(*a, **kw)  # type: ignore[arg-type]

        pipe.execute = counted  # type: ignore[method-assign]
        return pipe

    async def command(*args: object, **kwargs: object) -> object:
        sent.append(str(args[0]))
        return await real_command(*args, **kwargs)

    monkeypatch.setattr(store.redis, "pipeline", pipeline)
    monkeypatch.setattr(store.redis, "execute_command", command)
    states = await store.transitions([("j1", "completed", SITE, 1, ""), ("j2", "completed", SITE, 1, "")])
    assert states == ["completed", "completed"]
    assert len(sent) == 2, f"round trips: {sent}"
    assert (await counters(store))[f"a:{MODEL}"] == 0 and await ledger(store, SITE) == {}
    assert await store.redis.zcard(store.keys.only.outbox) == 2, "done, their entries not yet removed"
    await store.transitions([("j1", "completed", SITE, 1, "")])  # any next round trip carries the removal
    assert await store.redis.zcard(store.keys.only.outbox) == 0 and store.steps_done == []


async def test_a_job_bound_through_a_hold_at_an_attempt_a_stopped_try_had_reserved_gets_the_holds_devices(
    store: Store,
) -> None:
    """A try reserved devices for the job's first attempt and stopped; the sweeper released them after the lease.
    The job is then placed on a hold at the same site, which makes it that same first attempt: the hold's devices
    pass to it (a released reservation is no tombstone: the attempt was never bound, and its number is used
    again)."""
    await store.apply_capacity(capacity(1, {MODEL: (8, 0)}))
    job = spec(count=4)
    await store.submit("j1", job, at_ms=T0)
    assert isinstance(await _reserve(store, "j1", count=4), list)
    await store.sweep_ledger(await store.clock_ms() + LEASE_MS + MARGIN_MS + 1)
    assert await ledger(store, SITE) == {}, "the stopped try's reservation given back"
    taken = await store.take_hold("h1", "default", [option(count=4)], 60_000, job.placement_hash())
    assert taken.hold is not None
    p = placement("j1", count=4)
    (commit,) = await store.allocate([Placement(p.job, p.site, p.hub, p.model, p.count, p.price, p.latency_ms,
                                                hold="h1")], 30_000)  # fmt: skip
    assert commit.ok and commit.attempt == 1
    assert {owner: entry[:3] for owner, entry in (await ledger(store, SITE)).items()} == {"j1": (1, MODEL, 4)}
    assert (await counters(store))[f"a:{MODEL}"] == 4
    assert await audit(store) == []
