"""Jobs spread over several job shards (`Keys(namespace, shards)`): each tenant's jobs, holds, queue and usage
on the shard its name hashes to, and every reader merging the shards. On one Redis and on a real three-master
Redis Cluster, where the shards' tags land on different nodes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
from redis.exceptions import ResponseError

from broker.model.records import Refusal
from broker.state.archive import Retention
from broker.state.audit import audit
from broker.state.events import EventFeed, cursor_after, run_mirror
from broker.state.history import check_history
from broker.state.keys import Keys
from broker.state.queries import Queries
from broker.state.store import Store
from common.errors import InvalidInput
from suanwang.servers import MosquittoServer, RedisClusterGroup, RedisServer
from tests.integration.test_end_to_end import gpu_pool, hand_site, job_body, job_when, online, sse, submit
from tests.integration.test_holds import option
from tests.integration.test_store import MODEL, SITE, T0, capacity, counters, placement, spec
from tests.support import eventually, ledger, running_broker

pytestmark = pytest.mark.parametrize("redis_kind", ["redis", "cluster"])

SHARDS = 4


def tenants_one_per_shard(keys: Keys) -> list[str]:
    """A tenant on each job shard, in shard order."""
    found: dict[int, str] = {}
    i = 0
    while len(found) < keys.shards:
        found.setdefault(keys.shard_index(f"tenant{i}"), f"tenant{i}")
        i += 1
    return [found[s] for s in range(keys.shards)]


@pytest.fixture
async def store(redis_target: RedisServer | RedisClusterGroup, namespace: str) -> AsyncIterator[Store]:
    store = Store.from_url(redis_target.url, namespace, job_shards=SHARDS)
    yield store
    await store.close()


def tenant_spec(tenant: str, count: int = 4, priority: str = "normal"):  # type: ignore[no-untyped-def]
    return spec(priority=priority, count=count).model_copy(update={"tenant": tenant})


async def submit_each(store: Store, tenants: list[str], per: int = 2, count: int = 4) -> dict[str, str]:
    """`per` jobs of each tenant, each on its tenant's shard; job -> tenant."""
    jobs = {}
    for tenant in tenants:
        for i in range(per):
            job = store.id_for(f"j-{tenant}-{i}", tenant)
            await store.submit(job, tenant_spec(tenant, count), at_ms=T0 + len(jobs))
            jobs[job] = tenant
    return jobs


async def test_every_step_of_a_job_runs_on_its_tenants_shard_and_every_reader_merges_the_shards(
    store: Store, redis_target: RedisServer | RedisClusterGroup
) -> None:
    tenants = tenants_one_per_shard(store.keys)
    if isinstance(redis_target, RedisClusterGroup):
        nodes = [redis_target.node_for(sk.prefix).port for sk in store.keys.each_shard]
        assert len(set(nodes)) == 3, f"the shards' tags spread over the three masters: {nodes}"
    await store.apply_capacity(capacity(1, {MODEL: (64, 0)}))
    jobs = await submit_each(store, tenants)
    for job, tenant in jobs.items():
        assert store.keys.id_shard(job) == store.keys.shard_index(tenant)
        assert await store.redis.exists(store.keys.for_tenant(tenant).job(job)) == 1
    assert await store.queue_length() == 8
    assert await store.queued(0, 8) == list(jobs), "every shard's queue, merged in queue order"
    assert await store.queued(2, 3) == list(jobs)[2:5]
    assert sum((await store.queue_depths()).values()) == 8
    heads = await store.queue_heads(64)
    assert {job for job, *_ in heads} == set(jobs), "every tenant's head, whatever its shard"
    commits = await store.allocate([placement(job, count=4) for job in jobs], 30_000)
    assert all(c.ok and c.attempt == 1 for c in commits), commits
    assert (await counters(store))[f"a:{MODEL}"] == 32
    assert set(await ledger(store, SITE)) == set(jobs)
    assert sorted(await store.overdue_assignments(await store.clock_ms() + 60_000)) == sorted(jobs)
    for action in ("accepted", "running", "completed"):
        states = await store.transitions([(job, action, SITE, 1, "") for job in jobs])
        assert states == [{"accepted": "assigned"}.get(action, action)] * 8
    assert (await counters(store))[f"a:{MODEL}"] == 0 and await ledger(store, SITE) == {}
    reliability = await store.reliability(SITE)
    assert round(reliability.completed) == 8, "every shard's share of the site's record, summed"
    assert await audit(store) == []
    report = await check_history(store)
    assert report.ok and report.jobs == 8 and report.events == 8 * 6, report
    usage = await Queries(store).usage_records(None, None, None)
    assert sorted(r["job"] for r in usage) == sorted(jobs), "the usage of every shard"
    assert len(await Queries(store).usage_records(None, None, tenants[2])) == 2
    assert await store.reset_reliability(SITE) is True
    assert (await store.reliability(SITE)).completed == 0
    store.retention = Retention(finished_hours=0)
    assert await store.retire(await store.clock_ms() + 1) == 8, "every shard's finished jobs archived"
    record = await store.get_job(next(iter(jobs)))
    assert record is not None and record["state"] == "completed"


async def test_the_audit_reads_every_shard_wherever_its_node(store: Store) -> None:
    """A queued job missing from its tenant's queue, on each shard (on the cluster, shards on other nodes than
    the namespace's): the audit finds every one."""
    tenants = tenants_one_per_shard(store.keys)
    jobs = await submit_each(store, tenants, per=1)
    assert await audit(store) == []
    for job, tenant in jobs.items():
        await store.redis.zrem(store.keys.for_tenant(tenant).tenant_queue(tenant), job)
    found = {v.subject for v in await audit(store) if v.kind == "queue"}
    assert found == set(jobs)


async def test_holds_live_on_their_tenants_shard_and_a_preemption_stops_only_jobs_of_its_own(store: Store) -> None:
    tenants = tenants_one_per_shard(store.keys)
    await store.apply_capacity(capacity(1, {MODEL: (16, 0)}))
    hold_id = store.id_for("h1", tenants[1])
    job = tenant_spec(tenants[1], 8)
    taken = await store.take_hold(hold_id, tenants[1], [option(count=8)], 60_000, job.placement_hash())
    assert taken.hold is not None and taken.hold.standing
    assert [h.id for h in await store.list_holds()] == [hold_id] and await store.standing_holds() == 1
    with pytest.raises(ValueError, match="shard"):
        await store.take_hold(store.id_for("h2", tenants[2]), tenants[1], [option(count=8)], 60_000, "x")
    result = await store.submit_held(store.id_for("j1", tenants[1]), job.model_copy(update={"hold": hold_id}),
                                     30_000)  # fmt: skip
    assert not isinstance(result, Exception)
    record, created, commit = result
    assert created and commit is not None and commit.ok and record["hold"] == hold_id
    assert set(await ledger(store, SITE)) == {store.id_for("j1", tenants[1])}
    # a low job of another shard holds the other 8; a high job of tenant 3 cannot preempt it from its shard
    low = store.id_for("low", tenants[2])
    await store.submit(low, tenant_spec(tenants[2], 8, "low").model_copy(update={"preemptible": True}), at_ms=T0)
    assert (await store.allocate([placement(low, count=8)], 60_000))[0].ok
    urgent = store.id_for("urgent", tenants[3])
    await store.submit(urgent, tenant_spec(tenants[3], 8, "high"), at_ms=T0)
    assert not store.same_shard(urgent, low)
    until, refusal = await store.preempt(urgent, store.keys.with_shard_of("p1", urgent), option(count=8), 1_000, 3,
                                         [(low, 1)])  # fmt: skip
    assert (until, refusal) == (0, Refusal.VICTIM_MOVED)
    assert (await store.get_job(low) or {})["state"] == "assigned", "the other shard's job runs on"
    assert await audit(store) == [] and (await check_history(store)).ok


async def test_the_live_feed_tails_every_shard_and_resumes_from_any_of_its_positions(store: Store) -> None:
    tenants = tenants_one_per_shard(store.keys)
    feed, stop = EventFeed(store, block_ms=100), asyncio.Event()
    published: list[dict[str, object]] = []

    async def publish(events: list[bytes]) -> None:
        published.extend(orjson.loads(e) for e in events)

    tasks = [asyncio.create_task(feed.run(stop)), asyncio.create_task(run_mirror(store, "m1", publish, stop))]
    try:
        await feed.wait_started(10)

        async def groups() -> bool:  # the mirror reads each log from where its group was made
            try:
                return all([await store.redis.xinfo_groups(sk.events) for sk in store.keys.each_shard])
            except ResponseError:  # not made yet
                return False

        await eventually(groups, "the mirror's consumer groups")
        start = feed.last_id
        assert len(start.split(",")) == SHARDS and feed.valid(start) and not feed.valid("1-0")
        async with feed.subscribe() as subscription:
            jobs = await submit_each(store, tenants, per=1)
            live = [await asyncio.wait_for(subscription.queue.get(), 10) for _ in jobs]
        events = [orjson.loads(data) for _, data in live]
        assert sorted(e["job"] for e in events) == sorted(jobs)
        assert {e["shard"] for e in events} == set(range(SHARDS))
        positions = [position for position, _ in live]
        assert all(cursor_after(b, a) for a, b in zip([start, *positions], positions, strict=False))
        backlog = await feed.backlog(start)
        assert sorted(orjson.loads(d)["job"] for _, d in backlog) == sorted(jobs)
        assert await feed.backlog(positions[-1]) == [], "the last position has read everything"
        rest = await feed.backlog(positions[0])
        assert sorted(orjson.loads(d)["job"] for _, d in rest) == sorted(e["job"] for e in events[1:])

        async def mirrored() -> bool:
            return len(published) >= len(jobs)

        await eventually(mirrored, "the mirror's events")
        assert sorted(str(e["job"]) for e in published) == sorted(jobs), "each event mirrored once"
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_pass_shares_its_batch_among_the_shards_by_their_queued_tenants(store: Store) -> None:
    """One tenant queued on one shard, three on another: once a pass has counted them, each tenant gets the same
    share of the next pass's batch (as on one shard), not each shard the same share."""
    keys = store.keys
    by_shard: dict[int, list[str]] = {}
    i = 0
    while len(by_shard.get(0, [])) < 1 or len(by_shard.get(1, [])) < 3:
        tenant = f"tenant{i}"
        i += 1
        shard = keys.shard_index(tenant)
        if shard in (0, 1) and len(by_shard.setdefault(shard, [])) < (1 if shard == 0 else 3):
            by_shard[shard].append(tenant)
    tenants = by_shard[0] + by_shard[1]
    await submit_each(store, tenants, per=20)
    await store.queue_heads(64, claimer="a")  # counts each shard's queued tenants
    heads = await store.queue_heads(64, claimer="a")
    per_tenant = {t: sum(1 for *_, tenant in heads if tenant == t) for t in tenants}
    assert set(per_tenant.values()) == {16}, per_tenant


async def test_a_broker_on_four_job_shards_runs_jobs_of_every_shard_end_to_end(
    redis_target: RedisServer | RedisClusterGroup, own_mosquitto: MosquittoServer, namespace: str
) -> None:
    """`serve --job-shards 4`: jobs of tenants on every shard submitted over HTTP are placed on a real MQTT site,
    run and complete there; the live stream resumes from any event's id; the number is recorded and kept."""
    async with running_broker(redis_target, own_mosquitto, namespace, job_shards=SHARDS) as broker:
        keys = broker.store.keys
        assert keys.shards == SHARDS
        tenants = tenants_one_per_shard(keys)
        async with (aiohttp.ClientSession(base_url=broker.url) as http,
                    hand_site(own_mosquitto, "guian-01", [gpu_pool(32)]) as site):  # fmt: skip
            await online(http, "guian-01", total=32)
            async with sse(http) as stream:
                jobs = [await submit(http, job_body(4, tenant=t)) for t in tenants for _ in range(2)]
                assert {keys.id_shard(j) for j in jobs} == set(range(SHARDS))
                seen = [await stream.next() for _ in range(len(jobs) * 4)]  # queued, allocated, accepted, running
            for job in jobs:
                await job_when(http, job, lambda j: j["state"] == "running")
            assert sorted(a.job for a in site.runs) == sorted(jobs)
            for job in jobs:
                site.link.emit(job, 1, "completed")
            for job in jobs:
                await job_when(http, job, lambda j: j["state"] == "completed")
            # resumed from the tenth event: exactly the events after it, each shard's in its order
            after = seen[9][0]
            async with sse(http, after) as resumed:
                rest = [await resumed.next() for _ in range(len(seen) - 10 + len(jobs) * 2)]
            # (the live order interleaves the shards as they were read, the backlog by id: the same events)
            assert sorted((e["job"], e["type"]) for _, e in rest[: len(seen) - 10]) == sorted(
                (e["job"], e["type"]) for _, e in seen[10:]
            )
            assert all(cursor_after(position, after) for position, _ in rest)
            assert sorted(e["type"] for _, e in rest[len(seen) - 10 :]) == ["completed"] * 8 + ["released"] * 8
        assert await audit(broker.store) == [] and (await check_history(broker.store)).ok
    with pytest.raises(InvalidInput, match="4 job shards"):
        async with running_broker(redis_target, own_mosquitto, namespace, job_shards=2):
            pass


async def test_the_matchers_loads_read_a_shards_share_of_a_sites_record_only_once_it_changed(store: Store) -> None:
    tenants = tenants_one_per_shard(store.keys)
    await store.apply_capacity(capacity(1, {MODEL: (16, 0)}))

    async def run_one(tenant: str, name: str) -> None:
        job = store.id_for(name, tenant)
        await store.submit(job, tenant_spec(tenant, 4), at_ms=T0)
        assert (await store.allocate([placement(job, count=4)], 30_000))[0].ok
        for action in ("accepted", "running", "completed"):
            await store.transition(job, action, SITE, 1)

    await run_one(tenants[1], "a")
    version = (await store.changed_sites(0))[0][1]
    (record,) = await store.load_sites([SITE], cached=True)
    assert round(record.reliability.completed) == 1 and store.shares_stale == set()
    await run_one(tenants[3], "b")
    changed = await store.changed_sites(version)
    assert [site for site, _ in changed] == [SITE]
    assert store.shares_stale == {(SITE, 3)}, "only shard 3's share changed"
    (record,) = await store.load_sites([SITE], cached=True)
    assert round(record.reliability.completed) == 2, "shard 1's share as cached, shard 3's read again"
    assert store.shares_stale == set()
