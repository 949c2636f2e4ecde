"""Bridged hubs on real Mosquitto processes: a core broker, where a broker replica listens, and two hub
brokers, each started with the folder `suanwang mqtt-config --bridge-to` wrote for it. Sites connect to
their hub's broker only; jobs, capacity and Last Wills cross the bridges, a cut bridge loses no outcome,
and no site (nor a hub's bridge account) speaks for a site of another hub."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import aiohttp
import aiomqtt
import orjson
import pytest
import redis.asyncio as aioredis
from click.testing import CliRunner

from adapters.site import SiteLink
from broker.service import Broker
from broker.state.connection import StreamEntries
from broker.state.events import decode_event
from broker.state.history import check_history
from broker.state.keys import Keys
from broker.state.registry import BRIDGE_USER_PREFIX, SiteRegistry, acl_file, bridge_user
from broker.state.store import Store
from common import topics
from common.config import MqttTarget
from common.protocol import CAPACITY_SCHEMA, Assignments
from regions import load_geography
from suanwang.cli import main
from suanwang.servers import MosquittoServer, RedisServer
from tests.support import eventually, linked, running_broker

REPO = Path(__file__).resolve().parents[2]
BROKER_USER, BROKER_PASSWORD = "suanwang-broker", "broker-secret"
HUB_A, HUB_B = "guizhou", "ningxia"
A1, B1 = "bridge-a1", "bridge-b1"
SIMULATED = "guian-01"  # the first seeded site of guizhou, as `python -m adapters.sim --sites 1` runs it
SITES = {A1: (HUB_A, "guian"), SIMULATED: (HUB_A, "guian"), B1: (HUB_B, "zhongwei")}
A1_MODEL, B1_MODEL = "A100-80G", "H800"  # only A1 has the job's model, so the job goes to hub A
FORGED_TOTAL = 999
QUIET_S = 0.3  # how long "nothing arrives" is watched after the control message has arrived
WAIT = 15.0


@dataclass
class _WithUrl:
    """The core through the broker's account: what running_broker reads of a server is its `.url`."""

    url: str


@dataclass
class Bridged:
    out: Path
    core: MosquittoServer
    hubs: dict[str, MosquittoServer]
    passwords: dict[str, str]  # site -> its MQTT password

    def site_target(self, site: str) -> MqttTarget:
        """The site's own credentials at its own hub's broker."""
        hub = self.hubs[SITES[site][0]]
        return MqttTarget("127.0.0.1", hub.port, site, self.passwords[site])

    def bridge_password(self, hub: str) -> str:
        conf = (self.out / "hubs" / hub / "bridge.conf").read_text().splitlines()
        return next(line.split(" ", 1)[1] for line in conf if line.startswith("remote_password "))

    def core_client(self, user: str = BROKER_USER, password: str = BROKER_PASSWORD,
                    identifier: str | None = None) -> aiomqtt.Client:  # fmt: skip
        return aiomqtt.Client("127.0.0.1", self.core.port, username=user, password=password, identifier=identifier)


def _mqtt_config(out: Path, core_port: int, redis_url: str, namespace: str) -> None:
    args = ["mqtt-config", "--out", str(out), "--bridge-to", f"127.0.0.1:{core_port}", "--broker-password",
            BROKER_PASSWORD, "--redis", redis_url, "--namespace", namespace]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output


@pytest.fixture
async def bridged(redis_server: RedisServer, namespace: str, tmp_path: Path) -> AsyncIterator[Bridged]:
    """The sites registered, the files written by the CLI, the core and both hub brokers running on them."""
    redis = aioredis.Redis.from_url(redis_server.url)
    registry = SiteRegistry(redis, Keys(namespace))
    passwords = {}
    for site, (hub, cluster) in SITES.items():
        _, passwords[site] = await registry.register(site, hub, cluster, load_geography())
    await redis.aclose()
    out = tmp_path / "mqtt"
    core = MosquittoServer(include_dir=out)
    # in a thread: the CLI runs its own event loop
    await asyncio.to_thread(_mqtt_config, out, core.port, redis_server.url, namespace)
    hubs = {hub: MosquittoServer(include_dir=out / "hubs" / hub) for hub in (HUB_A, HUB_B)}
    try:
        for server in (core, *hubs.values()):
            await asyncio.to_thread(server.start)
        yield Bridged(out, core, hubs, passwords)
    finally:
        for server in (*hubs.values(), core):
            server.cleanup()


@pytest.fixture
async def broker(bridged: Bridged, redis_server: RedisServer, namespace: str) -> AsyncIterator[Broker]:
    """A broker replica on the core only; a site silent for a minute would count as gone, so within a test
    only a Last Will takes a site offline."""
    core = _WithUrl(f"mqtt://{BROKER_USER}:{BROKER_PASSWORD}@127.0.0.1:{bridged.core.port}")
    async with running_broker(redis_server, core, namespace, require_registered=True, site_ttl_s=60.0) as running:  # type: ignore[arg-type]
        yield running


@pytest.fixture
async def http(broker: Broker) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=broker.url) as session:
        yield session


# --------------------------------------------------------------------------- sites and probes


@dataclass
class HandSite:
    """A real site at its hub's broker that accepts and starts every run; the test says when it ends."""

    link: SiteLink
    runs: list[tuple[str, int]] = field(default_factory=list)

    def on_assignments(self, batch: Assignments) -> None:
        for item in batch.assignments:
            if item.action != "cancel":
                self.runs.append((item.job, item.attempt))
                self.link.emit(item.job, item.attempt, "accepted")
                self.link.emit(item.job, item.attempt, "running")


def pool(model: str, total: int) -> dict[str, Any]:
    return {"arch": "GPU", "model": model, "memory_gb": 80, "total": total, "per_node": 8, "price_cny_per_hour": 10}


@contextlib.asynccontextmanager
async def hand_site(bridged: Bridged, site: str, model: str, total: int) -> AsyncIterator[HandSite]:
    link = SiteLink(bridged.site_target(site), site, SITES[site][0], [pool(model, total)], cluster=SITES[site][1],
                    interval=0.5, min_backoff=0.1, max_backoff=0.5)  # fmt: skip
    hand = HandSite(link)
    link.on_assignments = hand.on_assignments
    async with linked(link):
        yield hand


async def site_state(store: Store, site: str, model: str) -> tuple[str, int, int] | None:
    """(status, total, allocated) of the site's pool of `model` as the broker stored it; None before its
    first capacity."""
    records = await store.load_sites([site])
    if not records or not records[0].meta:
        return None
    counts = records[0].counts(model)
    return records[0].status, counts.total, counts.allocated


async def until_site(store: Store, site: str, model: str, want: tuple[str, int, int]) -> None:
    async def probe() -> bool:
        return await site_state(store, site, model) == want

    await eventually(probe, f"{site} to be {want}", WAIT)


async def submit(http: aiohttp.ClientSession, count: int = 4) -> str:
    body = {"name": "bridged", "workload": "training", "origin": "guiyang", "duration_hours": 1,
            "resources": {"arch": "GPU", "models": [A1_MODEL], "count": count}}  # fmt: skip
    async with http.post("/v1/jobs", json=body) as response:
        payload = orjson.loads(await response.read())
        assert response.status == 202, payload
    return str(payload["id"])


async def until_job(http: aiohttp.ClientSession, job: str, state: str) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        async with http.get(f"/v1/jobs/{job}") as response:
            view: dict[str, Any] = orjson.loads(await response.read())
        return view if view.get("state") == state else None

    return await eventually(probe, f"job {job} {state}", WAIT)


async def event_kinds(broker: Broker, job: str) -> list[str]:
    rows = cast(StreamEntries, await broker.store.redis.xrange(broker.store.keys.only.events))
    return [e["type"] for e in (decode_event(i, f) for i, f in rows) if e.get("job") == job]


async def retained_capacity(bridged: Bridged, sites: set[str]) -> set[str]:
    """Until a client subscribing on the core is handed retained capacity of each of `sites` (retained
    messages come only with a new subscription, so each try subscribes anew); returns the sites it was."""

    async def probe() -> set[str] | None:
        got: set[str] = set()
        async with bridged.core_client(identifier="late-reader") as client:
            await client.subscribe(f"{topics.ROOT}/sites/+/capacity", qos=1)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    async for message in client.messages:
                        if message.retain:
                            got.add(orjson.loads(message.payload)["site"])  # type: ignore[arg-type]
                        if sites <= got:
                            break
        return got if sites <= got else None

    return await eventually(probe, f"retained capacity of {sorted(sites)} on the core", WAIT)


def capacity(site: str, model: str, total: int) -> bytes:
    hub, cluster = SITES[site]
    return orjson.dumps({"schema": CAPACITY_SCHEMA, "site": site, "hub": hub, "cluster": cluster,
                         "seq": time.time_ns() // 1_000_000 + 10_000_000, "pools": [pool(model, total)]})  # fmt: skip


# --------------------------------------------------------------------------- (1) across the bridges


async def test_job_capacity_and_last_will_cross_the_bridges(bridged: Bridged, broker: Broker,
                                                            http: aiohttp.ClientSession) -> None:  # fmt: skip
    """Capacity of sites on both hubs reaches the broker on the core, and stays retained there; a job goes
    to its site through hub A's bridge and its outcome comes back; a site whose connection dies (SIGKILLed
    adapter) is offline at the broker through its Last Will, well before any heartbeat timeout."""
    async with hand_site(bridged, A1, A1_MODEL, 16) as a1, hand_site(bridged, B1, B1_MODEL, 8):
        await until_site(broker.store, A1, A1_MODEL, ("online", 16, 0))
        await until_site(broker.store, B1, B1_MODEL, ("online", 8, 0))
        assert await retained_capacity(bridged, {A1, B1}) == {A1, B1}

        job = await submit(http)
        await until_job(http, job, "running")
        assert [attempt for j, attempt in a1.runs if j == job] == [1]
        await until_site(broker.store, A1, A1_MODEL, ("online", 16, 4))
        a1.link.emit(job, 1, "completed")
        await until_job(http, job, "completed")
        await until_site(broker.store, A1, A1_MODEL, ("online", 16, 0))
    assert await event_kinds(broker, job) == ["queued", "allocated", "accepted", "running", "released", "completed"]
    assert (await check_history(broker.store)).ok

    target = bridged.site_target(SIMULATED)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "adapters.sim", "--hub", HUB_A, "--sites", "1", "--interval", "0.5",
        "--mqtt", f"mqtt://{SIMULATED}:{target.password}@127.0.0.1:{target.port}", "--log-level", "warning",
        cwd=REPO,
    )  # fmt: skip
    try:
        await eventually(lambda: _status(broker.store, SIMULATED, "online"), "the simulated site online", WAIT)
        proc.kill()
        await proc.wait()
        # the heartbeat timeout is a minute: only the Last Will, passed on by the bridge, says this in time
        await eventually(lambda: _status(broker.store, SIMULATED, "offline"), "its Last Will at the broker", 10.0)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _status(store: Store, site: str, status: str) -> bool:
    records = await store.load_sites([site])
    return bool(records and records[0].meta and records[0].status == status)


# --------------------------------------------------------------------------- (2) a cut bridge


async def test_outcome_survives_a_cut_bridge_and_a_crashed_hub(bridged: Bridged, broker: Broker,
                                                               http: aiohttp.ClientSession) -> None:  # fmt: skip
    """The core goes down while a job runs at hub A; the site's outcome, taken by hub A's broker, dies with
    that broker (SIGKILL, nothing persisted). Once both are back, the site's repeated outcome finishes the
    job once, the history is consistent, and both hubs' capacity is retained on the new core again."""
    async with hand_site(bridged, A1, A1_MODEL, 16) as a1, hand_site(bridged, B1, B1_MODEL, 8):
        await until_site(broker.store, A1, A1_MODEL, ("online", 16, 0))
        job = await submit(http)
        await until_job(http, job, "running")

        await asyncio.to_thread(bridged.core.stop)  # the bridges (and the broker replica) are cut off
        a1.link.emit(job, 1, "completed")
        await eventually(lambda: _true(a1.link.pending_events == 0), "hub A to take the outcome", WAIT)
        await asyncio.to_thread(bridged.hubs[HUB_A].kill)  # and lose it
        await asyncio.to_thread(bridged.core.start)
        await asyncio.to_thread(bridged.hubs[HUB_A].start)

        await until_job(http, job, "completed")
        await until_site(broker.store, A1, A1_MODEL, ("online", 16, 0))
        await until_site(broker.store, B1, B1_MODEL, ("online", 8, 0))
        assert await retained_capacity(bridged, {A1, B1}) == {A1, B1}
    assert a1.runs == [(job, 1)]
    assert await event_kinds(broker, job) == ["queued", "allocated", "accepted", "running", "released", "completed"]
    assert (await check_history(broker.store)).ok


async def _true(value: bool) -> bool:
    return value


# --------------------------------------------------------------------------- (3) no site speaks for another hub


async def test_no_one_publishes_as_a_site_of_another_hub(bridged: Bridged, broker: Broker) -> None:
    """B1 (hub B) cannot log in at hub A's broker; A1 (hub A) cannot publish B1's capacity or status through
    hub A; hub A's bridge account on the core cannot either, nor read B1's assignments. The broker never sees
    the forgeries; the control messages, sent last on each path, do arrive."""
    a_bridge, a_password = bridge_user(HUB_A), bridged.bridge_password(HUB_A)
    b1, a1 = bridged.site_target(B1), bridged.site_target(A1)
    assert await _logs_in(b1.port, B1, b1.password)
    assert not await _logs_in(a1.port, B1, b1.password)  # hub A's broker knows only hub A's sites

    heard: list[tuple[str, bytes]] = []
    async with hand_site(bridged, B1, B1_MODEL, 8), bridged.core_client(identifier="witness") as witness:
        await witness.subscribe(f"{topics.ROOT}/sites/{B1}/#", qos=1)
        listener = asyncio.create_task(_collect(witness, heard))
        await until_site(broker.store, B1, B1_MODEL, ("online", 8, 0))

        async with aiomqtt.Client(a1.host, a1.port, username=A1, password=a1.password, identifier="a1") as client:
            await client.publish(topics.capacity(B1), capacity(B1, B1_MODEL, FORGED_TOTAL), qos=1, retain=True)
            await client.publish(topics.status(B1), b"offline", qos=1, retain=True)
            await client.publish(topics.capacity(A1), capacity(A1, A1_MODEL, 16), qos=1, retain=True)
        await until_site(broker.store, A1, A1_MODEL, ("online", 16, 0))

        async with bridged.core_client(a_bridge, a_password, identifier="stolen-bridge") as client:
            await client.publish(topics.capacity(B1), capacity(B1, B1_MODEL, FORGED_TOTAL), qos=1, retain=True)
            await client.publish(topics.status(B1), b"offline", qos=1, retain=True)
            await client.publish(topics.capacity(A1), capacity(A1, A1_MODEL, 17), qos=1, retain=True)
        await until_site(broker.store, A1, A1_MODEL, ("online", 17, 0))
        await asyncio.sleep(QUIET_S)
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)
        assert await site_state(broker.store, B1, B1_MODEL) == ("online", 8, 0)
    forged = [t for t, payload in heard if payload == b"offline" or b'"total":999' in payload]
    assert forged == [] and heard, heard

    reads: list[tuple[str, bytes]] = []
    async with bridged.core_client(a_bridge, a_password, identifier="stolen-bridge") as thief:
        await thief.subscribe(f"{topics.ROOT}/sites/+/assignments", qos=1)
        collecting = asyncio.create_task(_collect(thief, reads))
        async with bridged.core_client(identifier="broker-stand-in") as stand_in:
            await stand_in.publish(topics.assignments(B1), b"for B1", qos=1)
            await stand_in.publish(topics.assignments(A1), b"for A1", qos=1)
        await eventually(lambda: _true(bool(reads)), "A1's assignments at hub A's bridge account", 5.0)
        await asyncio.sleep(QUIET_S)
        collecting.cancel()
        await asyncio.gather(collecting, return_exceptions=True)
    assert [t for t, _ in reads] == [topics.assignments(A1)]


async def _logs_in(port: int, user: str, password: str | None) -> bool:
    try:
        async with aiomqtt.Client("127.0.0.1", port, username=user, password=password, identifier="login-check"):
            return True
    except aiomqtt.MqttError:
        return False


async def _collect(client: aiomqtt.Client, into: list[tuple[str, bytes]]) -> None:
    async for message in client.messages:
        into.append((str(message.topic), bytes(message.payload)))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the generated files


async def test_bridge_passwords_are_stable_and_plain_output_is_unchanged(redis_server: RedisServer, namespace: str,
                                                                        tmp_path: Path) -> None:  # fmt: skip
    """A second run keeps each hub's bridge password (and hash), so hubs need no new bridge.conf for it;
    without --bridge-to the files are the single broker's, with no bridge account in them."""
    redis = aioredis.Redis.from_url(redis_server.url)
    registry = SiteRegistry(redis, Keys(namespace))
    try:
        for site, (hub, cluster) in SITES.items():
            await registry.register(site, hub, cluster, load_geography())
        first, _ = await registry.mosquitto_files(BROKER_USER, BROKER_PASSWORD, "core.example:1883")
        second, _ = await registry.mosquitto_files(BROKER_USER, None, "core.example:1883")
        plain, generated = await registry.mosquitto_files(BROKER_USER, None)
    finally:
        await redis.aclose()
    hub_files = [f"hubs/{hub}/{name}" for hub in (HUB_A, HUB_B) for name in ("acl", "bridge.conf", "passwd")]
    assert sorted(first) == ["acl", *hub_files, "passwd"]
    assert first == second
    assert generated is None and sorted(plain) == ["acl", "passwd"]
    assert plain["acl"] == acl_file(BROKER_USER, sorted(SITES))
    assert BRIDGE_USER_PREFIX not in plain["passwd"] and BRIDGE_USER_PREFIX in first["passwd"]
    assert [line.split(":")[0] for line in first["hubs/ningxia/passwd"].splitlines()] == [B1]
