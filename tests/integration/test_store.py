"""The Redis store against a real redis-server: capacity, allocation, the job lifecycle and the event stream."""

from __future__ import annotations

import asyncio
from typing import cast

import orjson
import pytest
import redis.asyncio as aioredis

from broker.model.job import JobSpec
from broker.model.records import Commit, Placement, Refusal
from broker.sites.lifecycle import requeue_site
from broker.state.keys import Keys
from broker.state.store import Store, queue_score
from common.protocol import ASSIGNMENTS_SCHEMA, Capacity
from tests.support import ledger, site_keys

SITE = "guian-01"
MODEL = "A100-80G"
T0 = 1_700_000_000_000  # a fixed submission time, so queue scores are known


@pytest.fixture
def store(redis_client: aioredis.Redis, namespace: str) -> Store:
    return Store(redis_client, Keys(namespace))


# --------------------------------------------------------------------------- helpers


def outcomes(commits: list[Commit]) -> list[int | str]:
    """Each commit as its attempt number, or its refusal's name."""
    return [c.attempt if c.refusal is None else c.refusal.value for c in commits]


def capacity(seq: int, pools: dict[str, tuple[int, int]], site: str = SITE) -> Capacity:
    """A capacity message for `site` with pools given as model -> (total, in_use_external)."""
    return Capacity.model_validate({
        "schema": "suanwang.capacity/1", "site": site, "hub": "guizhou", "cluster": "guian", "seq": seq,
        "pools": [{"arch": "GPU", "model": model, "memory_gb": 80, "total": total, "in_use_external": external,
                   "per_node": 8, "price_cny_per_hour": 12.5} for model, (total, external) in pools.items()],
    })  # fmt: skip


def spec(priority: str = "normal", count: int = 8) -> JobSpec:
    return JobSpec.model_validate({
        "name": "finetune", "resources": {"arch": "GPU", "models": [MODEL], "count": count},
        "origin": "shanghai", "duration_hours": 1, "priority": priority,
    })  # fmt: skip


def placement(job: str, count: int = 8, site: str = SITE, model: str = MODEL) -> Placement:
    return Placement(job=job, site=site, hub="guizhou", model=model, count=count, price=12.5, latency_ms=24.0)


async def counters(store: Store, site: str = SITE) -> dict[str, int]:
    hub = await store.hub_of(site)
    if hub is None:
        return {}
    raw = cast(dict[bytes, bytes], await store.redis.hgetall(store.keys.hub(hub).capacity(site)))
    return {k.decode(): int(v) for k, v in raw.items()}


async def events(store: Store) -> list[dict[str, str]]:
    """The event stream, oldest first, as decoded field maps."""
    rows = cast(list[tuple[bytes, dict[bytes, bytes]]], await store.redis.xrange(store.keys.only.events))
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in rows]


async def event_types(store: Store) -> list[str]:
    return [e["type"] for e in await events(store)]


async def state(store: Store, job: str) -> str:
    found = await store.get_job(job)
    assert found is not None
    return found["state"]


async def site_with_job(store: Store, job: str = "j1", total: int = 100, count: int = 8) -> int:
    """An online site with one pool and `job` allocated on it; returns the attempt."""
    assert await store.apply_capacity(capacity(1, {MODEL: (total, 0)}))
    await store.submit(job, spec(count=count), at_ms=T0)
    (commit,) = await store.allocate([placement(job, count)], accept_timeout_ms=60_000)
    assert commit.ok and commit.attempt == 1 and commit.seq >= 1
    return commit.attempt


# --------------------------------------------------------------------------- capacity


@pytest.mark.parametrize(("second_seq", "applied"), [(6, True), (5, False), (4, False), (0, False)])
async def test_capacity_applies_only_newer_seq(store, second_seq, applied):
    """A capacity message is applied only when its seq is above the last applied; equal or older ones are dropped."""
    assert await store.apply_capacity(capacity(5, {MODEL: (100, 10)})) == 1
    assert bool(await store.apply_capacity(capacity(second_seq, {MODEL: (40, 2)}))) is applied
    expected = {f"t:{MODEL}": 40, f"x:{MODEL}": 2} if applied else {f"t:{MODEL}": 100, f"x:{MODEL}": 10}
    assert await counters(store) == expected
    site = await store.redis.hgetall((await site_keys(store, SITE)).site(SITE))
    assert int(site[b"seq"]) == (second_seq if applied else 5)


async def test_first_capacity_registers_the_site_online(store):
    """The first capacity message (seq 0 allowed) makes the site known, online, and listed as changed."""
    assert await store.apply_capacity(capacity(0, {MODEL: (16, 0)}), at_ms=T0)
    (record,) = await store.load_sites([SITE])
    assert (record.hub, record.cluster, record.status, record.seen_ms) == ("guizhou", "guian", "online", T0)
    assert record.meta is not None and [p["model"] for p in record.meta["pools"]] == [MODEL]
    assert "total" not in record.meta["pools"][0]
    assert [site for site, _ in await store.changed_sites(0)] == [SITE]


async def test_capacity_message_never_erases_allocations(store):
    """A new capacity message with the same total keeps a: at what the broker allocated."""
    await site_with_job(store, total=100, count=8)
    assert await store.apply_capacity(capacity(2, {MODEL: (100, 30)}))
    c = await counters(store)
    assert c[f"a:{MODEL}"] == 8
    assert c[f"t:{MODEL}"] - c[f"x:{MODEL}"] - c[f"a:{MODEL}"] == 100 - 30 - 8


async def test_removed_pool_keeps_its_allocation_until_released(store):
    """A pool missing from a message drops to total 0 but keeps a:, and the job's completion brings a: back to 0."""
    await site_with_job(store, total=100, count=8)
    assert await store.apply_capacity(capacity(2, {"H800": (32, 0)}))
    c = await counters(store)
    assert (c[f"t:{MODEL}"], c[f"a:{MODEL}"], c["t:H800"]) == (0, 8, 32)
    assert await store.transition("j1", "completed", SITE, 1) == "completed"
    c = await counters(store)
    assert (c[f"t:{MODEL}"], c[f"a:{MODEL}"], c["t:H800"]) == (0, 0, 32)


# --------------------------------------------------------------------------- allocation


async def test_allocate_commits_the_placement(store):
    """A successful allocation marks the job assigned with its placement and moves it from the queue to the site."""
    await site_with_job(store, total=100, count=8)
    job = await store.get_job("j1")
    assert job is not None
    assert (job["state"], job["site"], job["model"], job["count"], job["attempt"]) == ("assigned", SITE, MODEL, "8",
                                                                                       "1")  # fmt: skip
    assert await store.queued(0, 10) == []
    assert await store.jobs_at(SITE) == ["j1"]
    assert (await counters(store))[f"a:{MODEL}"] == 8
    assert await store.redis.zscore(store.keys.only.assigned, "j1") is not None


async def test_placements_in_one_call_see_each_others_allocation(store):
    """Placements committed in one call are applied in order, so the second sees what the first took."""
    assert await store.apply_capacity(capacity(1, {MODEL: (10, 0)}))
    for job in ("j1", "j2", "j3"):
        await store.submit(job, spec(count=4), at_ms=T0)
    assert outcomes(await store.allocate([placement(j, 4) for j in ("j1", "j2", "j3")], 60_000)) == [1, 1, "stale_view"]
    assert (await counters(store))[f"a:{MODEL}"] == 8


async def _too_little_free(store: Store) -> None:
    await store.apply_capacity(capacity(1, {MODEL: (16, 9)}))
    await store.submit("j1", spec(count=8), at_ms=T0)


async def _not_queued(store: Store) -> None:
    await store.apply_capacity(capacity(1, {MODEL: (100, 0)}))
    await store.submit("j1", spec(count=8), at_ms=T0)
    assert await store.transition("j1", "cancel") == "cancelled"


async def _offline_site(store: Store) -> None:
    await store.apply_capacity(capacity(1, {MODEL: (100, 0)}))
    await store.submit("j1", spec(count=8), at_ms=T0)
    assert await store.set_site_status(SITE, "offline")


async def _unknown_site(store: Store) -> None:
    await store.submit("j1", spec(count=8), at_ms=T0)


@pytest.mark.parametrize(
    ("setup", "refusal", "job_state"),
    [(_too_little_free, "stale_view", "queued"), (_not_queued, "not_queued", "cancelled"),
     (_offline_site, "site_not_online", "queued"), (_unknown_site, "site_not_online", "queued")],
    ids=["too-little-free", "not-queued", "offline-site", "unknown-site"],
)  # fmt: skip
async def test_allocate_refuses_and_changes_nothing(store, setup, refusal, job_state):
    """A refused allocation says why (too little free, not queued, site not online) and leaves every key as it was:
    a reservation the job shard refuses (not queued) is released, its devices free again and no ledger entry left
    (only p:, what the pool could hold at the reservation, and a: at 0 may now be written)."""

    async def free() -> dict[str, int]:
        c = await counters(store)
        return {k: v for k, v in c.items() if not k.startswith("p:") and not (k.startswith("a:") and v == 0)}

    await setup(store)
    before = (await free(), await event_types(store), await store.queued(0, 10))
    assert outcomes(await store.allocate([placement("j1", 8)], 60_000)) == [refusal]
    assert (await free(), await event_types(store), await store.queued(0, 10)) == before
    assert await state(store, "j1") == job_state
    assert await store.jobs_at(SITE) == []
    assert await ledger(store, SITE) == {}


async def _overbooking_race(store: Store) -> None:
    assert await store.apply_capacity(capacity(1, {MODEL: (100, 0)}))
    jobs = [f"j{i}" for i in range(200)]
    for job in jobs:
        await store.submit(job, spec(count=3), at_ms=T0)
    results = await asyncio.gather(*(store.allocate([placement(job, 3)], 60_000) for job in jobs))
    won = [job for job, (r,) in zip(jobs, results, strict=True) if r.attempt == 1]
    assert [r.refusal for (r,) in results if not r.ok] == [Refusal.STALE_VIEW] * 167
    assert len(won) == 33
    assert (await counters(store))[f"a:{MODEL}"] == 99
    assert sorted(await store.jobs_at(SITE)) == sorted(won)
    assert await store.queue_length() == 167
    assert (await event_types(store)).count("allocated") == 33


async def test_concurrent_allocations_never_overbook(redis_server, namespace):
    """200 concurrent allocations of 3 devices against 100 free: exactly 33 succeed and a: ends at 99."""
    # A client whose pool holds all 200 calls in flight at once, so the race is on the server.
    client = aioredis.Redis.from_url(redis_server.url, max_connections=256)
    try:
        await _overbooking_race(Store(client, Keys(namespace)))
    finally:
        await client.aclose()


async def test_store_from_url_absorbs_a_burst_of_concurrent_calls(redis_server, namespace):
    """The store the service builds with from_url serves 200 concurrent calls instead of failing past its pool size."""
    store = Store.from_url(redis_server.url, namespace)
    try:
        await _overbooking_race(store)
    finally:
        await store.close()


# --------------------------------------------------------------------------- lifecycle


async def test_full_lifecycle_releases_capacity_exactly_once(store):
    """accepted -> running -> completed frees the devices once; a duplicate completed returns '' and changes nothing."""
    attempt = await site_with_job(store, total=100, count=8)
    assert await store.transition("j1", "accepted", SITE, attempt) == "assigned"
    assert await store.redis.zscore(store.keys.only.assigned, "j1") is None
    assert await store.transition("j1", "running", SITE, attempt) == "running"
    assert await state(store, "j1") == "running"
    assert (await counters(store))[f"a:{MODEL}"] == 8
    assert await store.transition("j1", "completed", SITE, attempt) == "completed"
    assert (await counters(store))[f"a:{MODEL}"] == 0
    assert await store.jobs_at(SITE) == []
    types = await event_types(store)
    assert types == ["queued", "allocated", "accepted", "running", "released", "completed"]

    assert await store.transition("j1", "completed", SITE, attempt) == ""
    assert await store.transition("j1", "failed", SITE, attempt) == ""
    assert (await counters(store))[f"a:{MODEL}"] == 0
    assert await event_types(store) == types
    assert await state(store, "j1") == "completed"


async def test_events_carry_the_job_and_placement(store):
    """The allocated and released events name the job, site, model, count and attempt."""
    await site_with_job(store, total=100, count=8)
    await store.transition("j1", "failed", SITE, 1, "disk full")
    allocated, released, failed = (await events(store))[1:]
    for e in (allocated, released):
        assert (e["job"], e["site"], e["model"], e["count"], e["attempt"]) == ("j1", SITE, MODEL, "8", "1")
    assert (failed["type"], failed["state"], failed["reason"]) == ("failed", "failed", "disk full")


@pytest.mark.parametrize(
    ("site", "attempt"),
    [("other-site", 1), (SITE, 2), (SITE, 0), ("other-site", "")],
    ids=["wrong-site", "later-attempt", "earlier-attempt", "wrong-site-any-attempt"],
)
@pytest.mark.parametrize("action", ["accepted", "running", "completed", "failed", "rejected", "cancel"])
async def test_transition_for_wrong_site_or_attempt_changes_nothing(store, site, attempt, action):
    """An event from another site or another attempt returns '' and changes neither job, capacity nor stream."""
    await site_with_job(store, total=100, count=8)
    before = (await store.get_job("j1"), await counters(store), await event_types(store))
    assert await store.transition("j1", action, site, attempt) == ""
    assert (await store.get_job("j1"), await counters(store), await event_types(store)) == before


async def test_rejected_returns_the_job_to_its_place_in_the_queue(store):
    """A rejected job is queued again with its original queue score, capacity freed and placement cleared."""
    assert await store.apply_capacity(capacity(1, {MODEL: (100, 0)}))
    await store.submit("early", spec("high"), at_ms=T0)
    await store.submit("later", spec("high"), at_ms=T0 + 5_000)
    assert outcomes(await store.allocate([placement("early")], 60_000)) == [1]
    assert await store.transition("early", "rejected", SITE, 1, "no room") == "queued"
    assert await store.redis.zscore(store.keys.only.queue, "early") == queue_score("high", T0)
    assert await store.queued(0, 10) == ["early", "later"]
    assert (await counters(store))[f"a:{MODEL}"] == 0
    job = await store.get_job("early")
    assert job is not None
    assert (job["state"], job["last_site"], job["reason"]) == ("queued", SITE, "no room")
    assert "site" not in job and "model" not in job
    assert await event_types(store) == ["queued", "queued", "allocated", "released", "requeued"]
    # the next attempt gets a new number, and the old attempt's events no longer apply
    assert outcomes(await store.allocate([placement("early")], 60_000)) == [2]
    assert await store.transition("early", "accepted", SITE, 1) == ""
    assert await store.transition("early", "accepted", SITE, 2) == "assigned"


async def test_rejected_after_running_does_not_apply(store):
    """A site cannot reject a job it already started: the job keeps running and its devices."""
    await site_with_job(store, total=100, count=8)
    assert await store.transition("j1", "running", SITE, 1) == "running"
    assert await store.transition("j1", "rejected", SITE, 1) == ""
    assert await state(store, "j1") == "running"
    assert (await counters(store))[f"a:{MODEL}"] == 8


async def test_cancel_of_a_queued_job(store):
    """Cancelling a queued job removes it from the queue and records a cancelled event without a release."""
    await store.submit("j1", spec(), at_ms=T0)
    assert await store.transition("j1", "cancel", reason="by user") == "cancelled"
    assert await store.queue_length() == 0
    assert await state(store, "j1") == "cancelled"
    assert await event_types(store) == ["queued", "cancelled"]


async def test_cancel_of_an_assigned_job_releases_its_devices(store):
    """Cancelling an assigned job frees its devices, takes it off the site and the accept deadline."""
    await site_with_job(store, total=100, count=8)
    assert await store.transition("j1", "cancel") == "cancelled"
    assert (await counters(store))[f"a:{MODEL}"] == 0
    assert await store.jobs_at(SITE) == []
    assert await store.redis.zscore(store.keys.only.assigned, "j1") is None
    assert await store.queue_length() == 0
    assert await event_types(store) == ["queued", "allocated", "released", "cancelled"]


@pytest.mark.parametrize("final", ["completed", "failed", "cancel"])
async def test_cancel_of_a_finished_job_does_nothing(store, final):
    """Cancelling a completed, failed or already cancelled job returns '' and adds no event."""
    await site_with_job(store, total=100, count=8)
    await store.transition("j1", final)
    types = await event_types(store)
    assert await store.transition("j1", "cancel") == ""
    assert await event_types(store) == types
    assert (await counters(store))[f"a:{MODEL}"] == 0


async def test_unknown_job_transition_does_nothing(store):
    """A transition for a job that does not exist returns '' and writes nothing."""
    assert await store.transition("ghost", "completed") == ""
    assert await store.get_job("ghost") is None
    assert await event_types(store) == []


@pytest.mark.parametrize(("timeout_ms", "accept_first", "result"),
                         [(0, False, "queued"), (3_600_000, False, ""), (0, True, "")])  # fmt: skip
async def test_expire_requeues_only_past_the_accept_deadline(store, timeout_ms, accept_first, result):
    """expire requeues an assignment only when its accept deadline has passed and the site has not accepted."""
    assert await store.apply_capacity(capacity(1, {MODEL: (100, 0)}))
    await store.submit("j1", spec(), at_ms=T0)
    assert outcomes(await store.allocate([placement("j1")], accept_timeout_ms=timeout_ms)) == [1]
    if accept_first:
        assert await store.transition("j1", "accepted", SITE, 1) == "assigned"
    assert await store.transition("j1", "expire") == result
    if result:
        assert await state(store, "j1") == "queued"
        assert (await counters(store))[f"a:{MODEL}"] == 0
        assert (await event_types(store))[-2:] == ["released", "requeued"]
    else:
        assert await state(store, "j1") == "assigned"
        assert (await counters(store))[f"a:{MODEL}"] == 8


async def test_overdue_assignments_lists_only_expired_deadlines(store):
    """overdue_assignments returns jobs whose accept deadline is at or before the given time."""
    assert await store.apply_capacity(capacity(1, {MODEL: (100, 0)}))
    for job in ("soon", "late"):
        await store.submit(job, spec(), at_ms=T0)
    assert outcomes(await store.allocate([placement("soon")], 0)) == [1]
    assert outcomes(await store.allocate([placement("late")], 3_600_000)) == [1]
    assert await store.overdue_assignments(2**50) == ["soon", "late"]
    now = int(await store.redis.zscore(store.keys.only.assigned, "soon"))
    assert await store.overdue_assignments(now) == ["soon"]


# --------------------------------------------------------------------------- giving a site's work back


async def test_requeue_site_returns_all_its_jobs_and_frees_capacity(store):
    """requeue_site queues every job held at the site, frees its devices, tells it to cancel, and only once."""
    assert await store.apply_capacity(capacity(1, {MODEL: (100, 0)}))
    assert await store.apply_capacity(capacity(1, {MODEL: (100, 0)}, site="other-01"))
    for job in ("a1", "a2", "b1"):
        await store.submit(job, spec(count=8), at_ms=T0)
    placements = [placement("a1"), placement("a2"), placement("b1", site="other-01")]
    assert outcomes(await store.allocate(placements, 60_000)) == [1, 1, 1]
    assert await store.transition("a2", "running", SITE, 1) == "running"
    published: list[tuple[str, bytes]] = []

    async def publish(site: str, payload: bytes) -> None:
        published.append((site, payload))

    assert await requeue_site(store, publish, SITE, "site went offline") == 2
    assert [await state(store, j) for j in ("a1", "a2", "b1")] == ["queued", "queued", "assigned"]
    assert (await counters(store))[f"a:{MODEL}"] == 0
    assert (await counters(store, "other-01"))[f"a:{MODEL}"] == 8
    assert await store.jobs_at(SITE) == []
    assert await store.queued(0, 10) == ["a1", "a2"]
    ((site, payload),) = published
    message = orjson.loads(payload)
    assert (site, message["schema"], message["site"]) == (SITE, ASSIGNMENTS_SCHEMA, SITE)
    assert sorted((a["job"], a["attempt"], a["action"]) for a in message["assignments"]) == [
        ("a1", 1, "cancel"), ("a2", 1, "cancel")]  # fmt: skip

    assert await requeue_site(store, publish, SITE, "site went offline") == 0
    assert len(published) == 1
