"""Reads bounded by their answer: usage by tenant and time range, jobs listed by state through an index, and
finished jobs archived out of the hot set after the retention yet still readable with their history."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from broker.model.job import JobSpec, JobState
from broker.model.records import Placement
from broker.sites.lifecycle import requeue_site
from broker.state import queries
from broker.state.archive import DAY_MS, HOUR_MS, Retention
from broker.state.connection import text
from broker.state.keys import Keys
from broker.state.queries import Queries
from broker.state.store import Store
from common.config import Settings
from common.errors import InvalidInput
from common.protocol import Capacity
from suanwang.servers import MosquittoServer, RedisServer
from tests.integration.test_end_to_end import get_json, gpu_pool, hand_site, job_body, job_when, online, submit
from tests.support import eventually, running_broker

SITE = "guian-01"
MODEL = "A100-80G"
STATES = [s.value for s in JobState]


@pytest.fixture
async def own_client(own_redis: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A client of a Redis server of the test's own, so its command counters count only the test's reads."""
    client = aioredis.Redis.from_url(own_redis.url)
    yield client
    await client.aclose()


@pytest.fixture
def store(own_client: aioredis.Redis, namespace: str) -> Store:
    return Store(own_client, Keys(namespace))


# --------------------------------------------------------------------------- helpers


def spec(tenant: str, count: int = 1) -> JobSpec:
    return JobSpec.model_validate({
        "name": "bounded", "tenant": tenant, "resources": {"arch": "GPU", "models": [MODEL], "count": count},
        "origin": "shanghai", "duration_hours": 1,
    })  # fmt: skip


async def open_site(store: Store, total: int) -> None:
    capacity = Capacity.model_validate({
        "schema": "suanwang.capacity/1", "site": SITE, "hub": "guizhou", "cluster": "guian", "seq": 1,
        "pools": [{"arch": "GPU", "model": MODEL, "memory_gb": 80, "total": total, "in_use_external": 0,
                   "per_node": 8, "price_cny_per_hour": 10.0}],
    })  # fmt: skip
    assert await store.apply_capacity(capacity)


async def submit_many(store: Store, tenant: str, n: int, prefix: str) -> list[str]:
    ids = [f"{prefix}{i:05d}" for i in range(n)]
    for start in range(0, n, 50):
        await asyncio.gather(*(store.submit(job, spec(tenant)) for job in ids[start : start + 50]))
    return ids


async def allocate(store: Store, jobs: Sequence[str], accept_timeout_ms: int = 60_000) -> None:
    placements = [Placement(job=j, site=SITE, hub="guizhou", model=MODEL, count=1, price=10.0, latency_ms=20.0)
                  for j in jobs]  # fmt: skip
    commits = await store.allocate(placements, accept_timeout_ms=accept_timeout_ms)
    assert all(c.refusal is None for c in commits), commits


async def run_to(store: Store, jobs: Sequence[str], *actions: str) -> None:
    """Apply each action in turn to every job, fenced on the site and the job's current attempt."""
    attempts = [a for (a,) in await store.get_jobs(jobs, "attempt")]
    for action in actions:
        results = await store.transitions((j, action, SITE, a or "", "") for j, a in zip(jobs, attempts, strict=True))
        assert all(results), (action, results)


async def clock_after(store: Store, moment: int) -> int:
    """Redis's clock once it has moved past `moment` (so what happens next is stamped later)."""

    async def later() -> int | None:
        now = await store.clock_ms()
        return now if now > moment else None

    return await eventually(later, "Redis's clock to advance")


async def calls(redis: aioredis.Redis, command: str) -> int:
    """How many times the server ran `command` since the counters were last reset."""
    stats = cast(dict[str, Any], await redis.info("commandstats"))
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


async def index_by_state(store: Store, tenant: str) -> dict[str, set[str]]:
    """The tenant's state index: state -> the jobs it lists."""
    out = {}
    for state in STATES:
        out[state] = {text(j) for j in await store.redis.zrange(store.keys.only.tenant_state(tenant, state), 0, -1)}
    return out


async def states_of(store: Store, jobs: Sequence[str]) -> dict[str, set[str]]:
    """What the job hashes say: state -> the jobs in it."""
    out: dict[str, set[str]] = {state: set() for state in STATES}
    for job, (state,) in zip(jobs, await store.get_jobs(jobs, "state"), strict=True):
        assert state is not None
        out[state].add(job)
    return out


async def assert_index_agrees(store: Store, tenant: str, jobs: Sequence[str]) -> None:
    truth = await states_of(store, jobs)
    assert await index_by_state(store, tenant) == truth
    for state in STATES:
        listed = await store.list_jobs(tenant, 1000, state)
        assert {j["id"] for j in listed} == truth[state]
        assert all(j["state"] == state for j in listed)


# --------------------------------------------------------------------------- usage by tenant and time


async def test_usage_of_a_tenant_is_read_from_its_own_stream_by_time(store):
    """A tenant's usage in a time range is exactly its records there, read in one XRANGE, even with 10,000
    records of another tenant written in the same range; the global stream still has everyone's."""
    await open_site(store, 20_000)
    mine = await submit_many(store, "acme", 3, "a")
    noisy = await submit_many(store, "noisy", 10_000, "n")
    await allocate(store, mine + noisy)
    await run_to(store, mine, "accepted", "running")
    await run_to(store, mine[:1], "completed")
    first_done = await clock_after(store, await store.clock_ms())
    await run_to(store, noisy, "completed")
    await run_to(store, mine[1:2], "failed")
    second_done = await store.clock_ms()
    await clock_after(store, second_done)
    await run_to(store, mine[2:], "completed")

    q = Queries(store)
    assert await store.redis.xlen(store.keys.only.tenant_usage_log("acme")) == 3
    assert await store.redis.xlen(store.keys.only.tenant_usage_log("noisy")) == 10_000
    await store.redis.config_resetstat()
    middle = await q.usage_records(first_done, second_done, "acme")
    assert await calls(store.redis, "xrange") == 1
    assert [(r["job"], r["state"], r["tenant"]) for r in middle] == [(mine[1], "failed", "acme")]
    everything = await q.usage_records(None, None, "acme")
    assert [r["job"] for r in everything] == mine
    assert all(r["devices"] == 1 and r["site"] == SITE and r["price"] == 10.0 for r in everything)
    across = await q.usage_records(first_done, second_done, None)  # operators: every tenant, global stream
    assert len(across) == 10_001 and across[-1]["job"] == mine[1]


async def test_usage_of_a_tenant_pages_through_its_stream(store, monkeypatch):
    """A tenant's records beyond one page come back complete and in order, a page per XRANGE."""
    monkeypatch.setattr(queries, "USAGE_PAGE", 3)
    await open_site(store, 100)
    jobs = await submit_many(store, "acme", 7, "p")
    await allocate(store, jobs)
    await run_to(store, jobs, "completed")
    await store.redis.config_resetstat()
    records = await Queries(store).usage_records(None, None, "acme")
    assert [r["job"] for r in records] == jobs
    assert await calls(store.redis, "xrange") == 3


async def test_global_usage_log_is_trimmed_to_the_retention(store):
    """Sweeping trims the global usage stream of records older than the usage retention; the last day (what
    the dashboard's revenue reads) and every tenant's own stream stay whole."""
    store.retention = Retention(usage_days=2)
    old = [f"old{i}" for i in range(300)]
    pipe = store.redis.pipeline(transaction=False)
    for i, job in enumerate(old):  # usage from long ago, written before any current record
        pipe.xadd(store.keys.only.usage, {"job": job, "tenant": "acme", "cost": "1.0", "hub": "guizhou"},
                  id=f"1000-{i}")
    await pipe.execute()
    await open_site(store, 100)
    jobs = await submit_many(store, "acme", 5, "r")
    await allocate(store, jobs)
    await run_to(store, jobs, "completed")
    now = await store.clock_ms()

    await store.retire(now)
    left = [text(f[b"job"]) for _, f in await store.redis.xrange(store.keys.only.usage)]
    assert left[-5:] == jobs
    assert len(left) - 5 <= 100, "trimming leaves at most the one stream node that reaches past the cutoff"
    day = await Queries(store).usage_records(now - DAY_MS, None, None)
    assert [r["job"] for r in day] == jobs
    assert await store.redis.xlen(store.keys.only.tenant_usage_log("acme")) == 5


# --------------------------------------------------------------------------- listing by state


async def test_state_index_follows_every_change_of_state(store):
    """After submit, allocate, accept, run, complete, fail, reject, expire, cancel (queued and assigned),
    a lost site's requeue and a missed deadline, the tenant's state index lists each job under its state."""
    await open_site(store, 100)
    jobs = await submit_many(store, "acme", 10, "s")
    other = await submit_many(store, "other", 2, "o")
    await assert_index_agrees(store, "acme", jobs)
    await allocate(store, jobs[:7] + other)
    await assert_index_agrees(store, "acme", jobs)
    await run_to(store, jobs[:3], "accepted", "running")
    await assert_index_agrees(store, "acme", jobs)
    await run_to(store, jobs[:1], "completed")
    await run_to(store, jobs[1:2], "failed")
    await run_to(store, jobs[3:4], "rejected")
    await assert_index_agrees(store, "acme", jobs)
    assert await store.transition(jobs[4], "cancel", SITE, 1, "by the user") == "cancelled"
    assert await store.transition(jobs[7], "cancel", "", "", "by the user") == "cancelled"
    await assert_index_agrees(store, "acme", jobs)
    assert await store.transition(jobs[8], "deadline", "", "", "not started in time") == "failed"
    await allocate(store, jobs[3:4], accept_timeout_ms=0)
    await clock_after(store, await store.clock_ms())
    assert await store.transition(jobs[3], "expire", SITE, 2, "not accepted") == "queued"
    await assert_index_agrees(store, "acme", jobs)

    async def publish(_site: str, _payload: bytes) -> None:
        return None

    assert await requeue_site(store, publish, SITE, "site lost") == 5  # jobs[2] running, jobs[5:7], both of other
    await assert_index_agrees(store, "acme", jobs)
    assert await index_by_state(store, "other") == await states_of(store, other)
    by_state = await index_by_state(store, "acme")
    assert {s: len(j) for s, j in by_state.items()} == {"queued": 5, "assigned": 0, "running": 0, "completed": 1,
                                                        "failed": 2, "cancelled": 2}  # fmt: skip


async def test_listing_by_state_reads_only_the_matching_jobs(store):
    """With 300 finished jobs and 2 queued, listing the queued ones reads 2 job records, newest first."""
    await open_site(store, 1000)
    done = await submit_many(store, "acme", 300, "d")
    queued = await submit_many(store, "acme", 2, "q")
    await allocate(store, done)
    await run_to(store, done, "completed")
    await store.redis.config_resetstat()
    listed = await store.list_jobs("acme", 100, "queued")
    assert [j["id"] for j in listed] == list(reversed(queued))
    assert await calls(store.redis, "hgetall") == 2
    newest = await store.list_jobs("acme", 5, "completed")
    created = {job: int(c or 0) for job, (c,) in zip(done, await store.get_jobs(done, "created"), strict=True)}
    # newest first by submission time (Redis's, in ms; jobs of one millisecond by id, as the index orders them)
    assert [j["id"] for j in newest] == sorted(done, key=lambda job: (created[job], job), reverse=True)[:5]


# --------------------------------------------------------------------------- retention and the archive


async def test_finished_jobs_are_archived_in_bounded_batches(store):
    """Jobs finished before the retention leave the hot set a batch per sweep; their record and history are
    kept together in the archive (with its time-to-live); recent and live jobs stay where they were."""
    store.retention = Retention(finished_hours=1, archive_days=30, batch=3)
    await open_site(store, 100)
    old = await submit_many(store, "acme", 7, "f")
    recent, live = await submit_many(store, "acme", 1, "n"), await submit_many(store, "acme", 1, "l")
    await allocate(store, old[:5] + recent + live)
    await run_to(store, old[:5], "accepted", "running", "completed")
    for job in old[5:]:
        assert await store.transition(job, "cancel", "", "", "by the user") == "cancelled"
    cutoff = await store.clock_ms()
    await clock_after(store, cutoff)
    await run_to(store, recent, "accepted", "running", "completed")  # finished after the cutoff
    history_before = {job: await store.history(job) for job in old}

    sweep_at = cutoff + HOUR_MS
    assert [await store.retire(sweep_at) for _ in range(4)] == [3, 3, 1, 0]
    for job in old:
        assert not await store.redis.exists(store.keys.only.job(job), store.keys.only.job_history(job))
        assert 29 * DAY_MS < await store.redis.pttl(store.keys.only.archived_job(job)) <= 30 * DAY_MS
        archived = await store.archived(job)
        assert archived is not None and archived.archived_ms == sweep_at
        assert archived.history == history_before[job]
        assert (await store.get_job(job) or {})["state"] == archived.job["state"]
        assert await store.history(job) == history_before[job]
    assert [e["event"] for e in history_before[old[0]]] == ["queued", "allocated", "accepted", "running",
                                                            "completed"]  # fmt: skip
    hot = {j["id"] for j in await store.list_jobs("acme", 100)}
    assert hot == {recent[0], live[0]}
    assert await index_by_state(store, "acme") == {**{s: set() for s in STATES}, "completed": {recent[0]},
                                                   "assigned": {live[0]}}  # fmt: skip
    assert [text(j) for j in await store.redis.zrange(store.keys.only.finished, 0, -1)] == [recent[0]]


async def test_an_archived_job_is_still_served_with_its_history(
    redis_server: RedisServer, own_mosquitto: MosquittoServer, namespace: str
) -> None:
    """Past a short retention a completed job leaves the hot set (its keys are gone, the listing no longer
    shows it) while GET /v1/jobs/{id}, its history, its event log entries and its usage are still served."""
    async with (
        running_broker(redis_server, own_mosquitto, namespace, finished_retention_hours=2 / 3600) as broker,
        aiohttp.ClientSession(base_url=broker.url) as http,
        hand_site(own_mosquitto, SITE, [gpu_pool(8)]) as site,
    ):
        await online(http, SITE)
        job_id = await submit(http, job_body(2))
        running = await job_when(http, job_id, lambda j: j["state"] == "running")
        site.link.emit(job_id, running["allocation"]["attempt"], "completed")
        done = await job_when(http, job_id, lambda j: j["state"] == "completed")
        _, listed = await get_json(http, "/v1/jobs?state=completed")
        assert [j["id"] for j in listed["jobs"]] == [job_id]
        keys = broker.store.keys

        async def archived() -> bool:
            return bool(await broker.store.redis.exists(keys.only.archived_job(job_id)))

        await eventually(archived, "the job to be archived")
        assert not await broker.store.redis.exists(keys.only.job(job_id), keys.only.job_history(job_id))
        status, view = await get_json(http, f"/v1/jobs/{job_id}")
        assert status == 200
        assert view == done
        assert [e["event"] for e in view["history"]] == ["queued", "allocated", "accepted", "running", "completed"]
        _, listed = await get_json(http, "/v1/jobs?state=completed")
        assert listed["jobs"] == []
        status, events = await get_json(http, f"/v1/dashboard/jobs/{job_id}/events")
        assert status == 200 and events["events"][-1]["type"] == "completed"
        status, usage = await get_json(http, "/v1/usage")
        assert status == 200 and [r["job"] for r in usage["records"]] == [job_id]
        async with http.delete(f"/v1/jobs/{job_id}") as response:
            assert response.status == 409
            assert "already completed" in orjson.loads(await response.read())["error"]["message"]


# --------------------------------------------------------------------------- settings


def test_retention_settings_come_from_the_environment(monkeypatch):
    """The three retentions are read from their variables, and nonsense values are refused by name."""
    monkeypatch.setenv("SUANWANG_FINISHED_RETENTION_HOURS", "24")
    monkeypatch.setenv("SUANWANG_USAGE_RETENTION_DAYS", "90")
    monkeypatch.setenv("SUANWANG_ARCHIVE_RETENTION_DAYS", "0")
    settings = Settings.from_env()
    assert (settings.finished_retention_hours, settings.usage_retention_days, settings.archive_retention_days) == (
        24.0, 90.0, 0.0)  # fmt: skip
    monkeypatch.setenv("SUANWANG_USAGE_RETENTION_DAYS", "a month")
    with pytest.raises(InvalidInput, match="SUANWANG_USAGE_RETENTION_DAYS"):
        Settings.from_env()
    with pytest.raises(InvalidInput, match="usage_retention_days"):
        Settings(usage_retention_days=0.5)
    with pytest.raises(InvalidInput, match="finished_retention_hours"):
        Settings(finished_retention_hours=0)
