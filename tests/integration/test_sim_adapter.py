"""Simulated site adapter against a real Mosquitto: status, capacity, assignments in, events out."""

from __future__ import annotations

import asyncio
import re
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiomqtt
import orjson
import pytest

from adapters.fleet import all_sites, sites_for_hub
from adapters.sim import run_sim
from common import topics
from common.config import MqttTarget
from common.protocol import ASSIGNMENTS_SCHEMA, Capacity, Pool, SiteEvent
from common.validation import parse
from regions import load_fleet
from suanwang.servers import MosquittoServer

REPO = Path(__file__).resolve().parents[2]
HUB = "guizhou"
WAIT = 10.0  # seconds any single expected message may take before the test fails


# --------------------------------------------------------------------------- helpers


@asynccontextmanager
async def sim(server: MosquittoServer, sites: int = 1, **kwargs: Any) -> AsyncIterator[asyncio.Event]:
    """Run `run_sim` for HUB in the background; stop it gracefully on exit."""
    stop = asyncio.Event()
    task = asyncio.create_task(run_sim(MqttTarget.from_url(server.url), HUB, sites, stop=stop, **kwargs))
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


@asynccontextmanager
async def broker_side(server: MosquittoServer, *filters: str) -> AsyncIterator[aiomqtt.Client]:
    """An MQTT client playing the broker, subscribed to `filters` at QoS 1."""
    async with aiomqtt.Client("127.0.0.1", server.port, identifier=f"test-{uuid.uuid4().hex[:8]}") as client:
        for topic_filter in filters:
            await client.subscribe(topic_filter, qos=1)
        yield client


async def next_message(
    client: aiomqtt.Client, match: Callable[[aiomqtt.Message], bool] = lambda _m: True, timeout: float = WAIT
) -> aiomqtt.Message:
    async with asyncio.timeout(timeout):
        async for message in client.messages:
            if match(message):
                return message
    raise AssertionError("message stream ended")


def status_is(site: str, value: bytes) -> Callable[[aiomqtt.Message], bool]:
    return lambda m: m.topic.matches(topics.status(site)) and m.payload == value


async def next_event(client: aiomqtt.Client, site: str, timeout: float = WAIT) -> SiteEvent:
    message = await next_message(client, lambda m: m.topic.matches(topics.events(site)), timeout)
    return parse(SiteEvent, message.payload)  # type: ignore[arg-type]


def assignment(site: str, job: str, model: str, count: int = 1, *, attempt: int = 1, hours: float = 0.2) -> bytes:
    body = {
        "schema": ASSIGNMENTS_SCHEMA, "site": site,
        "assignments": [{"job": job, "attempt": attempt, "action": "run", "model": model, "count": count,
                         "duration_hours": hours, "name": job, "workload": "batch"}],
    }  # fmt: skip
    return orjson.dumps(body)


def first_free_pool(site_index: int = 0) -> tuple[str, Pool]:
    site = sites_for_hub(HUB, site_index + 1)[site_index]
    pools = [Pool.model_validate(dict(p)) for p in site.pools]
    return site.id, next(p for p in pools if p.total - p.in_use_external >= 1)


async def online_site(server: MosquittoServer, client: aiomqtt.Client, site: str) -> None:
    """Wait until `site` says `online` (it subscribes to assignments before saying so)."""
    await client.subscribe(topics.status(site), qos=1)
    await next_message(client, status_is(site, b"online"))


# --------------------------------------------------------------------------- (a) status and capacity


async def test_sites_publish_retained_online_and_growing_capacity_seq(own_mosquitto: MosquittoServer) -> None:
    """Two guizhou sites publish retained `online` and retained, valid capacity whose seq grows per heartbeat."""
    site_ids = [s.id for s in sites_for_hub(HUB, 2)]
    async with (
        broker_side(own_mosquitto, "suanwang/v1/sites/+/capacity") as watcher,
        sim(own_mosquitto, 2, interval=0.2),
    ):
        seqs: dict[str, list[int]] = {site: [] for site in site_ids}
        async with asyncio.timeout(WAIT):
            async for message in watcher.messages:
                cap = parse(Capacity, message.payload)  # type: ignore[arg-type]
                assert cap.hub == HUB
                seqs[cap.site].append(cap.seq)
                if all(len(v) >= 3 for v in seqs.values()):
                    break
        for values in seqs.values():
            assert values == sorted(values) and len(set(values)) == len(values), values

        # A newcomer (a restarting broker) must find both messages retained.
        async with broker_side(own_mosquitto, "suanwang/v1/sites/+/status", "suanwang/v1/sites/+/capacity") as late:
            seen: dict[tuple[str, str], aiomqtt.Message] = {}
            async with asyncio.timeout(WAIT):
                async for message in late.messages:
                    parts = topics.site_of(message.topic.value)
                    assert parts is not None
                    seen.setdefault(parts, message)
                    if len(seen) == 4:
                        break
        for site in site_ids:
            assert seen[(site, "status")].retain and seen[(site, "status")].payload == b"online"
            assert seen[(site, "capacity")].retain
            assert parse(Capacity, seen[(site, "capacity")].payload).site == site  # type: ignore[arg-type]


# --------------------------------------------------------------------------- (b)-(e) assignments


async def test_assignment_runs_accepted_running_completed(own_mosquitto: MosquittoServer) -> None:
    """A runnable assignment yields accepted, running, completed in that order, all with its attempt."""
    site, pool = first_free_pool()
    async with broker_side(own_mosquitto, topics.events(site)) as client, sim(own_mosquitto, 1):
        await online_site(own_mosquitto, client, site)
        await client.publish(topics.assignments(site), assignment(site, "job-b", pool.model, attempt=3), qos=1)
        events = [await next_event(client, site) for _ in range(3)]
    assert [e.event for e in events] == ["accepted", "running", "completed"]
    assert {(e.job, e.attempt, e.site) for e in events} == {("job-b", 3, site)}


async def test_assignment_beyond_pool_is_rejected_with_reason(own_mosquitto: MosquittoServer) -> None:
    """An assignment for more devices than the pool has is rejected with a reason."""
    site, pool = first_free_pool()
    async with broker_side(own_mosquitto, topics.events(site)) as client, sim(own_mosquitto, 1):
        await online_site(own_mosquitto, client, site)
        body = assignment(site, "job-c", pool.model, count=pool.total + 1)
        await client.publish(topics.assignments(site), body, qos=1)
        event = await next_event(client, site)
    assert (event.job, event.event) == ("job-c", "rejected")
    assert event.reason and pool.model in event.reason


async def test_duplicate_assignment_is_accepted_once(own_mosquitto: MosquittoServer) -> None:
    """The same (job, attempt) delivered twice produces a single accepted event."""
    site, pool = first_free_pool()
    async with broker_side(own_mosquitto, topics.events(site)) as client, sim(own_mosquitto, 1):
        await online_site(own_mosquitto, client, site)
        body = assignment(site, "job-d", pool.model)
        await client.publish(topics.assignments(site), body, qos=1)
        await client.publish(topics.assignments(site), body, qos=1)
        # A marker job sent after both copies: per-topic ordering means any event caused by the
        # duplicate arrives before the marker's `accepted`, so no fixed sleep is needed.
        await client.publish(topics.assignments(site), assignment(site, "marker", pool.model), qos=1)
        events: list[SiteEvent] = []
        while not any(e.job == "marker" and e.event == "accepted" for e in events):
            events.append(await next_event(client, site))
    assert [str(e.event) for e in events if e.job == "job-d"].count("accepted") == 1


async def test_malformed_assignments_are_dropped_and_site_keeps_working(
    own_mosquitto: MosquittoServer,
) -> None:
    """Garbage bytes and a wrong-schema assignment are dropped; a valid assignment afterwards still runs."""
    site, pool = first_free_pool()
    wrong_schema = orjson.loads(assignment(site, "job-wrong", pool.model))
    wrong_schema["schema"] = "suanwang.assignments/999"
    async with broker_side(own_mosquitto, topics.events(site)) as client, sim(own_mosquitto, 1):
        await online_site(own_mosquitto, client, site)
        await client.publish(topics.assignments(site), b"\x00\xffnot json{", qos=1)
        await client.publish(topics.assignments(site), orjson.dumps(wrong_schema), qos=1)
        await client.publish(topics.assignments(site), assignment(site, "job-e", pool.model), qos=1)
        events = [await next_event(client, site) for _ in range(3)]
    assert [(e.job, e.event) for e in events] == [
        ("job-e", "accepted"),
        ("job-e", "running"),
        ("job-e", "completed"),
    ]


async def test_cancel_stops_the_job_and_frees_its_devices(own_mosquitto: MosquittoServer) -> None:
    """A cancel stops a running job without further events and frees its devices for the next job."""
    site, pool = first_free_pool()
    free = pool.total - pool.in_use_external
    cancel = orjson.loads(assignment(site, "job-long", pool.model))
    cancel["assignments"][0]["action"] = "cancel"
    async with broker_side(own_mosquitto, topics.events(site)) as client, sim(own_mosquitto, 1):
        await online_site(own_mosquitto, client, site)
        long_job = assignment(site, "job-long", pool.model, count=free, hours=1000)
        await client.publish(topics.assignments(site), long_job, qos=1)
        assert [(await next_event(client, site)).event for _ in range(2)] == ["accepted", "running"]
        await client.publish(topics.assignments(site), orjson.dumps(cancel), qos=1)
        await client.publish(topics.assignments(site), assignment(site, "job-next", pool.model, count=free), qos=1)
        event = await next_event(client, site)
    assert (event.job, event.event) == ("job-next", "accepted")


# --------------------------------------------------------------------------- (f) Last Will, (h) reconnect


async def test_killed_adapter_process_leaves_retained_offline(own_mosquitto: MosquittoServer) -> None:
    """SIGKILLing `python -m adapters.sim` makes the retained status `offline` through the Last Will."""
    site = sites_for_hub(HUB, 1)[0].id
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "adapters.sim", "--mqtt", own_mosquitto.url, "--hub", HUB, "--sites", "1",
        "--interval", "0.5", "--log-level", "warning", cwd=REPO,
    )  # fmt: skip
    try:
        async with broker_side(own_mosquitto, topics.status(site)) as client:
            await next_message(client, status_is(site, b"online"), timeout=30)
            proc.kill()
            await proc.wait()
            await next_message(client, status_is(site, b"offline"))
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    async with broker_side(own_mosquitto, topics.status(site)) as late:
        message = await next_message(late)
    assert message.retain and message.payload == b"offline"


async def test_site_reannounces_after_mqtt_restart(own_mosquitto: MosquittoServer) -> None:
    """After the MQTT server restarts (losing retained state), the site reconnects and republishes both."""
    site = sites_for_hub(HUB, 1)[0].id
    async with sim(own_mosquitto, 1, interval=60.0):
        async with broker_side(own_mosquitto, topics.status(site)) as client:
            await next_message(client, status_is(site, b"online"))
        await asyncio.to_thread(own_mosquitto.restart)
        async with broker_side(own_mosquitto, topics.status(site), topics.capacity(site)) as client:
            # The heartbeat is 60 s, so a capacity here proves the reconnect re-announced it.
            got = {m.topic.value: m for m in [await next_message(client), await next_message(client)]}
    assert got[topics.status(site)].payload == b"online"
    assert parse(Capacity, got[topics.capacity(site)].payload).site == site  # type: ignore[arg-type]


async def test_graceful_stop_publishes_offline(own_mosquitto: MosquittoServer) -> None:
    """Stopping `run_sim` via its stop event leaves a retained `offline` status."""
    site = sites_for_hub(HUB, 1)[0].id
    async with broker_side(own_mosquitto, topics.status(site)) as client:
        async with sim(own_mosquitto, 1):
            await next_message(client, status_is(site, b"online"))
        await next_message(client, status_is(site, b"offline"))


# --------------------------------------------------------------------------- (g) fleet


IDENTIFIER = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


def test_sites_for_hub_starts_with_seeded_sites() -> None:
    """The hub's seeded sites come first, and n=None returns exactly them."""
    seeded = [s for s in load_fleet() if s.hub == HUB]
    assert seeded
    assert sites_for_hub(HUB) == seeded
    assert sites_for_hub(HUB, len(seeded) + 5)[: len(seeded)] == seeded


def test_sites_for_hub_is_deterministic_per_seed() -> None:
    """The same seed gives the same sites, a smaller n is a prefix, and another seed gives other sites."""
    a, b = sites_for_hub(HUB, 200, seed=7), sites_for_hub(HUB, 200, seed=7)
    assert a == b
    assert sites_for_hub(HUB, 50, seed=7) == a[:50]
    assert sites_for_hub(HUB, 200, seed=8) != a


@pytest.mark.parametrize("hub", ["guizhou", "jingjinji", "gansu"])
def test_sites_for_hub_synthesises_1000_valid_unique_sites(hub: str) -> None:
    """n=1000 gives 1000 unique valid ids in the hub, and every pool validates as a broker Pool."""
    sites = sites_for_hub(hub, 1000, seed=1)
    ids = [s.id for s in sites]
    assert len(ids) == 1000 == len(set(ids))
    assert all(IDENTIFIER.match(i) and len(i) <= 64 for i in ids)
    for site in sites:
        assert site.hub == hub
        pools = [Pool.model_validate(dict(p)) for p in site.pools]
        assert pools and len({p.model for p in pools}) == len(pools)


def test_all_sites_covers_every_seeded_hub() -> None:
    """all_sites(n) returns n sites for each hub of the seeded fleet."""
    hubs = {s.hub for s in load_fleet()}
    sites = all_sites(3, seed=0)
    assert len(sites) == 3 * len(hubs)
    assert len({s.id for s in sites}) == len(sites)
