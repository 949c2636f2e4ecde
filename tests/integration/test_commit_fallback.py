"""A commit whose chosen pool filled meanwhile (another replica was faster) falls back to the decision's
runners-up in order, in the same atomic step; only when none can take the job is it refused."""

from __future__ import annotations

import dataclasses

import orjson
import pytest

from broker.matching.snapshot import Snapshot
from broker.model.records import Placement
from broker.scheduling.scheduler import Scheduler
from broker.state.keys import Keys
from broker.state.store import Store
from regions import load_geography
from tests.http.doubles import RecordingPublisher
from tests.integration.test_store import MODEL, SITE, T0, capacity, counters, event_types, outcomes, spec

OTHER, THIRD = "guian-02", "guian-03"


@pytest.fixture
def store(redis_client, namespace) -> Store:
    return Store(redis_client, Keys(namespace))


def _alt(site: str, count: int = 8, price: float = 14.0) -> tuple[str, str, str, int, float, float, str]:
    return (site, "guizhou", MODEL, count, price, 30.0, "GPU")


def _placement(*alternatives: tuple[str, str, str, int, float, float, str]) -> Placement:
    decision = {"chosen": {"site": SITE, "est_hours": 1.0, "score": 90.0},
                "runners_up": [{"site": a[0], "est_hours": 1.0, "score": 80.0 - i} for i, a in enumerate(alternatives)]}
    return Placement(job="j1", site=SITE, hub="guizhou", model=MODEL, count=8, price=12.5, latency_ms=24.0, arch="GPU",
                     decision=orjson.dumps(decision).decode(), alternatives=alternatives)  # fmt: skip


async def test_a_filled_pool_hands_the_job_to_the_first_runner_up_that_can_take_it(store: Store) -> None:
    assert await store.apply_capacity(capacity(1, {MODEL: (16, 12)}))  # 4 free: the view was stale
    assert await store.apply_capacity(capacity(1, {MODEL: (16, 10)}, site=OTHER))  # 6 free: not enough either
    assert await store.apply_capacity(capacity(1, {MODEL: (16, 0)}, site=THIRD))
    await store.submit("j1", spec(count=8), at_ms=T0)
    (commit,) = await store.allocate([_placement(_alt(OTHER), _alt(THIRD, price=15.0))], 60_000)
    assert (commit.attempt, commit.choice) == (1, 2)
    job = await store.get_job("j1")
    assert job is not None and (job["site"], float(job["price"]), job["state"]) == (THIRD, 15.0, "assigned")
    decision = orjson.loads(job["decision"])
    assert decision["chosen"]["site"] == THIRD, "the record of why names the pool that took the job"
    assert [r["site"] for r in decision["runners_up"]] == [SITE, OTHER]
    assert (await counters(store, THIRD))[f"a:{MODEL}"] == 8
    assert (await counters(store, SITE)).get(f"a:{MODEL}", 0) == 0
    assert (await counters(store, OTHER)).get(f"a:{MODEL}", 0) == 0
    assert await store.jobs_at(THIRD) == ["j1"] and await store.jobs_at(SITE) == []
    assert (await event_types(store)).count("allocated") == 1


async def test_offline_runners_up_are_skipped_and_none_left_is_the_chosen_pools_refusal(store: Store) -> None:
    assert await store.apply_capacity(capacity(1, {MODEL: (16, 12)}))
    assert await store.apply_capacity(capacity(1, {MODEL: (16, 0)}, site=OTHER))
    assert await store.set_site_status(OTHER, "offline")
    await store.submit("j1", spec(count=8), at_ms=T0)
    before = (await counters(store), await counters(store, OTHER), await event_types(store))
    assert outcomes(await store.allocate([_placement(_alt(OTHER))], 60_000)) == ["stale_view"]
    assert (await counters(store), await counters(store, OTHER), await event_types(store)) == before
    assert (await store.get_job("j1") or {})["state"] == "queued"


async def test_a_runner_up_over_the_tenants_limit_is_passed_over(store: Store) -> None:
    assert await store.apply_capacity(capacity(1, {MODEL: (16, 12)}))
    assert await store.apply_capacity(capacity(1, {MODEL: (32, 0)}, site=OTHER))
    assert await store.apply_capacity(capacity(1, {MODEL: (32, 0)}, site=THIRD))
    await store.set_tenant_limit("default", 10)
    await store.submit("j1", spec(count=8), at_ms=T0)
    wide = _placement(_alt(OTHER, count=16), _alt(THIRD, count=8))  # another model's count, say
    (commit,) = await store.allocate([wide], 60_000)
    assert (commit.attempt, commit.choice) == (1, 2)
    assert (await counters(store, THIRD))[f"a:{MODEL}"] == 8
    assert (await counters(store, OTHER)).get(f"a:{MODEL}", 0) == 0


async def test_without_runners_up_a_filled_pool_is_refused_as_before(store: Store) -> None:
    assert await store.apply_capacity(capacity(1, {MODEL: (16, 12)}))
    await store.submit("j1", spec(count=8), at_ms=T0)
    alone = dataclasses.replace(_placement(), alternatives=())
    assert outcomes(await store.allocate([alone], 60_000)) == ["stale_view"]


# --------------------------------------------------------------------------- through the scheduler


class FilledByAnotherReplica(Store):
    """Between the pass's decision and its commit, another replica takes the chosen pool's devices."""

    filled: str | None = None

    async def allocate(self, placements, accept_timeout_ms):  # type: ignore[no-untyped-def]
        if placements and self.filled is None:
            self.filled = placements[0].site
            await self.redis.hincrby(self.keys.hub("guizhou").capacity(self.filled), f"a:{MODEL}", 12)
        return await super().allocate(placements, accept_timeout_ms)


async def test_the_scheduler_sends_the_job_to_the_runner_up_and_moves_its_take(redis_client, namespace) -> None:
    store = FilledByAnotherReplica(redis_client, Keys(namespace))
    publisher = RecordingPublisher()
    scheduler = Scheduler(store, Snapshot(load_geography()), publisher)
    for seq, site in enumerate((SITE, OTHER, THIRD), start=1):
        assert await store.apply_capacity(capacity(seq, {MODEL: (16, 0)}, site=site))
    await store.submit("j1", spec(count=8))
    assert await scheduler.run_once() == 1
    assert store.filled is not None
    ((site, message),) = publisher.sent
    assert message["assignments"][0]["job"] == "j1"
    assert site != store.filled, "the assignment goes to the pool that took the job"
    job = await store.get_job("j1")
    assert job is not None and job["site"] == site
    table = scheduler.snapshot.tables[MODEL]
    assert int(table.allocated[table.index[site]]) == 8, "the view's take moved to the runner-up"
    assert scheduler.metrics.fallbacks._value.get() == 1
    assert scheduler.metrics.rejections.labels("stale_view")._value.get() == 0


async def test_a_pool_past_the_shown_runners_up_takes_the_job_and_the_record_keeps_its_shape(store: Store) -> None:
    """Placements carry more runners-up than a job's record shows (they ride under "more"): one of those
    may take the job, and the record still shows the same number of runners-up, the others under "more"."""
    sites = [f"guian-{i:02d}" for i in range(2, 7)]
    assert await store.apply_capacity(capacity(1, {MODEL: (16, 12)}))
    for site in sites[:-1]:
        assert await store.apply_capacity(capacity(1, {MODEL: (16, 12)}, site=site))  # all full
    assert await store.apply_capacity(capacity(1, {MODEL: (16, 0)}, site=sites[-1]))
    await store.submit("j1", spec(count=8), at_ms=T0)
    alternatives = tuple(_alt(site) for site in sites)
    decision = {"chosen": {"site": SITE}, "runners_up": [{"site": s} for s in sites[:3]],
                "more": [{"site": s} for s in sites[3:]]}  # fmt: skip
    placement = dataclasses.replace(_placement(*alternatives), decision=orjson.dumps(decision).decode())
    (commit,) = await store.allocate([placement], 60_000)
    assert (commit.attempt, commit.choice) == (1, 5)
    record = orjson.loads((await store.get_job("j1") or {})["decision"])
    assert record["chosen"]["site"] == sites[-1]
    assert [r["site"] for r in record["runners_up"]] == [SITE, *sites[:2]]
    assert [r["site"] for r in record["more"]] == sites[2:4]
