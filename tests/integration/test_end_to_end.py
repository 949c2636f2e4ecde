"""The whole broker end to end: sites over real MQTT, users over real HTTP, operators over SSE and the mirror.

Each test runs its own in-process broker (`start_broker`) against the session Redis under its own key
namespace and its own Mosquitto (MQTT topics are not namespaced, so sites of one test must not reach
another test's broker).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
import aiomqtt
import orjson
import pytest
import redis.asyncio as aioredis

from adapters.sim import run_sim
from adapters.site import SiteLink
from broker.service import Broker, start_broker
from broker.state.events import MIRROR_GROUP, decode_event
from broker.state.keys import Keys
from common import topics
from common.config import MqttTarget, Settings
from common.protocol import CAPACITY_SCHEMA, EVENT_SCHEMA, Assignment, Assignments
from suanwang.servers import MosquittoServer, RedisClusterGroup, RedisServer
from tests.support import eventually, linked, running_broker

# every test here runs on one Redis and on a real three-master Redis Cluster (tests/conftest.py `redis_target`)
pytestmark = pytest.mark.parametrize("redis_kind", ["redis", "cluster"])

WAIT = 15.0  # seconds any single expected outcome may take before the test fails
HUB, CLUSTER, ORIGIN = "guizhou", "guian", "guiyang"
GPU_MODEL = "A100-80G"

T = TypeVar("T")


# --------------------------------------------------------------------------- helpers


async def close_persistently(broker: Broker, patience: float = 0.5) -> str:
    """`broker.close()`, cancelling the replica's tasks again whenever it has waited `patience` seconds.

    Returns the stacks of the tasks that outlived the first `patience` seconds ('' when none did). The
    fixtures use this to work around the shutdown hang that
    `test_broker_closes_promptly_while_sites_go_offline` exposes: a cancellation swallowed inside a
    message handler leaves the MQTT task reading messages forever.
    """
    closing = asyncio.create_task(broker.close())
    stacks = io.StringIO()
    while not (await asyncio.wait([closing], timeout=patience))[0]:
        for task in broker.tasks:
            if not task.done():
                if not stacks.tell():
                    task.print_stack(file=stacks)
                task.cancel()
    closing.result()
    return stacks.getvalue()


@pytest.fixture
async def broker(redis_target: RedisServer | RedisClusterGroup, own_mosquitto: MosquittoServer, namespace: str
                 ) -> AsyncIterator[Broker]:  # fmt: skip
    async with running_broker(redis_target, own_mosquitto, namespace) as running:
        yield running


@pytest.fixture
async def http(broker: Broker) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=broker.url) as session:
        yield session


async def get_json(http: aiohttp.ClientSession, path: str) -> tuple[int, Any]:
    async with http.get(path) as response:
        return response.status, orjson.loads(await response.read())


def job_body(count: int = 1, *, arch: str = "GPU", models: tuple[str, ...] = (GPU_MODEL,), **extra: Any
             ) -> dict[str, Any]:  # fmt: skip
    return {"name": "e2e", "workload": "training", "resources": {"arch": arch, "models": list(models), "count": count},
            "origin": ORIGIN, "duration_hours": 1, **extra}  # fmt: skip


async def submit(http: aiohttp.ClientSession, body: dict[str, Any]) -> str:
    async with http.post("/v1/jobs", json=body) as response:
        payload = orjson.loads(await response.read())
        assert response.status == 202, payload
    assert payload["state"] == "queued"
    return str(payload["id"])


async def job_when(http: aiohttp.ClientSession, job_id: str, check: Callable[[dict[str, Any]], bool],
                   timeout: float = WAIT) -> dict[str, Any]:  # fmt: skip
    """The job as GET /v1/jobs/{id} shows it, once `check` holds."""

    async def probe() -> dict[str, Any] | None:
        status, view = await get_json(http, f"/v1/jobs/{job_id}")
        assert status == 200, view
        return view if check(view) else None

    return await eventually(probe, f"job {job_id} to satisfy {check}", timeout)


async def site_when(http: aiohttp.ClientSession, site: str, check: Callable[[dict[str, Any]], bool]
                    ) -> dict[str, Any]:  # fmt: skip
    async def probe() -> dict[str, Any] | None:
        status, view = await get_json(http, f"/v1/sites/{site}")
        return view if status == 200 and check(view) else None

    return await eventually(probe, what=f"site {site}")


def pool_of(site_view: dict[str, Any], model: str) -> dict[str, Any]:
    return next(p for p in site_view["pools"] if p["model"] == model)


async def job_events(broker: Broker, job_id: str) -> list[dict[str, Any]]:
    """The job's entries in the event log (the Redis stream), oldest first."""
    rows = await broker.store.redis.xrange(broker.store.keys.only.events)
    return [e for e in (decode_event(i, f) for i, f in rows) if e.get("job") == job_id]


def gpu_pool(total: int, model: str = GPU_MODEL, price: float = 10.0) -> dict[str, Any]:
    return {"arch": "GPU", "model": model, "memory_gb": 80, "total": total, "in_use_external": 0, "per_node": 8,
            "price_cny_per_hour": price}  # fmt: skip


# --------------------------------------------------------------------------- SSE


@dataclass
class SseStream:
    response: aiohttp.ClientResponse

    async def next(self, timeout: float = WAIT) -> tuple[str, dict[str, Any]]:
        """The next event as (SSE id, decoded data); comments and `retry:` lines are skipped."""
        event_id, data = "", b""
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.response.content.readline()
                if not raw:
                    raise AssertionError("SSE stream ended")
                line = raw.rstrip(b"\r\n")
                if line.startswith(b"id: "):
                    event_id = line[4:].decode()
                elif line.startswith(b"data: "):
                    data = line[6:]
                elif not line and data:
                    return event_id, orjson.loads(data)

    async def until(self, check: Callable[[dict[str, Any]], bool], timeout: float = WAIT) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                _, event = await self.next(timeout)
                if check(event):
                    return event


@asynccontextmanager
async def sse(http: aiohttp.ClientSession, last_event_id: str | None = None) -> AsyncIterator[SseStream]:
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    async with http.get("/v1/allocations/stream", headers=headers,
                        timeout=aiohttp.ClientTimeout(total=None, sock_read=None)) as response:  # fmt: skip
        assert response.status == 200
        assert response.content_type == "text/event-stream"
        # The preamble comment proves the handler subscribed to the live feed before we act.
        assert (await asyncio.wait_for(response.content.readline(), WAIT)).startswith(b": ")
        yield SseStream(response)


# --------------------------------------------------------------------------- hand-driven sites


Answer = Callable[["HandSite", Assignment], None]


def accept(site: HandSite, item: Assignment) -> None:
    site.link.emit(item.job, item.attempt, "accepted")
    site.link.emit(item.job, item.attempt, "running")


def silent(_site: HandSite, _item: Assignment) -> None:
    return None


@dataclass
class HandSite:
    """A real MQTT site whose answers the test chooses; it records every assignment it receives."""

    link: SiteLink
    answer: Answer
    runs: list[Assignment] = field(default_factory=list)
    cancels: list[Assignment] = field(default_factory=list)

    def on_assignments(self, batch: Assignments) -> None:
        for item in batch.assignments:
            if item.action == "cancel":
                self.cancels.append(item)
            else:
                self.runs.append(item)
                self.answer(self, item)


@asynccontextmanager
async def hand_site(mqtt: MosquittoServer, site: str, pools: list[dict[str, Any]], answer: Answer = accept
                    ) -> AsyncIterator[HandSite]:  # fmt: skip
    link = SiteLink(MqttTarget.from_url(mqtt.url), site, HUB, pools, cluster=CLUSTER, interval=1.0)
    hand = HandSite(link, answer)
    link.on_assignments = hand.on_assignments
    async with linked(link):
        yield hand


async def online(http: aiohttp.ClientSession, site: str, model: str = GPU_MODEL, total: int | None = None
                 ) -> dict[str, Any]:  # fmt: skip
    """Wait until the broker lists `site` online (with `total` devices of `model`, if given)."""
    return await site_when(
        http, site,
        lambda v: v["status"] == "online" and any(
            p["model"] == model and (total is None or p["total"] == total) for p in v["pools"]),
    )  # fmt: skip


@asynccontextmanager
async def mqtt_client(mqtt: MosquittoServer) -> AsyncIterator[aiomqtt.Client]:
    async with aiomqtt.Client("127.0.0.1", mqtt.port, identifier=f"test-{uuid.uuid4().hex[:8]}") as client:
        yield client


# --------------------------------------------------------------------------- the end-to-end path


async def test_job_flows_from_submit_to_completed_and_capacity_returns(
    broker: Broker, http: aiohttp.ClientSession, own_mosquitto: MosquittoServer
) -> None:
    """A job submitted over HTTP is allocated on a simulated site (seen on SSE), completes, and frees its devices."""
    stop = asyncio.Event()
    sim = asyncio.create_task(run_sim(MqttTarget.from_url(own_mosquitto.url), HUB, 2, time_scale=7200.0,
                                      interval=0.5, stop=stop))  # fmt: skip
    try:
        model = "Ascend-910B"  # both seeded guizhou sites have free Ascend-910B
        for site in ("guian-01", "guian-02"):
            await online(http, site, model)
        _, listed = await get_json(http, "/v1/sites")
        before = {s["id"]: pool_of(s, model) for s in listed["sites"]}
        async with sse(http) as stream:
            job_id = await submit(http, job_body(8, arch="ASIC", models=(model,)))
            allocated = await stream.until(lambda e: e.get("job") == job_id and e["type"] == "allocated")
            assert allocated["site"] in before
            assert (allocated["model"], allocated["count"], allocated["attempt"]) == (model, 8, 1)
            assert allocated["state"] == "assigned" and allocated["hub"] == HUB
            completed = await stream.until(lambda e: e.get("job") == job_id and e["type"] == "completed", timeout=30)
            assert completed["site"] == allocated["site"]
        view = await job_when(http, job_id, lambda j: j["state"] == "completed", timeout=30)
        assert view["allocation"]["site"] == allocated["site"] and view["allocation"]["devices"] == 8
        assert view["finished"]
        kinds = [e["type"] for e in await job_events(broker, job_id)]
        assert kinds == ["queued", "allocated", "accepted", "running", "released", "completed"]
        _, after = await get_json(http, f"/v1/sites/{allocated['site']}")
        pool = pool_of(after, model)
        assert pool["allocated"] == before[allocated["site"]]["allocated"]
        assert pool["free"] == before[allocated["site"]]["free"]
    finally:
        stop.set()
        await asyncio.wait_for(sim, 15)


async def test_sse_resumes_after_last_event_id_without_gaps_or_duplicates(
    broker: Broker, http: aiohttp.ClientSession, namespace: str
) -> None:
    """Reconnecting with Last-Event-ID yields exactly the logged events after that id, then live ones."""
    async with sse(http) as stream:
        for _ in range(5):
            await submit(http, job_body())
        seen = [await stream.next() for _ in range(5)]
    for event_id, event in seen:
        assert event["id"] == event_id and event["type"] == "queued"
    resume_from = seen[1][0]
    for _ in range(3):  # logged while nobody listens
        await submit(http, job_body())
    async with sse(http, resume_from) as stream:
        for _ in range(2):  # logged while the backlog is being replayed or just after
            await submit(http, job_body())
        rows = await broker.store.redis.xrange(Keys(namespace).only.events, f"({resume_from}", "+")
        expected = [i.decode() for i, _ in rows]
        assert len(expected) == 3 + 3 + 2
        got = [await stream.next() for _ in expected]
        assert [i for i, _ in got] == expected
        assert [e for _, e in got] == [decode_event(i, f) for i, f in rows]
        sentinel = await submit(http, job_body())
        next_id, next_event = await stream.next()
    assert next_event["job"] == sentinel, "an event was delivered twice or out of order"
    assert next_id not in expected


async def _mirror_ready(broker: Broker, namespace: str) -> None:
    """Wait until the broker's mirror has made its consumer group (events before it would not be mirrored)."""
    redis = broker.store.redis

    async def mirror_group_exists() -> bool:
        # XPENDING rather than XINFO GROUPS, whose key redis-py's cluster client cannot find
        with contextlib.suppress(aioredis.ResponseError):  # NOGROUP: not made yet
            await redis.xpending(Keys(namespace).only.events, MIRROR_GROUP)
            return True
        return False

    await eventually(mirror_group_exists, what="the mirror consumer group")


async def test_events_are_mirrored_on_the_mqtt_allocations_topic(
    broker: Broker, http: aiohttp.ClientSession, own_mosquitto: MosquittoServer, namespace: str
) -> None:
    """Every logged event appears once, in order, on `suanwang/v1/allocations`."""
    await _mirror_ready(broker, namespace)
    async with mqtt_client(own_mosquitto) as watcher, hand_site(own_mosquitto, "mirror-1", [gpu_pool(8)]):
        await watcher.subscribe(topics.ALLOCATIONS, qos=1)
        await online(http, "mirror-1")
        jobs = [await submit(http, job_body(2)) for _ in range(3)]
        for job_id in jobs:
            await job_when(http, job_id, lambda j: j["state"] == "running")
        rows = await broker.store.redis.xrange(Keys(namespace).only.events)
        expected = [decode_event(i, f) for i, f in rows]
        assert {e["type"] for e in expected} >= {"queued", "allocated", "accepted", "running"}
        mirrored: list[dict[str, Any]] = []
        async with asyncio.timeout(WAIT):
            async for message in watcher.messages:
                mirrored.append(orjson.loads(message.payload))  # type: ignore[arg-type]
                if len(mirrored) == len(expected):
                    break
    assert mirrored == expected


# --------------------------------------------------------------------------- bad input never breaks anything


_VALID = job_body()
BAD_JOBS: list[tuple[str, bytes, str, int, str | None, str | None]] = [
    # (case, body, content type, status, error.field, error.code or None for "any")
    ("missing resources", orjson.dumps({"origin": ORIGIN, "duration_hours": 1}), "application/json", 400,
     "resources", "invalid"),
    ("count 0", orjson.dumps({**_VALID, "resources": {"arch": "GPU", "count": 0}}), "application/json", 400,
     "resources.count", "invalid"),
    ("unknown origin", orjson.dumps({**_VALID, "origin": "atlantis"}), "application/json", 400, "origin", "invalid"),
    ("unknown arch", orjson.dumps({**_VALID, "resources": {"arch": "TPU", "count": 1}}), "application/json", 400,
     "resources.arch", "invalid"),
    ("unknown field", orjson.dumps({**_VALID, "colour": "red"}), "application/json", 400, "colour", "invalid"),
    ("negative duration", orjson.dumps({**_VALID, "duration_hours": -1}), "application/json", 400,
     "duration_hours", "invalid"),
    ("bad priority", orjson.dumps({**_VALID, "priority": "urgent"}), "application/json", 400, "priority", "invalid"),
    ("not JSON", b"{not json", "application/json", 400, None, "malformed_json"),
    ("not UTF-8", b'{"name": "\xff\xfe"}', "application/json", 400, None, "malformed_json"),
    ("nested too deep", b"[" * 5000 + b"]" * 5000, "application/json", 400, None, "malformed_json"),
    ("JSON array", b"[]", "application/json", 400, None, "invalid"),
    ("JSON null", b"null", "application/json", 400, None, "invalid"),
    ("empty body", b"", "application/json", 400, None, "malformed_json"),
    ("wrong content type", orjson.dumps(_VALID), "text/plain", 415, None, "unsupported_media_type"),
    ("form content type", b"name=x", "application/x-www-form-urlencoded", 415, None, "unsupported_media_type"),
    ("over 64 KiB", orjson.dumps({**_VALID, "name": "x" * (70 * 1024)}), "application/json", 413, None,
     "too_large"),
]  # fmt: skip

BAD_QUERIES: list[tuple[str, str, str, int, str | None]] = [
    ("GET", "/v1/jobs/j-no-such-job", "unknown job", 404, None),
    ("DELETE", "/v1/jobs/j-no-such-job", "cancel unknown job", 404, None),
    ("GET", "/v1/jobs?limit=0", "limit 0", 400, "limit"),
    ("GET", "/v1/jobs?limit=1001", "limit too high", 400, "limit"),
    ("GET", "/v1/jobs?limit=ten", "limit not a number", 400, "limit"),
    ("GET", "/v1/jobs?state=sleeping", "unknown state", 400, "state"),
    ("GET", "/v1/sites/no-such-site", "unknown site", 404, None),
    ("GET", "/v1/allocations/stream?last_event_id=yesterday", "bad Last-Event-ID", 400, "Last-Event-ID"),
    ("PUT", "/v1/jobs", "wrong method", 405, None),
    ("GET", "/v1/nothing-here", "unknown path", 404, None),
]


def error_body(raw: bytes) -> Any:
    """The decoded JSON body, or the raw bytes when the server did not answer in JSON."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw[:200]


async def test_bad_http_input_gets_a_4xx_naming_the_field(http: aiohttp.ClientSession) -> None:
    """Each bad request gets the documented 4xx with `{"error": {code, message, field}}`, never a 5xx."""
    failures: list[str] = []
    for case, body, content_type, status, error_field, code in BAD_JOBS:
        async with http.post("/v1/jobs", data=body, headers={"Content-Type": content_type}) as response:
            payload = error_body(await response.read())
        error = payload.get("error", {}) if isinstance(payload, dict) else {}
        got = (response.status, error.get("field"), error.get("code"))
        if got != (status, error_field, code) or not error.get("message"):
            failures.append(f"POST {case}: expected {(status, error_field, code)}, got {got} {payload}")
    for method, path, case, status, error_field in BAD_QUERIES:
        async with http.request(method, path) as response:
            payload = error_body(await response.read())
        error = payload.get("error", {}) if isinstance(payload, dict) else {}
        if (response.status, error.get("field")) != (status, error_field) or not error.get("message"):
            failures.append(
                f"{method} {path} ({case}): expected {(status, error_field)}, got {response.status} {payload}"
            )
    assert not failures, "\n".join(failures)
    # The broker still takes a valid job afterwards.
    await submit(http, job_body())


async def test_malformed_mqtt_messages_are_dropped_and_ingest_keeps_working(
    broker: Broker, http: aiohttp.ClientSession, own_mosquitto: MosquittoServer
) -> None:
    """Garbage, wrong schemas, a site/topic mismatch and a negative total are dropped; a valid site still gets work."""

    def capacity(site: str, **changes: Any) -> dict[str, Any]:
        body = {"schema": CAPACITY_SCHEMA, "site": site, "hub": HUB, "cluster": CLUSTER, "seq": 1,
                "pools": [gpu_pool(8)]}  # fmt: skip
        return {**body, **changes}

    negative = capacity("bad-e")
    negative["pools"] = [{**gpu_pool(8), "total": -5}]
    event = {"schema": EVENT_SCHEMA, "site": "bad-h", "job": "j-unknown", "attempt": 1, "event": "accepted"}
    garbage: list[tuple[str, bytes]] = [
        (topics.capacity("bad-a"), b"\x00\xff{not json"),
        (topics.capacity("bad-b"), orjson.dumps(capacity("bad-b", schema="suanwang.capacity/9"))),
        (topics.capacity("bad-c"), orjson.dumps(capacity("bad-d"))),  # the payload names another site
        (topics.capacity("bad-e"), orjson.dumps(negative)),
        (topics.capacity("bad-f"), b"[1, 2, 3]"),
        (topics.capacity("Bad Site"), orjson.dumps(capacity("bad-g"))),  # not an identifier either way
        (topics.status("bad-g"), b"maybe"),
        (topics.status("bad-g"), b"\xff\xfe"),
        (topics.events("bad-h"), b"{}"),
        (topics.events("bad-h"), orjson.dumps({**event, "site": "bad-i"})),
        (topics.events("bad-h"), orjson.dumps(event)),  # well formed, but for a job nobody knows
        ("suanwang/v1/sites/bad-j/capacity/extra", b"{}"),
    ]
    async with mqtt_client(own_mosquitto) as client:
        for topic, payload in garbage:
            await client.publish(topic, payload, qos=1)
        # A valid message from the same connection comes after all of the above (per-client ordering).
        probe = capacity("probe-1", pools=[{**gpu_pool(4), "arch": "CPU", "model": "Xeon-8480", "memory_gb": 512}])
        await client.publish(topics.capacity("probe-1"), orjson.dumps(probe), qos=1)
    await online(http, "probe-1", "Xeon-8480")
    for site in ("bad-a", "bad-b", "bad-c", "bad-d", "bad-e", "bad-f", "bad-g", "bad-h", "bad-j"):
        status, body = await get_json(http, f"/v1/sites/{site}")
        assert status == 404, (site, body)
    async with hand_site(own_mosquitto, "good-1", [gpu_pool(8)]) as site:
        await online(http, "good-1")
        job_id = await submit(http, job_body(4))
        view = await job_when(http, job_id, lambda j: j["state"] == "running")
    assert view["allocation"]["site"] == "good-1"
    assert [(a.job, a.attempt) for a in site.runs] == [(job_id, 1)]
    _, health = await get_json(http, "/healthz")
    assert health["mqtt"] is True


# --------------------------------------------------------------------------- waiting, cancelling, re-matching


async def test_queued_job_explains_why_and_can_be_cancelled_once(
    broker: Broker, http: aiohttp.ClientSession, own_mosquitto: MosquittoServer
) -> None:
    """A job nobody can fit stays queued saying why; DELETE cancels it and a second DELETE is a 409."""
    async with hand_site(own_mosquitto, "small-1", [gpu_pool(8)]):
        await online(http, "small-1")
        job_id = await submit(http, job_body(100_000))
        view = await job_when(http, job_id, lambda j: "fewer than" in j.get("waiting", ""))
        assert view["state"] == "queued" and view["allocation"] is None
        assert "100000" in view["waiting"]
        async with http.delete(f"/v1/jobs/{job_id}") as response:
            assert response.status == 200
            assert (await response.json())["state"] == "cancelled"
        async with http.delete(f"/v1/jobs/{job_id}") as response:
            assert response.status == 409
            assert (await response.json())["error"]["code"] == "conflict"
        _, view = await get_json(http, f"/v1/jobs/{job_id}")
        assert view["state"] == "cancelled" and "waiting" not in view
        assert await broker.store.redis.zscore(broker.store.keys.only.queue, job_id) is None


async def test_waiting_job_is_placed_when_a_site_grows(
    broker: Broker, http: aiohttp.ClientSession, own_mosquitto: MosquittoServer
) -> None:
    """A job too big for every site is placed as soon as a site reports enough capacity."""
    async with hand_site(own_mosquitto, "grow-1", [gpu_pool(4)]) as site:
        await online(http, "grow-1", total=4)
        job_id = await submit(http, job_body(8))
        await job_when(http, job_id, lambda j: "fewer than 8" in j.get("waiting", ""))
        site.link.set_capacity([gpu_pool(16)])
        view = await job_when(http, job_id, lambda j: j["state"] == "running")
        pool = pool_of(await online(http, "grow-1", total=16), GPU_MODEL)
    assert view["allocation"]["site"] == "grow-1" and view["allocation"]["devices"] == 8
    assert [(a.job, a.attempt, a.count) for a in site.runs] == [(job_id, 1, 8)]
    assert (pool["allocated"], pool["free"]) == (8, 8)


async def test_rejected_assignment_returns_to_queue_and_is_placed_again(
    broker: Broker, http: aiohttp.ClientSession, own_mosquitto: MosquittoServer
) -> None:
    """A site rejecting attempt 1 sends the job back to the queue; attempt 2 is placed and runs."""

    def reject_first(site: HandSite, item: Assignment) -> None:
        if item.attempt == 1:
            site.link.emit(item.job, item.attempt, "rejected", "disk full")
        else:
            accept(site, item)

    async with hand_site(own_mosquitto, "picky-1", [gpu_pool(8)], reject_first) as site:
        await online(http, "picky-1")
        job_id = await submit(http, job_body(6))
        view = await job_when(http, job_id, lambda j: j["state"] == "running")
        pool = pool_of((await get_json(http, "/v1/sites/picky-1"))[1], GPU_MODEL)
        # read while the site is still there: leaving this block takes it offline, which requeues the job
        events = await job_events(broker, job_id)
    assert view["attempts"] == 2 and view["allocation"]["attempt"] == 2
    assert [(a.job, a.attempt) for a in site.runs] == [(job_id, 1), (job_id, 2)]
    assert [e["type"] for e in events] == [
        "queued", "allocated", "released", "requeued", "allocated", "accepted", "running"]  # fmt: skip
    assert next(e for e in events if e["type"] == "requeued")["reason"] == "disk full"
    assert pool["allocated"] == 6, "the rejected attempt's devices must not stay counted"


async def test_site_going_offline_returns_its_jobs_to_the_queue(
    broker: Broker, http: aiohttp.ClientSession, own_mosquitto: MosquittoServer
) -> None:
    """A retained `offline` status requeues the site's running job, cancels it there, and another site takes it."""
    async with hand_site(own_mosquitto, "doomed-1", [gpu_pool(8)]) as doomed:
        await online(http, "doomed-1")
        job_id = await submit(http, job_body(4))
        await job_when(http, job_id, lambda j: j["state"] == "running")
        async with mqtt_client(own_mosquitto) as operator:
            await operator.publish(topics.status("doomed-1"), b"offline", qos=1, retain=True)
        view = await job_when(http, job_id, lambda j: j["state"] == "queued")
        assert view["last_site"] == "doomed-1" and "offline" in view["waiting"]
        site = await site_when(http, "doomed-1", lambda v: v["status"] == "offline")
        assert pool_of(site, GPU_MODEL)["allocated"] == 0
        await eventually(lambda: _async(doomed.cancels), what="a cancel sent to the offline site")
        assert [(c.job, c.attempt) for c in doomed.cancels] == [(job_id, 1)]
        async with hand_site(own_mosquitto, "rescue-1", [gpu_pool(8)]) as rescue:
            view = await job_when(http, job_id, lambda j: j["state"] == "running")
    assert view["allocation"]["site"] == "rescue-1" and view["attempts"] == 2
    assert [(a.job, a.attempt) for a in rescue.runs] == [(job_id, 2)]
    assert [(a.job, a.attempt) for a in doomed.runs] == [(job_id, 1)]


async def _async(value: T) -> T:
    return value


async def test_unanswered_assignment_expires_after_the_accept_timeout(
    redis_target: RedisServer | RedisClusterGroup, own_mosquitto: MosquittoServer, namespace: str
) -> None:
    """With accept_timeout_s=1 an assignment the site never answers goes back to the queue after about 1 s."""
    async with (
        running_broker(redis_target, own_mosquitto, namespace, accept_timeout_s=1.0) as broker,
        aiohttp.ClientSession(base_url=broker.url) as http,
        hand_site(own_mosquitto, "mute-1", [gpu_pool(8)], silent) as site,
    ):
        await online(http, "mute-1")
        job_id = await submit(http, job_body(2))

        async def requeued() -> list[dict[str, Any]] | None:
            events = await job_events(broker, job_id)
            return events if any(e["type"] == "requeued" for e in events) else None

        events = await eventually(requeued, what="the unaccepted assignment to return to the queue")
        allocated = next(e for e in events if e["type"] == "allocated")
        back = next(e for e in events if e["type"] == "requeued")
        assert allocated["attempt"] == 1 and back["attempt"] == 1
        assert "did not accept" in back["reason"]
        assert 1000 <= back["ts"] - allocated["ts"] < 4000
        await eventually(lambda: _async(site.cancels), what="the site to be told to drop the expired attempt")
        assert (site.cancels[0].job, site.cancels[0].attempt) == (job_id, 1)
        view = await job_when(http, job_id, lambda j: j["attempts"] >= 2)
        assert view["state"] in ("queued", "assigned")


async def test_healthz_reports_redis_and_mqtt_up(http: aiohttp.ClientSession) -> None:
    """/healthz answers 200 with redis and mqtt both true."""
    status, body = await get_json(http, "/healthz")
    assert status == 200
    assert body == {"status": "ok", "redis": True, "mqtt": True}


async def test_broker_closes_promptly_while_sites_go_offline(
    redis_target: RedisServer | RedisClusterGroup, own_mosquitto: MosquittoServer, namespace: str
) -> None:
    """`Broker.close()` returns within seconds even while it is handling a site's `offline` (no shutdown hang)."""
    hangs: list[str] = []
    for round_ in range(4):
        settings = Settings(redis_url=redis_target.url, mqtt_url=own_mosquitto.url, http="127.0.0.1:0",
                            namespace=f"{namespace}-{round_}")  # fmt: skip
        broker = await start_broker(settings)
        try:
            async with aiohttp.ClientSession(base_url=broker.url) as http:
                async with hand_site(own_mosquitto, f"leaving-{round_}", [gpu_pool(8)]):
                    await online(http, f"leaving-{round_}")
                    job_id = await submit(http, job_body(2))
                    await job_when(http, job_id, lambda j: j["state"] == "running")
                # The site has just said `offline`: the broker requeues the job and tells the site to cancel.
        finally:
            stuck = await close_persistently(broker, patience=3.0)
        if stuck:
            hangs.append(f"round {round_}: close() still waiting after 3 s on:\n{stuck}")
    assert not hangs, "\n".join(hangs)


async def test_the_batch_mirror_carries_every_event_once_in_order(
    redis_target: RedisServer | RedisClusterGroup, own_mosquitto: MosquittoServer, namespace: str
) -> None:
    """With `mirror=batches`, each read of the log is one message on `allocations/batch` (a JSON array) and
    nothing is published per event; together the arrays are the log, in order."""
    async with (
        running_broker(redis_target, own_mosquitto, namespace, mirror="batches") as broker,
        aiohttp.ClientSession(base_url=broker.url) as http,
        mqtt_client(own_mosquitto) as watcher,
    ):
        await _mirror_ready(broker, namespace)
        await watcher.subscribe(topics.ALLOCATIONS_BATCH, qos=1)
        await watcher.subscribe(topics.ALLOCATIONS, qos=1)
        async with hand_site(own_mosquitto, "mirror-b", [gpu_pool(16)]):
            await online(http, "mirror-b")
            jobs = [await submit(http, job_body(2)) for _ in range(4)]
            for job_id in jobs:
                await job_when(http, job_id, lambda j: j["state"] == "running")
            expected = [decode_event(i, f) for i, f in await broker.store.redis.xrange(Keys(namespace).only.events)]
            mirrored: list[dict[str, Any]] = []
            messages = 0
            async with asyncio.timeout(WAIT):
                async for message in watcher.messages:
                    assert str(message.topic) == topics.ALLOCATIONS_BATCH, "an event was published on its own"
                    mirrored += orjson.loads(message.payload)  # type: ignore[arg-type]
                    messages += 1
                    if len(mirrored) >= len(expected):
                        break
    assert mirrored == expected
    assert messages < len(expected)  # many events to a message
