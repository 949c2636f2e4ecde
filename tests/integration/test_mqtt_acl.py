"""Site identities on a real Mosquitto started with the password and ACL files generated from the registry:
a site speaks only for itself and reads only its own assignments; the broker's account sees everything."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt
import orjson
import pytest
import redis.asyncio as aioredis

from adapters.site import SiteLink
from broker.state.keys import Keys
from broker.state.registry import SiteRegistry, mosquitto_hash, write_mosquitto_files
from broker.state.store import Store
from common import topics
from common.config import MqttTarget
from common.protocol import CAPACITY_SCHEMA
from regions import load_geography
from suanwang.servers import MosquittoServer, RedisServer
from tests.support import eventually, running_broker

BROKER_USER, BROKER_PASSWORD = "suanwang-broker", "broker-secret"
A, B = "acl-a", "acl-b"
QUIET_S = 0.3  # how long "nothing arrives" is watched after the control message has arrived


@dataclass
class Mqtt:
    server: MosquittoServer
    passwords: dict[str, str]  # user -> password, the broker's account included

    def url(self, user: str, password: str | None = None) -> str:
        return f"mqtt://{user}:{password or self.passwords[user]}@127.0.0.1:{self.server.port}"

    def client(self, user: str, password: str | None = None, identifier: str | None = None) -> aiomqtt.Client:
        return aiomqtt.Client("127.0.0.1", self.server.port, username=user,
                              password=password if password is not None else self.passwords.get(user),
                              identifier=identifier)  # fmt: skip


@pytest.fixture
async def secured(redis_server: RedisServer, namespace: str, tmp_path: Path) -> AsyncIterator[Mqtt]:
    """Sites A and B registered; Mosquitto runs with the files `suanwang mqtt-config` would write."""
    redis = aioredis.Redis.from_url(redis_server.url)
    registry = SiteRegistry(redis, Keys(namespace))
    passwords = {BROKER_USER: BROKER_PASSWORD}
    for site in (A, B):
        _, passwords[site] = await registry.register(site, "guizhou", "guian", load_geography())
    texts, generated = await registry.mosquitto_files(BROKER_USER, BROKER_PASSWORD)
    assert generated is None
    write_mosquitto_files(tmp_path, texts)
    await redis.aclose()
    server = MosquittoServer(password_file=tmp_path / "passwd", acl_file=tmp_path / "acl")
    server.start()
    try:
        yield Mqtt(server, passwords)
    finally:
        server.cleanup()


@dataclass
class Heard:
    """Messages one client received, in order."""

    messages: list[tuple[str, bytes]] = field(default_factory=list)

    def topics(self) -> list[str]:
        return [t for t, _ in self.messages]

    async def until(self, check: Callable[[list[str]], bool], what: str) -> None:
        await eventually(lambda: _true(check(self.topics())), what, 5.0)


async def _true(value: bool) -> bool:
    return value


@contextlib.asynccontextmanager
async def listening(client: aiomqtt.Client, *filters: str) -> AsyncIterator[Heard]:
    heard = Heard()
    async with client:
        for topic_filter in filters:
            await client.subscribe(topic_filter, qos=1)

        async def collect() -> None:
            async for message in client.messages:
                heard.messages.append((str(message.topic), bytes(message.payload)))  # type: ignore[arg-type]

        task = asyncio.create_task(collect())
        try:
            yield heard
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def capacity(site: str, seq: int = 1) -> bytes:
    return orjson.dumps({"schema": CAPACITY_SCHEMA, "site": site, "hub": "guizhou", "cluster": "guian", "seq": seq,
                         "pools": [{"arch": "GPU", "model": "A100-80G", "memory_gb": 80, "total": 8,
                                    "price_cny_per_hour": 10}]})  # fmt: skip


def test_hashes_match_mosquitto_passwd(tmp_path: Path) -> None:
    """The `$7$` hash written in Python is what Mosquitto's own tool derives for the same salt."""
    import base64
    import subprocess

    passwd = tmp_path / "p"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwd), "someone", "pa55word"], check=True)
    _, _, iterations, salt, _ = passwd.read_text().strip().split(":", 1)[1].split("$")
    expected = passwd.read_text().strip().split(":", 1)[1]
    assert mosquitto_hash("pa55word", base64.b64decode(salt), int(iterations)) == expected


@pytest.mark.parametrize("user, password", [(A, "wrong"), ("nobody", "x"), (BROKER_USER, "wrong"), (None, None)])
async def test_wrong_credentials_are_refused(secured: Mqtt, user: str | None, password: str | None) -> None:
    """A wrong password, an unknown user and an anonymous client cannot connect."""
    client = aiomqtt.Client("127.0.0.1", secured.server.port, username=user, password=password)
    with pytest.raises(aiomqtt.MqttError):
        async with client:
            pass


async def test_site_cannot_publish_for_another_site(secured: Mqtt) -> None:
    """A's message on B's capacity topic never reaches the broker's account; A's own does."""
    async with (
        listening(
            secured.client(BROKER_USER), f"{topics.ROOT}/sites/+/capacity", f"{topics.ROOT}/sites/+/events"
        ) as broker_heard,  # fmt: skip
        secured.client(A) as site_a,
    ):
        await site_a.publish(topics.capacity(B), capacity(B), qos=1)
        await site_a.publish(topics.events(B), b"{}", qos=1)
        await site_a.publish(topics.status(B), b"offline", qos=1)
        await site_a.publish(topics.capacity(A), capacity(A), qos=1)  # the control: published last
        await broker_heard.until(lambda seen: topics.capacity(A) in seen, "A's own capacity")
        await asyncio.sleep(QUIET_S)
    assert broker_heard.topics() == [topics.capacity(A)]


async def test_site_reads_only_its_own_assignments(secured: Mqtt) -> None:
    """A subscribed to B's assignments (and to everyone's) receives only its own."""
    async with (
        listening(
            secured.client(A), topics.assignments(B), f"{topics.ROOT}/sites/+/assignments", f"{topics.ROOT}/#"
        ) as a_heard,  # fmt: skip
        secured.client(BROKER_USER) as broker,
    ):
        await broker.publish(topics.assignments(B), b"for B", qos=1)
        await broker.publish(topics.capacity(B), capacity(B), qos=1)
        await broker.publish(topics.assignments(A), b"for A", qos=1)
        await a_heard.until(lambda seen: topics.assignments(A) in seen, "A's own assignments")
        await asyncio.sleep(QUIET_S)
    assert a_heard.topics() == [topics.assignments(A)]


async def test_broker_account_hears_every_site_and_shared_subscriptions(secured: Mqtt) -> None:
    """The broker's account reads all of suanwang/#, through plain and `$share` subscriptions alike."""
    async with (listening(secured.client(BROKER_USER), f"{topics.ROOT}/#") as heard,
                listening(secured.client(BROKER_USER), f"$share/acl/{topics.ROOT}/sites/+/events") as shared,
                secured.client(A) as site_a, secured.client(B) as site_b):  # fmt: skip
        await site_a.publish(topics.events(A), b"{}", qos=1)
        await site_b.publish(topics.capacity(B), capacity(B), qos=1)
        await site_b.publish(topics.status(B), b"online", qos=1)
        await heard.until(lambda seen: seen == [topics.events(A), topics.capacity(B), topics.status(B)], "all")
        await shared.until(lambda seen: seen == [topics.events(A)], "A's event through the shared subscription")


async def test_in_process_broker_ingests_a_registered_site(secured: Mqtt, redis_server: RedisServer,
                                                           namespace: str) -> None:  # fmt: skip
    """The broker on its own account applies A's capacity sent by the site adapter with A's credentials
    (Last Will and assignment subscription allowed by the ACL); with --require-registered it drops a
    site missing from the registry until that site is registered."""
    as_broker = _WithUrl(secured.url(BROKER_USER))
    async with running_broker(redis_server, as_broker, namespace, require_registered=True) as broker:  # type: ignore[arg-type]
        link = SiteLink(MqttTarget.from_url(secured.url(A)), A, "guizhou",
                        [{"arch": "GPU", "model": "A100-80G", "memory_gb": 80, "total": 16, "price_cny_per_hour": 9}],
                        cluster="guian", interval=0.5)  # fmt: skip
        running = asyncio.create_task(link.run())
        try:
            await eventually(lambda: _site_status(broker.store, A), "site A online with capacity", 10.0)
        finally:
            link.stop()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(running, 5)
        # The broker's own account may write anywhere, so it stands in for a site nobody registered.
        async with secured.client(BROKER_USER, identifier="stand-in") as stand_in:
            await stand_in.publish(topics.capacity("acl-c"), capacity("acl-c"), qos=1)
            await eventually(lambda: _true(broker.ingest.dropped["unregistered"] >= 1), "acl-c dropped", 5.0)
            assert not await _has_meta(broker.store, "acl-c")
            redis = aioredis.Redis.from_url(redis_server.url)
            await SiteRegistry(redis, Keys(namespace)).register("acl-c", "guizhou", "guian", load_geography())
            await redis.aclose()
            await asyncio.sleep(1.1)  # the gate refreshes an unknown site's answer at most once a second
            await stand_in.publish(topics.capacity("acl-c"), capacity("acl-c", seq=2), qos=1)
            await eventually(lambda: _has_meta(broker.store, "acl-c"), "acl-c applied once registered", 5.0)


@dataclass
class _WithUrl:
    """Mosquitto through the broker's account: what running_broker reads of a server is its `.url`."""

    url: str


async def _site_status(store: Store, site: str) -> bool:
    records = await store.load_sites([site])
    return bool(records and records[0].meta and records[0].status == "online")


async def _has_meta(store: Store, site: str) -> bool:
    records = await store.load_sites([site])
    return bool(records and records[0].meta)
