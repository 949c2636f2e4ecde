"""Changes of ownership are fenced on what the caller read (holder and attempt): a job that moves between
the read and the write is never acted on as it was. Each test moves the job at that exact moment, through
a store that performs the move right after the read, against a real Redis."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from broker.model.job import JobSpec
from broker.model.records import Placement
from broker.sites.lifecycle import requeue_site
from broker.state.keys import Keys
from broker.state.store import Store
from common.protocol import Capacity
from tests.http.conftest import start  # noqa: F401  (the API app fixture)
from tests.http.doubles import RecordingPublisher
from tests.http.harness import Start

A, B, MODEL = "guian-01", "guian-02", "A100-80G"
Move = Callable[[], Awaitable[None]]


class MovesAfterRead(Store):
    """A store on which `move` runs once, right after the first read of `method` (the race window)."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, method: str) -> None:
        super().__init__(redis, keys)
        self.method = method
        self.move: Move | None = None

    async def _after(self, name: str) -> None:
        if name == self.method and self.move is not None:
            move, self.move = self.move, None
            await move()

    async def get_job(self, job_id: str) -> dict[str, str] | None:
        job = await super().get_job(job_id)
        await self._after("get_job")
        return job

    async def get_jobs(self, ids: Any, *fields: str) -> list[list[str | None]]:
        rows = await super().get_jobs(ids, *fields)
        await self._after("get_jobs")
        return rows


def capacity(site: str) -> Capacity:
    return Capacity.model_validate({
        "schema": "suanwang.capacity/1", "site": site, "hub": "guizhou", "cluster": "guian", "seq": 1,
        "pools": [{"arch": "GPU", "model": MODEL, "memory_gb": 80, "total": 16, "per_node": 8,
                   "price_cny_per_hour": 12.5}],
    })  # fmt: skip


def placement(site: str) -> Placement:
    return Placement(job="j1", site=site, hub="guizhou", model=MODEL, count=8, price=12.5, latency_ms=24.0)


async def placed_at(store: Store, site: str) -> int:
    (commit,) = await store.allocate([placement(site)], 60_000)
    assert commit.ok, commit
    return commit.attempt


async def allocated(store: Store, site: str) -> int:
    return int(await store.redis.hget(store.keys.capacity(site), f"a:{MODEL}") or 0)


@pytest.fixture
async def racing(redis_client: aioredis.Redis, namespace: str, request: pytest.FixtureRequest) -> MovesAfterRead:
    store = MovesAfterRead(redis_client, Keys(namespace), request.param)
    for site in (A, B):
        await store.apply_capacity(capacity(site))
    spec = JobSpec.model_validate({"name": "finetune", "resources": {"arch": "GPU", "models": [MODEL], "count": 8},
                                   "origin": "shanghai", "duration_hours": 1})  # fmt: skip
    await store.submit("j1", spec)
    return store


@pytest.mark.parametrize("racing", ["get_job"], indirect=True)
async def test_cancel_tells_the_site_that_holds_the_job_when_it_is_cancelled(racing: MovesAfterRead, start: Start):  # noqa: F811
    """A job given back by site A and placed at B while the API reads it is cancelled at B, and B is told."""
    assert await placed_at(racing, A) == 1

    async def move() -> None:
        assert await racing.transition("j1", "rejected", A, 1, "no room") == "queued"
        assert await placed_at(racing, B) == 2

    racing.move = move
    api = await start(store=racing, auth=False)
    reply = await api.call("DELETE", "/v1/jobs/j1")
    assert reply.status == 200 and reply.body["state"] == "cancelled"
    published: RecordingPublisher = api.published
    assert [(site, [(a["job"], a["attempt"], a["action"]) for a in m["assignments"]]) for site, m in published.sent] \
        == [(B, [("j1", 2, "cancel")])]  # fmt: skip
    assert (await allocated(racing, A), await allocated(racing, B)) == (0, 0)


@pytest.mark.parametrize("racing", ["get_jobs"], indirect=True)
async def test_requeueing_a_lost_site_leaves_a_newer_attempt_alone(racing: MovesAfterRead):
    """Giving back a site's jobs does not requeue one that was placed there again after they were read."""
    assert await placed_at(racing, A) == 1

    async def move() -> None:
        assert await racing.transition("j1", "rejected", A, 1, "no room") == "queued"
        assert await placed_at(racing, A) == 2

    racing.move = move
    published = RecordingPublisher()
    assert await requeue_site(racing, published, A, "site went offline") == 0
    job = await racing.get_job("j1")
    assert job is not None and (job["state"], job["site"], job["attempt"]) == ("assigned", A, "2")
    assert published.sent == []
    assert await allocated(racing, A) == 8
