"""The scheduler's view stays consistent: a refresh (from a quote or a metrics scrape) never runs between a
pass's optimistic take and its undo, and a refused placement reloads that site instead of guessing."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis

from broker.matching.snapshot import Snapshot
from broker.model.job import JobSpec
from broker.model.records import Commit, Placement
from broker.scheduling.scheduler import Scheduler
from broker.state.keys import Keys
from broker.state.store import Store
from common.protocol import Capacity
from regions import load_geography
from tests.http.doubles import RecordingPublisher

SITE, MODEL = "guian-01", "A100-80G"
SPEC = JobSpec.model_validate({"name": "finetune", "resources": {"arch": "GPU", "models": [MODEL], "count": 8},
                               "origin": "shanghai", "duration_hours": 1})  # fmt: skip


def capacity(seq: int, total: int) -> Capacity:
    return Capacity.model_validate({
        "schema": "suanwang.capacity/1", "site": SITE, "hub": "guizhou", "cluster": "guian", "seq": seq,
        "pools": [{"arch": "GPU", "model": MODEL, "memory_gb": 80, "total": total, "per_node": 8,
                   "price_cny_per_hour": 12.5}],
    })  # fmt: skip


class ShrinksDuringCommit(Store):
    """Between the pass's optimistic take and its commit, the site shrinks and someone refreshes the view
    (as `/v1/quote` or `/metrics` do)."""

    scheduler: Scheduler
    refreshing: asyncio.Task[int] | None = None

    async def allocate(self, placements: Sequence[Placement], accept_timeout_ms: int) -> list[Commit]:
        if placements and self.refreshing is None:
            await self.apply_capacity(capacity(2, 4))  # too small now: the commit is refused
            self.refreshing = asyncio.create_task(self.scheduler.refresh())
            for _ in range(20):  # let the refresh run as far as it can
                await asyncio.sleep(0)
        return await super().allocate(placements, accept_timeout_ms)


async def test_a_refresh_during_a_pass_does_not_corrupt_the_view_and_a_refusal_reloads_the_site(
    redis_client: aioredis.Redis, namespace: str
) -> None:
    store = ShrinksDuringCommit(redis_client, Keys(namespace))
    scheduler = store.scheduler = Scheduler(store, Snapshot(load_geography()), RecordingPublisher())
    await store.apply_capacity(capacity(1, 16))
    await store.submit("j1", SPEC)
    assert await scheduler.run_once() == 0  # refused: the site had shrunk
    assert store.refreshing is not None
    await store.refreshing
    table = scheduler.snapshot.tables[MODEL]
    row = table.index[SITE]
    # what Redis says: 4 devices, none allocated (not -8 after an undo of a take the refresh wiped)
    assert (int(table.total[row]), int(table.allocated[row])) == (4, 0)
    # and the job is not tried again and again at a site where it cannot fit
    assert await scheduler.run_once() == 0
    assert int(table.allocated[row]) == 0


async def test_the_view_is_brought_up_to_date_a_chunk_at_a_time(redis_client: aioredis.Redis, namespace: str,
                                                                 monkeypatch: Any) -> None:  # fmt: skip
    """Many changed sites load in several round trips of `LOAD_CHUNK`, every one of them, each asking only
    about the metadata versions of its own sites."""
    from broker.scheduling import scheduler as scheduling

    monkeypatch.setattr(scheduling, "LOAD_CHUNK", 3)
    store = Store(redis_client, Keys(namespace))
    sites = [f"guian-{i:02d}" for i in range(8)]
    for site in sites:
        message = capacity(1, 16).model_dump(by_alias=True) | {"site": site}
        await store.apply_capacity(Capacity.model_validate(message))
    asked: list[tuple[list[str], set[str]]] = []
    real = store.load_sites

    async def load(ids: Sequence[str], known: dict[str, int] | None = None, *, cached: bool = False) -> Any:
        asked.append((list(ids), set(known or {})))
        return await real(ids, known, cached=cached)

    monkeypatch.setattr(store, "load_sites", load)
    scheduler = Scheduler(store, Snapshot(load_geography()), RecordingPublisher())
    assert await scheduler.refresh() == 8
    assert [len(ids) for ids, _ in asked] == [3, 3, 2]
    assert sorted(scheduler.snapshot.sites) == sites
    await store.apply_capacity(Capacity.model_validate(capacity(2, 8).model_dump(by_alias=True)))
    asked.clear()
    assert await scheduler.refresh() == 1
    assert asked == [([SITE], {SITE})], "a refresh asks about the changed site's metadata version only"
