"""The history checker against a real redis-server: histories written by the Lua scripts pass; hand-written
bad histories (events added to the stream of the test's own namespace) give each kind of violation; a
trimmed log gives none for the jobs whose start was cut off; `suanwang audit --history` reports and exits 1.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import redis
import redis.asyncio as aioredis
from click.testing import CliRunner

from broker.model.job import JobSpec
from broker.model.records import Placement
from broker.state import history
from broker.state.history import KINDS, HistoryReport, SiteRun, check_history
from broker.state.keys import Keys
from broker.state.registry import SiteRegistry
from broker.state.store import Store
from common.protocol import Capacity
from regions import load_geography
from suanwang.cli import main
from suanwang.servers import RedisServer

GUIZHOU, GANSU = "guian-01", "qingyang-01"
MODEL = "A100-80G"
T0 = 1_700_000_000_000


@pytest.fixture
def store(redis_client: aioredis.Redis, namespace: str) -> Store:
    return Store(redis_client, Keys(namespace))


def kinds(report: HistoryReport) -> list[str]:
    return sorted({v.kind for v in report.violations})


# --------------------------------------------------------------------------- histories the scripts write


def capacity(site: str, hub: str, cluster: str, seq: int = 1, total: int = 64) -> Capacity:
    return Capacity.model_validate({
        "schema": "suanwang.capacity/1", "site": site, "hub": hub, "cluster": cluster, "seq": seq,
        "pools": [{"arch": "GPU", "model": MODEL, "memory_gb": 80, "total": total, "in_use_external": 0,
                   "per_node": 8, "price_cny_per_hour": 12.5}],
    })  # fmt: skip


def spec(**extra: Any) -> JobSpec:
    return JobSpec.model_validate({"name": "h", "resources": {"arch": "GPU", "models": [MODEL], "count": 8},
                                   "origin": "shanghai", "duration_hours": 1, **extra})  # fmt: skip


def placement(job: str, site: str = GUIZHOU, hub: str = "guizhou") -> Placement:
    return Placement(job=job, site=site, hub=hub, model=MODEL, count=8, price=12.5, latency_ms=20.0)


async def allocate(store: Store, job: str, site: str = GUIZHOU, hub: str = "guizhou") -> int:
    (commit,) = await store.allocate([placement(job, site, hub)], accept_timeout_ms=60_000)
    assert commit.ok, commit
    return commit.attempt


async def lifecycle(store: Store, prefix: str, n: int) -> None:
    """`n` rounds of every path through the lifecycle the scripts know."""
    for i in range(n):
        done, again, cancelled, held, deadline = (f"{prefix}{i}-{k}" for k in ("done", "again", "cancel", "held",
                                                                                "deadline"))  # fmt: skip
        for job in (done, again, cancelled, held, deadline):
            await store.submit(job, spec(residency={"allow_hubs": ["guizhou", "gansu"]}))
        attempt = await allocate(store, done)
        for action in ("accepted", "running", "completed"):
            assert await store.transition(done, action, GUIZHOU, attempt)
        assert await store.transition(again, "rejected", GUIZHOU, await allocate(store, again)) == "queued"
        attempt = await allocate(store, again, GANSU, "gansu")
        assert await store.transition(again, "running", GANSU, attempt) == "running"
        assert await store.transition(again, "requeue", GANSU, attempt) == "queued"
        assert await store.transition(again, "cancel") == "cancelled"
        await allocate(store, cancelled)
        assert await store.transition(cancelled, "cancel") == "cancelled"
        assert await store.transition(held, "running", GUIZHOU, await allocate(store, held)) == "running"
        assert await store.transition(deadline, "deadline", reason="too late") == "failed"


async def sites_online(store: Store) -> None:
    assert await store.apply_capacity(capacity(GUIZHOU, "guizhou", "guian", total=10_000))
    assert await store.apply_capacity(capacity(GANSU, "gansu", "qingyang", total=10_000))


async def test_histories_the_scripts_write_have_no_violations(store: Store) -> None:
    """Submission, allocation, acceptance, runs, rejection, requeue, cancel, deadline and a job still running at
    the end, all through the Lua scripts: no violation, nothing trimmed, every job seen from its start."""
    await sites_online(store)
    await lifecycle(store, "j", 3)
    report = await check_history(store)
    assert report.violations == ()
    assert (report.jobs, report.trimmed, report.partial_jobs, report.live_jobs) == (15, False, 0, 3)
    assert report.events == len(await store.redis.xrange(store.keys.only.events))
    assert report.first_event is not None and report.last_event is not None


async def test_a_trimmed_log_is_said_and_gives_no_false_violations(redis_client: aioredis.Redis, namespace: str
                                                                   ) -> None:  # fmt: skip
    """With the stream capped (MAXLEN ~) well below the history, jobs whose first events were trimmed away are
    checked from where their history begins: the report says the log was trimmed and finds nothing wrong."""
    store = Store(redis_client, Keys(namespace), events_maxlen=100)
    await sites_online(store)
    await lifecycle(store, "t", 30)
    report = await check_history(store, page=64)  # small pages: the per-job state carries across pages
    assert report.trimmed is True
    assert report.partial_jobs > 0
    assert report.events < 30 * 5 * 4
    assert report.violations == ()


# --------------------------------------------------------------------------- hand-written histories


class Log:
    """Writes events as the scripts would (fields as allocate.lua and transition.lua write them)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.ts = T0

    async def add(self, kind: str, job: str, attempt: int | None = None, site: str = "", hub: str = "",
                  state: str | None = None) -> None:  # fmt: skip
        self.ts += 1000
        states = {"queued": "queued", "allocated": "assigned", "accepted": "assigned", "running": "running",
                  "released": "assigned", "requeued": "queued"}  # fmt: skip
        fields: dict[str, Any] = {"type": kind, "job": job, "state": state or states.get(kind, kind),
                                  "tenant": "default", "ts": self.ts}  # fmt: skip
        if kind != "queued":
            fields |= {"site": site, "hub": hub or ("gansu" if site == GANSU else "guizhou"), "model": MODEL,
                       "count": 8, "attempt": attempt if attempt is not None else 0}  # fmt: skip
        await self.store.redis.xadd(self.store.keys.only.events, fields)

    async def run(self, job: str, attempt: int, site: str = GUIZHOU, end: str = "completed") -> None:
        """One attempt from allocation to `end` (completed, failed, requeued, cancelled; '' to leave it live)."""
        await self.add("allocated", job, attempt, site)
        await self.add("running", job, attempt, site)
        if end:
            await self.add("released", job, attempt, site, state="running")
            await self.add(end, job, attempt, site)

    async def record(self, job: str, state: str, attempt: int, site: str = "", **spec_extra: Any) -> None:
        fields = {"id": job, "state": state, "attempt": attempt, "tenant": "default",
                  "spec": spec(**spec_extra).model_dump_json(), **({"site": site} if site else {})}  # fmt: skip
        await self.store.redis.hset(self.store.keys.only.job(job), mapping=fields)


@pytest.fixture
def log(store: Store) -> Log:
    return Log(store)


async def test_attempts_that_do_not_grow_are_violations(store: Store, log: Log) -> None:
    """An allocation that repeats the last attempt, or skips one, breaks `attempts only grow by one`."""
    for job, second in (("repeat", 1), ("skip", 3), ("fine", 2)):
        await log.add("queued", job)
        await log.run(job, 1, end="requeued")
        await log.run(job, second)
        await log.record(job, "completed", second)
    report = await check_history(store)
    assert {(v.job, v.kind) for v in report.violations} == {("repeat", "attempt_order"), ("skip", "attempt_order")}


@pytest.mark.parametrize("stale", ["running", "requeued", "completed"])
async def test_an_event_of_an_older_attempt_is_a_violation(store: Store, log: Log, stale: str) -> None:
    """After attempt 2 was allocated, an event that moves attempt 1 means a stale attempt was applied."""
    await log.add("queued", "j")
    await log.run("j", 1, end="requeued")
    await log.add("allocated", "j", 2, GANSU)
    await log.add(stale, "j", 1, GUIZHOU)
    await log.record("j", "assigned", 2, GANSU)
    assert kinds(await check_history(store)) == ["attempt_order"]


async def test_two_live_attempts_at_once_are_a_violation(store: Store, log: Log) -> None:
    """A second allocation while the first attempt was never released: two sites hold the job."""
    await log.add("queued", "j")
    await log.run("j", 1, GUIZHOU, end="")
    await log.add("allocated", "j", 2, GANSU)
    await log.record("j", "assigned", 2, GANSU)
    report = await check_history(store)
    assert [(v.job, v.kind) for v in report.violations] == [("j", "double_live")]
    assert GUIZHOU in report.violations[0].detail


async def test_an_attempt_that_ends_without_release_is_a_violation(store: Store, log: Log) -> None:
    """A requeue logged with no release before it: the attempt's devices were never given back."""
    await log.add("queued", "j")
    await log.add("allocated", "j", 1, GUIZHOU)
    await log.add("requeued", "j", 1, GUIZHOU)
    await log.record("j", "queued", 1)
    assert kinds(await check_history(store)) == ["unreleased"]


async def test_anything_after_the_end_is_a_violation(store: Store, log: Log) -> None:
    """A job allocated again after it completed."""
    await log.add("queued", "j")
    await log.run("j", 1)
    await log.add("allocated", "j", 2, GANSU)
    await log.record("j", "assigned", 2, GANSU)
    assert kinds(await check_history(store)) == ["after_final"]


@pytest.mark.parametrize(("state", "attempt", "flagged"), [
    ("queued", 1, True), ("completed", 1, True), ("running", 2, True), ("running", 1, False), ("assigned", 1, False),
])  # fmt: skip
async def test_a_job_left_live_by_the_log_must_still_be_held(store: Store, log: Log, state: str, attempt: int,
                                                             flagged: bool) -> None:  # fmt: skip
    """The log ends with attempt 1 running: fine while the record holds that attempt, a violation otherwise."""
    await log.add("queued", "j")
    await log.run("j", 1, end="")
    await log.record("j", state, attempt, GUIZHOU)
    report = await check_history(store)
    assert kinds(report) == (["unfinished"] if flagged else [])
    assert report.live_jobs == 1


async def test_a_job_in_the_log_without_a_record_is_lost(store: Store, log: Log) -> None:
    """A job with neither a record nor an archived one is lost; an archived job that ended is not, but one the
    log leaves live is unfinished."""
    for job, end in (("gone", "completed"), ("kept", "completed"), ("archived", "completed"), ("archived-live", "")):
        await log.add("queued", job)
        await log.run(job, 1, end=end)
    await log.record("kept", "completed", 1)
    for job in ("archived", "archived-live"):
        await store.redis.set(store.keys.only.archived_job(job), orjson.dumps({"job": {"id": job}, "history": []}))
    report = await check_history(store)
    assert sorted((v.job, v.kind) for v in report.violations) == [("archived-live", "unfinished"), ("gone", "lost")]


async def test_a_record_behind_the_log_is_a_violation(store: Store, log: Log) -> None:
    """The record's attempt below the last one logged: the state went back in time."""
    await log.add("queued", "j")
    await log.run("j", 1, end="requeued")
    await log.run("j", 2, end="requeued")
    await log.record("j", "queued", 1)
    assert kinds(await check_history(store)) == ["attempt_order"]


async def test_a_job_missing_its_start_in_an_untrimmed_log_is_a_violation(store: Store, log: Log) -> None:
    """Nothing was ever removed from the stream, yet a job's history begins with its allocation."""
    await log.add("queued", "whole")
    await log.run("whole", 1)
    await log.record("whole", "completed", 1)
    await log.run("headless", 1)
    await log.record("headless", "completed", 1)
    report = await check_history(store)
    assert report.trimmed is False
    assert [(v.job, v.kind) for v in report.violations] == [("headless", "missing_start")]


async def test_allocations_outside_the_residency_are_violations(store: Store, log: Log) -> None:
    """Judged by the hub the log names, or the registry's when the site is registered, and by the province
    of the site's cluster."""
    geo = load_geography()
    await SiteRegistry(store.redis, store.keys).register(GUIZHOU, "gansu", None, geo)  # registered elsewhere
    cases = {
        "allowed": ({"allow_hubs": ["gansu"]}, GANSU),
        "outside": ({"allow_hubs": ["guizhou"]}, GANSU),
        "denied": ({"deny_hubs": ["gansu"]}, GANSU),
        "registered": ({"allow_hubs": ["guizhou"]}, GUIZHOU),  # logged as guizhou, registered in gansu
        "province": ({"deny_provinces": [geo.clusters["qingyang"].province]}, GANSU),
    }
    assert await store.apply_capacity(capacity(GANSU, "gansu", "qingyang"))
    for job, (residency, site) in cases.items():
        await log.add("queued", job)
        await log.run(job, 1, site)
        await log.record(job, "completed", 1, residency=residency)
    report = await check_history(store)
    assert {v.job: v.kind for v in report.violations} == {job: "residency" for job in cases if job != "allowed"}
    assert "registered in gansu" in next(v.detail for v in report.violations if v.job == "registered")


async def test_runs_the_sites_recorded_are_checked_against_the_log(store: Store, log: Log) -> None:
    """A site running an attempt the log gave elsewhere, and a site still running attempt 1 once attempt 2 was
    live, are violations; runs inside their attempts' windows are not."""
    for job in ("fine", "elsewhere", "overran"):
        await log.add("queued", job)
        await log.run(job, 1, GUIZHOU, end="requeued")  # 9 events a job, one a second
        await log.run(job, 2, GANSU)
        await log.record(job, "completed", 2)
    start = {job: T0 + 2000 + 9000 * i for i, job in enumerate(("fine", "elsewhere", "overran"))}
    runs = {
        "fine": [SiteRun(1, GUIZHOU, start["fine"] + 500, start["fine"] + 1500),
                 (2, GANSU, start["fine"] + 4500, None)],
        "elsewhere": [SiteRun(1, GANSU, start["elsewhere"] + 500, start["elsewhere"] + 1500)],
        "overran": [SiteRun(1, GUIZHOU, start["overran"] + 500, start["overran"] + 6000)],
    }  # fmt: skip
    report = await check_history(store, site_runs=runs)
    assert {(v.job, v.kind) for v in report.violations} == {("elsewhere", "site_run"), ("overran", "double_live")}


async def test_a_job_that_moves_while_the_log_is_read_is_not_judged_by_its_older_record(
    store: Store, log: Log, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job is allocated just after its record was read (as queued): the log read after the records shows
    it live, which the older record cannot confirm, so the end of its history is not judged."""
    await log.add("queued", "j")
    await log.record("j", "queued", 0)
    read_records = history._records

    async def records_then_move(store: Store, jobs: list[str]) -> dict[str, Any]:
        found = await read_records(store, jobs)
        await log.add("allocated", "j", 1, GUIZHOU)
        await log.record("j", "assigned", 1, GUIZHOU)
        return found

    monkeypatch.setattr(history, "_records", records_then_move)
    report = await check_history(store)
    assert (report.violations, report.events, report.live_jobs) == ((), 2, 1)


async def test_a_hold_is_taken_once_and_ends_once(store: Store, log: Log) -> None:
    """A hold used by a job and then expired, one used for other devices than it held, and one taken twice are
    violations named by the hold; a hold used once, and one released once, are not."""

    async def hold_event(kind: str, hold: str, site: str = GUIZHOU, count: int = 8, job: str = "") -> None:
        fields: dict[str, Any] = {"type": kind, "hold": hold, "site": site, "model": MODEL, "count": count,
                                  "tenant": "default", "ts": T0}  # fmt: skip
        if job:
            fields |= {"job": job, "state": "assigned", "attempt": 1, "hub": "guizhou"}
        await store.redis.xadd(store.keys.only.events, fields)

    for hold in ("used", "twice_ended", "other_pool", "released", "taken_twice"):
        await hold_event("held", hold)
    await log.add("queued", "j1")
    await hold_event("allocated", "used", job="j1")
    await log.add("queued", "j2")
    await hold_event("allocated", "twice_ended", job="j2")
    await hold_event("hold_expired", "twice_ended")
    await log.add("queued", "j3")
    await hold_event("allocated", "other_pool", count=4, job="j3")
    await hold_event("hold_released", "released")
    await hold_event("held", "taken_twice")
    report = await check_history(store)
    assert {(v.job, v.kind) for v in report.violations if v.kind == "hold"} == {
        ("twice_ended", "hold"), ("other_pool", "hold"), ("taken_twice", "hold")}


def test_every_kind_is_tested() -> None:
    """Each kind the checker can report is one a test above provokes."""
    source = open(__file__, encoding="utf-8").read()
    assert all(f'"{kind}"' in source.split("def test_every_kind_is_tested")[0] for kind in KINDS)


# --------------------------------------------------------------------------- the command line


def test_audit_history_prints_the_report_and_exits_1_on_violations(redis_server: RedisServer, namespace: str
                                                                   ) -> None:  # fmt: skip
    """`suanwang audit --history` adds the history's report to the audit's; JSON with --json."""
    sync = redis.Redis.from_url(redis_server.url)
    keys = Keys(namespace)
    try:
        sync.xadd(keys.only.events, {"type": "queued", "job": "j", "state": "queued", "ts": T0})
        sync.hset(keys.only.job("j"), mapping={"state": "queued", "attempt": 0, "tenant": "default"})
        sync.zadd(keys.only.queue, {"j": T0})
        sync.zadd(keys.only.tenant_queue("default"), {"j": T0})
        sync.zadd(keys.only.queued_tenants, {"default": 1})
        sync.zadd(keys.only.tenant_jobs("default"), {"j": T0})
        args = ["audit", "--history", "--redis", redis_server.url, "--namespace", namespace]
        clean = CliRunner().invoke(main, [*args, "--json"])
        assert clean.exit_code == 0, clean.output
        assert orjson.loads(clean.output)["history"]["violations"] == []
        sync.xadd(keys.only.events, {"type": "queued", "job": "gone", "state": "queued", "ts": T0})
        found = CliRunner().invoke(main, [*args, "--json"])
        assert found.exit_code == 1, found.output
        report = orjson.loads(found.output)
        assert report["violations"] == []  # the audit of the state itself finds nothing
        assert report["history"]["violations"] == [{"job": "gone", "kind": "lost", "detail": report["history"][
            "violations"][0]["detail"]}]  # fmt: skip
        table = CliRunner().invoke(main, args)
        assert table.exit_code == 1 and "lost" in table.output and "gone" in table.output, table.output
    finally:
        sync.delete(*sync.keys(f"{keys.prefix}*"))
        sync.close()
