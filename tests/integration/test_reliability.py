"""Provider reliability against real servers: the record `transition.lua` keeps in the step of each
transition (Redis, Lua), the scheduler's view of it, and over HTTP with real MQTT sites, a site that keeps
rejecting its work ranked below an equal one until an operator resets it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from click.testing import CliRunner

from adapters.site import SiteLink
from broker.matching.snapshot import AGE_EVERY_MS, Snapshot
from broker.model.job import JobSpec
from broker.model.records import Placement
from broker.model.reliability import HALF_LIFE_MS, Reliability, reliability_score
from broker.scheduling.scheduler import Scheduler
from broker.service import Broker
from broker.state.audit import audit
from broker.state.connection import text
from broker.state.history import check_history
from broker.state.keys import Keys
from broker.state.store import Store
from common.config import MqttTarget
from common.protocol import Assignments, Capacity
from regions import load_geography
from suanwang.cli import main
from suanwang.servers import MosquittoServer
from tests.http.doubles import RecordingPublisher
from tests.integration.test_quote_api import all_online, call, job_body, job_when, pool
from tests.support import eventually

A, B, MODEL = "guian-01", "guian-02", "A100-80G"
HOUR_MS = 3_600_000
SPEC = JobSpec.model_validate({"name": "finetune", "resources": {"arch": "GPU", "models": [MODEL], "count": 8},
                               "origin": "shanghai", "duration_hours": 1})  # fmt: skip


def capacity(site: str) -> Capacity:
    return Capacity.model_validate({
        "schema": "suanwang.capacity/1", "site": site, "hub": "guizhou", "cluster": "guian", "seq": 1,
        "pools": [{"arch": "GPU", "model": MODEL, "memory_gb": 80, "total": 64, "per_node": 8,
                   "price_cny_per_hour": 12.5}],
    })  # fmt: skip


@pytest.fixture
async def store(redis_client: aioredis.Redis, namespace: str) -> Store:
    store = Store(redis_client, Keys(namespace))
    for site in (A, B):
        await store.apply_capacity(capacity(site))
    return store


async def placed(store: Store, job: str, site: str = A, accept_timeout_ms: int = 60_000) -> int:
    """Submit `job` (if new) and commit it at `site`; its attempt."""
    if await store.get_job(job) is None:
        await store.submit(job, SPEC)
    (commit,) = await store.allocate([Placement(job, site, "guizhou", MODEL, 8, 12.5, 24.0)], accept_timeout_ms)
    assert commit.ok, commit
    return commit.attempt


async def transition_at(store: Store, job: str, action: str, site: str, attempt: int, now_ms: int) -> str:
    """`store.transition`, timed by `now_ms` instead of Redis's clock (the script's own argument)."""
    keys = store.transition_keys(job)
    args = [job, action, site, str(attempt), "", now_ms, store.events_maxlen, store.max_attempts, HALF_LIFE_MS]
    (result,) = await store.run_scripts([(store._transition, keys, args)])
    if isinstance(result, list):  # it gave devices back: the site shard's step it wrote, done as transitions() does
        await store.run_steps([text(result[1])])
        return text(result[0])
    return text(result)


async def record(store: Store, site: str = A) -> dict[str, float]:
    raw = await store.redis.hgetall(store.keys.only.site_reliability(site))
    return {text(k): float(v) for k, v in raw.items()}


async def version(store: Store, site: str = A) -> float:
    return float(await store.redis.zscore(store.keys.only.sites, site) or 0)


async def clean(store: Store) -> None:
    """What the record changes leaves the audit and the history checker nothing to say."""
    assert await audit(store) == []
    report = await check_history(store)
    assert report.ok, report.violations


# --------------------------------------------------------------------------- the record, in Lua


async def test_accepted_and_completed_count_as_good_in_the_transitions_own_step(store: Store) -> None:
    """An accept and a completion each count once, in the script that makes the transition: a duplicate, or an
    event naming an old attempt, changes neither the job nor the record."""
    attempt = await placed(store, "j1")
    assert await store.transition("j1", "accepted", A, attempt) == "assigned"
    assert await store.transition("j1", "accepted", A, attempt) == ""  # a QoS 1 duplicate
    assert await store.transition("j1", "running", A, attempt) == "running"
    assert await store.transition("j1", "completed", A, attempt + 1) == ""  # another attempt's
    assert await store.transition("j1", "completed", A, attempt) == "completed"
    assert await store.transition("j1", "completed", A, attempt) == ""
    rel = await store.reliability(A)
    assert (rel.accepted, rel.completed) == pytest.approx((1.0, 1.0), rel=1e-6)
    assert (rel.timed_out, rel.rejected, rel.failed, rel.lost, rel.lost_device_hours) == (0, 0, 0, 0, 0)
    assert rel.score == 100.0
    assert await record(store, B) == {}  # only the site that did the work
    await clean(store)


async def test_each_bad_outcome_counts_against_the_site(store: Store) -> None:
    """A timed-out assignment, a rejection, a failed job, a `lost` report and a lost site's running work each
    count in their own counter; running work lost counts its device-hours (8 devices x 2 h)."""
    now = await store.clock_ms()
    attempt = await placed(store, "expired")
    assert await transition_at(store, "expired", "expire", A, attempt, now + 61_000) == "queued"
    attempt = await placed(store, "refused")
    assert await store.transition("refused", "rejected", A, attempt) == "queued"
    attempt = await placed(store, "broken")
    assert await store.transition("broken", "running", A, attempt) == "running"
    assert await store.transition("broken", "failed", A, attempt, "exit 1") == "failed"
    attempt = await placed(store, "forgotten")
    assert await store.transition("forgotten", "lost", A, attempt) == "queued"
    attempt = await placed(store, "long")
    assert await transition_at(store, "long", "running", A, attempt, now) == "running"
    assert await transition_at(store, "long", "requeue", A, attempt, now + 2 * HOUR_MS) == "queued"
    got = await record(store)
    factor = 2 ** (-2 * HOUR_MS / HALF_LIFE_MS)  # the last update decays the earlier ones by its 2 h
    assert got["timed_out"] == pytest.approx(factor, rel=1e-3) and got["rejected"] == pytest.approx(factor, rel=1e-3)
    assert got["failed"] == pytest.approx(factor, rel=1e-3)
    assert got["lost"] == pytest.approx(1 + factor, rel=1e-3)
    assert got["lost_device_hours"] == pytest.approx(16.0, rel=1e-6)
    assert got["t"] == now + 2 * HOUR_MS
    rel = Reliability.from_fields({k: str(v) for k, v in got.items()})
    assert 0 < rel.score < 50  # five bad outcomes of a new site, and 16 device-hours lost
    assert await record(store, B) == {}
    await clean(store)


async def test_the_record_decays_by_half_every_half_life_of_redis_time(store: Store) -> None:
    """A failure counted a half-life before another is worth half of it when the second is counted; reading
    decays to Redis's clock, and the score climbs back towards 100 as the record fades."""
    now = await store.clock_ms()
    start = now - 2 * HALF_LIFE_MS
    for i, when in enumerate((start, start + HALF_LIFE_MS)):
        attempt = await placed(store, f"f{i}")
        assert await transition_at(store, f"f{i}", "failed", A, attempt, when) == "failed"
    got = await record(store)
    assert got["failed"] == pytest.approx(1.5) and got["t"] == start + HALF_LIFE_MS
    read = await store.reliability(A)  # one more half-life later, by Redis's clock
    assert read.failed == pytest.approx(0.75, rel=1e-3)
    recovered = read.at(now + 3 * HALF_LIFE_MS)
    assert read.score < recovered.score < 100.0
    assert reliability_score(Reliability(failed=1.5)) < read.score


async def test_an_accept_marks_the_site_changed_only_when_its_score_moves(store: Store) -> None:
    """Every release already marks the site changed; an accept marks it too, but only at a site with something
    bad on record (a clean site scores 100 whatever it accepts)."""
    attempt = await placed(store, "ok")
    before = await version(store)
    assert await store.transition("ok", "accepted", A, attempt) == "assigned"
    assert await version(store) == before
    attempt = await placed(store, "no", B)
    assert await store.transition("no", "rejected", B, attempt) == "queued"
    attempt = await placed(store, "yes", B)
    before = await version(store, B)
    assert await store.transition("yes", "accepted", B, attempt) == "assigned"
    assert await version(store, B) > before


async def test_an_operator_reset_forgets_the_record_marks_the_site_and_logs_it(store: Store) -> None:
    """A reset deletes the record, marks the site changed for every replica's view, and logs who did it; an
    unknown site is told apart from one with no record."""
    attempt = await placed(store, "j1")
    assert await store.transition("j1", "rejected", A, attempt) == "queued"
    assert (await store.reliability(A)).score < 100
    before = await version(store)
    assert await store.reset_reliability(A, who="tok-ops") is True
    assert await record(store) == {} and (await store.reliability(A)) == Reliability()
    assert await version(store) > before
    ((_, last),) = await store.redis.xrevrange(store.keys.only.events, count=1)
    assert {text(k): text(v) for k, v in last.items() if k != b"ts"} == {
        "type": "reliability_reset",
        "site": A,
        "reason": "reset by tok-ops",
    }
    assert await store.reset_reliability(A) is False
    assert await store.reset_reliability("nowhere-01") is None
    assert await store.redis.zscore(store.keys.only.sites, "nowhere-01") is None
    await clean(store)


# --------------------------------------------------------------------------- the scheduler's view


async def test_the_view_learns_scores_with_the_sites_it_reloads_and_ages_idle_ones(store: Store) -> None:
    """The view reads each changed site's record in the same round trip as its capacity: a failure lowers the
    score of that site's rows, a reset brings it back; a site with no new event recovers as its record decays."""
    scheduler = Scheduler(store, Snapshot(load_geography()), RecordingPublisher())
    await scheduler.refresh()
    snap = scheduler.snapshot
    table = snap.tables[MODEL]
    assert snap.sites[A].reliability == snap.sites[B].reliability == 100.0
    now = await store.clock_ms()
    attempt = await placed(store, "j1")
    assert await transition_at(store, "j1", "failed", A, attempt, now - 3 * HALF_LIFE_MS) == "failed"
    assert await scheduler.refresh() >= 1
    low = snap.sites[A].reliability
    assert low < 100.0 and table.reliability[table.index[A]] == low and table.reliability[table.index[B]] == 100.0
    expected = (await store.reliability(A)).score
    assert low == pytest.approx(expected, abs=0.11)  # read a moment apart
    # no event at A from now on: the view decays the record itself, by Redis's clock
    assert snap.age_reliability(store.time_seen + AGE_EVERY_MS + 20 * HALF_LIFE_MS) == 1
    assert snap.sites[A].reliability == 100.0 and table.reliability[table.index[A]] == 100.0
    assert A not in snap.unreliable
    attempt = await placed(store, "j2")
    assert await store.transition("j2", "rejected", A, attempt) == "queued"
    await scheduler.refresh()
    assert snap.sites[A].reliability < 100.0
    assert await store.reset_reliability(A)
    await scheduler.refresh()
    assert snap.sites[A].reliability == 100.0 and table.reliability[table.index[A]] == 100.0


# --------------------------------------------------------------------------- over HTTP, with real sites


@asynccontextmanager
async def behaving(mqtt: MosquittoServer, site: str, reject: bool) -> AsyncIterator[SiteLink]:
    """A real MQTT site in guian that rejects every run it is given (`reject`) or accepts and starts it."""
    link = SiteLink(MqttTarget.from_url(mqtt.url), site, "guizhou", [pool(MODEL, price=10.0)], cluster="guian",
                    interval=1.0)  # fmt: skip

    def answer(batch: Assignments) -> None:
        for item in batch.assignments:
            if item.action != "run":
                continue
            if reject:
                link.emit(item.job, item.attempt, "rejected", "no room after all")
            else:
                link.emit(item.job, item.attempt, "accepted")
                link.emit(item.job, item.attempt, "running")

    link.on_assignments = answer
    task = asyncio.create_task(link.run(), name=f"site-{site}")
    try:
        yield link
    finally:
        link.stop()
        await asyncio.wait([task], timeout=5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def quoted(http: aiohttp.ClientSession) -> dict[str, dict[str, Any]]:
    status, quote = await call(http, "POST", "/v1/quote", job_body(resources={"arch": "GPU", "count": 8}))
    assert status == 200, quote
    return {c["site"]: {**c, "rank": i} for i, c in enumerate(quote["candidates"])}


def cli(broker: Broker, *args: str) -> str:
    result = CliRunner().invoke(main, ["reliability", *args, "--http", broker.url.removeprefix("http://")])
    assert result.exit_code == 0, result.output
    return result.output


async def test_a_site_that_keeps_rejecting_work_ranks_below_an_equal_one_until_reset(
    broker: Broker, http: aiohttp.ClientSession, own_mosquitto: MosquittoServer
) -> None:
    """Two sites alike in every offer; one rejects every run it gets. Its reliability falls, so a quote ranks it
    below the other and shows why, yet still lists it (no ban); an operator's reset puts it back on par."""
    async with behaving(own_mosquitto, "guian-bad", reject=True):
        await all_online(http, {"guian-bad"})
        job_id = (await call(http, "POST", "/v1/jobs", job_body()))[1]["id"]
        # alone in the network, it gets the job back each time it refuses it, until the job gives up
        view = await job_when(http, job_id, lambda v: v["state"] == "failed")
        assert view["reason"].startswith("gave up after 5 attempts")
        async with behaving(own_mosquitto, "guian-good", reject=False):
            await all_online(http, {"guian-bad", "guian-good"})
            _, bad = await call(http, "GET", "/v1/sites/guian-bad")
            assert bad["reliability"]["rejected"] == pytest.approx(5.0, rel=1e-3)
            assert bad["reliability"]["score"] == 50.0 and bad["reliability"]["half_life_hours"] == 24
            offers = await quoted(http)
            assert set(offers) == {"guian-good", "guian-bad"}  # still a candidate
            good, bad_offer = offers["guian-good"], offers["guian-bad"]
            assert (good["rank"], bad_offer["rank"]) == (0, 1) and good["score"] > bad_offer["score"]
            assert (good["reliability"], bad_offer["reliability"]) == (100.0, 50.0)
            assert (good["scores"]["reliability"], bad_offer["scores"]["reliability"]) == (100.0, 50.0)
            assert {k: v for k, v in good["scores"].items() if k != "reliability"} == {
                k: v for k, v in bad_offer["scores"].items() if k != "reliability"
            }  # alike in all else
            listed = orjson.loads(await asyncio.to_thread(cli, broker, "--json"))["sites"]
            assert [(s["id"], s["reliability"]["score"]) for s in listed] == [("guian-good", 100.0),
                                                                               ("guian-bad", 50.0)]  # fmt: skip
            table = await asyncio.to_thread(cli, broker)
            assert "Sites by reliability" in table and "50" in table
            async with http.get("/metrics") as response:
                metrics = (await response.read()).decode()
            assert 'suanwang_site_reliability_score{site="guian-bad"} 50.0' in metrics

            status, reset = await call(http, "POST", "/v1/sites/guian-bad/reliability:reset")
            assert status == 200 and reset["had_record"] is True and reset["reliability"]["score"] == 100.0
            assert (await call(http, "POST", "/v1/sites/nowhere-01/reliability:reset"))[0] == 404

            async def on_par() -> dict[str, dict[str, Any]] | None:
                offers = await quoted(http)
                return offers if offers["guian-bad"]["reliability"] == 100.0 else None

            offers = await eventually(on_par, "the reset site back on par")
            assert offers["guian-bad"]["score"] == offers["guian-good"]["score"]
            assert offers["guian-bad"]["scores"] == offers["guian-good"]["scores"]
            assert "reset guian-bad: it had no record" in await asyncio.to_thread(cli, broker, "guian-bad", "--reset")
