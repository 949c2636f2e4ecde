"""Changes of ownership are fenced on what the caller read (holder and attempt): a job that moves between
the read and the write is never acted on as it was. Each test moves the job at that exact moment, through
a store that performs the move right after the read, against a real Redis."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from adapters.ledger import Ledger
from adapters.site import SiteLink
from broker.model.job import JobSpec
from broker.model.records import Placement
from broker.sites.lifecycle import reconcile_site, requeue_site
from broker.state.keys import Keys
from broker.state.store import Store
from common.config import MqttTarget
from common.protocol import Assignment, Assignments, Capacity, SiteEvent, assignments_payload
from tests.http.conftest import start  # noqa: F401  (the API app fixture)
from tests.http.doubles import RecordingPublisher
from tests.http.harness import Start
from tests.support import site_keys

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
    return int(await store.redis.hget((await site_keys(store, site)).capacity(site), f"a:{MODEL}") or 0)


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


async def test_a_run_assigned_after_the_reconcile_list_was_read_is_never_stopped_by_it(
    redis_client: aioredis.Redis, namespace: str
) -> None:
    """A returning site's reconcile list is read; before it reaches the site, another job is placed there
    and its run arrives first. The list must not stop that run (it is stamped older than the run)."""
    store = Store(redis_client, Keys(namespace))
    await store.apply_capacity(capacity(A))
    spec = JobSpec.model_validate({"name": "finetune", "resources": {"arch": "GPU", "models": [MODEL], "count": 8},
                                   "origin": "shanghai", "duration_hours": 1})  # fmt: skip
    for job in ("old", "new"):
        await store.submit(job, spec)
    link = SiteLink(MqttTarget.from_url("mqtt://127.0.0.1:1"), A, "guizhou", capacity(A).pools, cluster="guian")
    ledger = Ledger(link)

    async def place(job: str) -> None:
        (commit,) = await store.allocate([Placement(job, A, "guizhou", MODEL, 8, 12.5, 24.0)], 60_000)
        assert commit.ok, commit
        run = Assignment(job=job, attempt=commit.attempt, model=MODEL, count=8, duration_hours=1, seq=commit.seq)
        ledger.on_assignments(Assignments.model_validate_json(assignments_payload(A, [run])))

    await place("old")
    delivered: list[Assignments] = []

    async def publish(site: str, payload: bytes) -> None:
        await place("new")  # placed after the list was read; its run overtakes the list
        started = ledger.held[("new", 1)].task
        delivered.append(Assignments.model_validate_json(payload))
        ledger.on_assignments(delivered[-1])
        assert ledger.held.get(("new", 1)) is not None and ledger.held[("new", 1)].task is started
        assert started is not None and not started.cancelled()

    try:
        assert await reconcile_site(store, publish, A) == 1
        assert [(a.job, a.attempt) for a in delivered[0].assignments] == [("old", 1)]
        assert set(ledger.held) == {("old", 1), ("new", 1)}
        assert set(await store.jobs_at(A)) == {"old", "new"}
    finally:
        await ledger.close()


async def test_reconcile_reports_work_the_site_lost_so_it_is_queued_again(
    redis_client: aioredis.Redis, namespace: str
) -> None:
    """An adapter that restarted holds nothing; the broker's list names a running job: the site reports it
    lost, and the job goes back to the queue instead of counting as running there forever."""
    store = Store(redis_client, Keys(namespace))
    await store.apply_capacity(capacity(A))
    spec = JobSpec.model_validate({"name": "finetune", "resources": {"arch": "GPU", "models": [MODEL], "count": 8},
                                   "origin": "shanghai", "duration_hours": 1})  # fmt: skip
    await store.submit("lost", spec)
    (commit,) = await store.allocate([Placement("lost", A, "guizhou", MODEL, 8, 12.5, 24.0)], 60_000)
    assert await store.transition("lost", "running", A, commit.attempt) == "running"
    link = SiteLink(MqttTarget.from_url("mqtt://127.0.0.1:1"), A, "guizhou", capacity(A).pools, cluster="guian")
    ledger = Ledger(link)  # a fresh process: it holds nothing

    async def publish(site: str, payload: bytes) -> None:
        ledger.on_assignments(Assignments.model_validate_json(payload))

    await reconcile_site(store, publish, A)
    events = [SiteEvent.model_validate_json(m) for m in link.undelivered()]
    assert [(e.job, e.attempt, e.event.value) for e in events] == [("lost", 1, "lost")]
    assert await store.transition("lost", "lost", A, 1, events[0].reason or "") == "queued"
    assert await allocated(store, A) == 0
