"""`suanwang bench --ingest N`: capacity updates per second through the broker's own ingest, into Redis.

Sites from the simulated fleet come online the way the broker sees them (their `status` and first
`capacity` message), then N capacity messages, encoded as the adapters encode them, each a real change
(a pool's outside use moves), go through the broker's `Ingest` with its validation and Lua scripts:

- "direct": `await Ingest.handle(topic, payload)` for one message after another, each waiting for its own
  Redis round trip (the path before the MQTT link handed messages to a queue);
- "link": `await Ingest.offer(topic, payload)`, the call the MQTT link makes for every message, with the
  ingest's consumer applying what is pending in pipelined batches;
- "link-paced": the same, offered at a steady rate below saturation, for the latency a message sees when
  the ingest keeps up (at saturation it is the time spent in the bounded queue);
- "mosquitto": a publisher process sends the same messages through a real Mosquitto (QoS 1, as sites
  publish) to the broker's `MqttLink`, which hands them to `Ingest.offer` ("mosquitto-direct": to
  `Ingest.handle`, one after another, as before the queue).

Each path runs in its own key namespace and is checked at the end: every site's stored seq and outside
use must be its last message's. Latency is from the hand-off (the call, or the message leaving the link)
to the moment its effect is in Redis. Redis's INFO gives commands and socket reads (about one per round
trip) per update.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, cast

import orjson
from rich.table import Table

from adapters.fleet import all_sites
from broker.metrics import Metrics
from broker.sites.ingest import Ingest
from broker.sites.link import MqttLink
from broker.state.cluster import NamespaceCluster
from broker.state.store import Store
from common import topics
from common.config import MqttTarget
from common.errors import SuanwangError
from common.protocol import CAPACITY_SCHEMA, Capacity
from regions import SiteSeed, load_geography
from suanwang.servers import MosquittoServer, RedisClusterGroup, RedisServer, mosquitto_available

Message = tuple[str, bytes]
PATHS = ("direct", "link", "link-paced", "mosquitto")


class BenchError(SuanwangError):
    code = "bench"


def _seeds(n: int) -> list[SiteSeed]:
    hubs = len(load_geography().hubs)
    return all_sites(-(-n // hubs))[:n]


def _encode(seed: SiteSeed, seq: int, boot: str, step: int) -> bytes:
    """A capacity message as an adapter encodes it; `step` moves the first non-empty pool's outside use."""
    pools = seed.capacity_pools()
    for pool in pools:
        total = cast(int, pool["total"])
        if total > 0:
            pool["in_use_external"] = step % (total + 1)
            break
    message = Capacity.model_validate({"schema": CAPACITY_SCHEMA, "site": seed.id, "hub": seed.hub,
                                       "cluster": seed.cluster, "seq": seq, "pools": pools,
                                       "energy": dict(seed.energy), "ts": time.time(), "boot": boot})  # fmt: skip
    return orjson.dumps(message.model_dump(mode="json", by_alias=True))


def _messages(seeds: list[SiteSeed], updates: int, boot: str) -> tuple[list[Message], dict[str, bytes]]:
    """`updates` capacity messages round-robin over the sites (seq 2, 3, ...), and each site's last one."""
    out: list[Message] = []
    last: dict[str, bytes] = {}
    for i in range(updates):
        seed = seeds[i % len(seeds)]
        turn = i // len(seeds)
        payload = _encode(seed, seq=turn + 2, boot=boot, step=turn + 1)
        out.append((topics.capacity(seed.id), payload))
        last[seed.id] = payload
    return out, last


async def _noop_publish(site: str, payload: bytes, /) -> None:
    """Assignments (reconciles of sites coming online) go nowhere: there is no site to hear them."""


def _ingest(store: Store) -> Ingest:
    """The broker's Ingest as `broker.service.start_broker` builds it (no registration gate)."""
    return Ingest(store, _noop_publish, asyncio.Event(), load_geography(), Metrics())


async def _online(ingest: Ingest, seeds: list[SiteSeed], boot: str) -> None:
    """Bring the sites online as the broker first hears of them: `status` online, then capacity seq 1."""
    for seed in seeds:
        await ingest.handle(topics.status(seed.id), b"online")
        await ingest.handle(topics.capacity(seed.id), _encode(seed, seq=1, boot=boot, step=0))


async def _redis_counts(url: str) -> dict[str, tuple[float, float, float]]:
    """(commands, socket reads, CPU seconds) each Redis node has processed and spent so far."""
    from suanwang.bench import redis_node_counts

    counts = await redis_node_counts(url)
    if not counts:
        raise BenchError(f"could not read INFO stats and cpu of {url}")
    return counts


async def _verify(store: Store, last: dict[str, bytes]) -> int:
    """How many sites' stored seq and pools differ from their last message's (0 when every effect landed)."""
    wrong = 0
    places = await store.places(last)
    pipe = store.redis.pipeline(transaction=False)
    for site in last:
        hub = store.keys.hub(places[site].hub if site in places else "")
        pipe.hget(hub.site(site), "seq")
        pipe.hgetall(hub.capacity(site))
    raw = await pipe.execute()
    for i, payload in enumerate(last.values()):
        message = orjson.loads(payload)
        stored = {k.decode(): int(v) for k, v in raw[2 * i + 1].items()}
        ok = raw[2 * i] is not None and int(raw[2 * i]) == message["seq"]
        ok = ok and all(stored.get(f"x:{p['model']}") == p["in_use_external"] for p in message["pools"])
        wrong += not ok
    return wrong


def _percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def _summary(updates: int, elapsed: float, cpu: float, latencies: list[float], counts: tuple[float, ...],
             wrong: int, ingest: Ingest) -> dict[str, Any]:  # fmt: skip
    commands, reads, redis_cpu = counts
    return {
        "updates_per_s": round(updates / elapsed) if elapsed > 0 else 0,
        "seconds": round(elapsed, 3),
        # CPU time is steadier than the rate on a machine shared with other work
        "cpu_us_per_update": {"broker": round(cpu / updates * 1e6, 1), "redis": round(redis_cpu / updates * 1e6, 1)},
        "latency_ms": {
            "p50": round(_percentile(latencies, 50) * 1000, 3),
            "p99": round(_percentile(latencies, 99) * 1000, 3),
            "max": round(max(latencies, default=float("nan")) * 1000, 3),
        },
        "redis_commands_per_update": round(commands / updates, 3),
        "redis_reads_per_update": round(reads / updates, 3),
        "sites_wrong": wrong,
        "dropped": sum(ingest.dropped.values()),
    }


async def _direct(store: Store, messages: list[Message]) -> tuple[float, list[float], Ingest]:
    """One message after another, each awaited to the end of its Redis round trip."""
    ingest = _ingest(store)
    latencies: list[float] = []
    start = time.perf_counter()
    for topic, payload in messages:
        sent = time.perf_counter()
        await ingest.handle(topic, payload)
        latencies.append(time.perf_counter() - sent)
    return time.perf_counter() - start, latencies, ingest


async def _linked(store: Store, messages: list[Message], rate: float | None = None
                  ) -> tuple[float, list[float], Ingest]:  # fmt: skip
    """The MQTT link's hand-off: `offer` each message (as fast as the queue takes them, or `rate` a second),
    the ingest's consumer applies them in batches."""
    ingest = _ingest(store)
    latencies: list[float] = []
    ingest.on_applied = latencies.append
    stop = asyncio.Event()
    consumer = asyncio.create_task(ingest.run(stop))
    try:
        start = time.perf_counter()
        for i, (topic, payload) in enumerate(messages):
            if rate is not None:
                ahead = start + i / rate - time.perf_counter()
                if ahead > 0.001:
                    await asyncio.sleep(ahead)
            await ingest.offer(topic, payload)
        await ingest.settled()
        elapsed = time.perf_counter() - start
    finally:
        stop.set()
        consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer
    return elapsed, latencies, ingest


# A site fleet in one process: paho's own loop thread, QoS 1 as sites publish, the messages (a JSON list of
# [topic, payload]) read from stdin. Not retained (sites retain theirs), so that a later run on the same
# Mosquitto is not handed this one's messages when it subscribes.
_PUBLISHER = """
import sys, orjson, paho.mqtt.client as mqtt
host, port = sys.argv[1], int(sys.argv[2])
messages = orjson.loads(sys.stdin.buffer.read())
client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id='bench-ingest-publisher')
client.max_inflight_messages_set(1000)
client.connect(host, port)
client.loop_start()
info = None
for topic, payload in messages:
    info = client.publish(topic, payload.encode(), qos=1)
if info is not None:
    info.wait_for_publish(120)
client.loop_stop()
client.disconnect()
"""


async def _mosquitto(store: Store, messages: list[Message], mqtt_url: str, batched: bool
                     ) -> tuple[float, list[float], Ingest]:  # fmt: skip
    """A publisher process sends the messages through Mosquitto to the broker's MqttLink and ingest."""
    ingest = _ingest(store)
    latencies: list[float] = []
    stop = asyncio.Event()
    received = 0
    done = asyncio.Event()
    first = 0.0

    async def direct(topic: str, payload: bytes) -> None:
        nonlocal received, first
        if not received:
            first = time.perf_counter()
        sent = time.perf_counter()
        await ingest.handle(topic, payload)
        latencies.append(time.perf_counter() - sent)
        received += 1
        if received == len(messages):
            done.set()

    async def offered(topic: str, payload: bytes) -> None:
        nonlocal received, first
        if not received:
            first = time.perf_counter()
        await ingest.offer(topic, payload)
        received += 1
        if received == len(messages):
            done.set()

    on_message: Callable[[str, bytes], Awaitable[None]] = offered if batched else direct
    ingest.on_applied = latencies.append
    target = MqttTarget.from_url(mqtt_url)
    link = MqttLink(target, f"bench-ingest-{uuid.uuid4().hex[:6]}", [(f"{topics.ROOT}/sites/+/capacity", 1)])
    tasks = [asyncio.create_task(link.run(stop, on_message))]
    if batched:
        tasks.append(asyncio.create_task(ingest.run(stop)))
    publisher: asyncio.subprocess.Process | None = None
    try:
        async with asyncio.timeout(10):
            await link.connected.wait()
        publisher = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _PUBLISHER, target.host, str(target.port),
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        sending = asyncio.create_task(publisher.communicate(orjson.dumps([(t, p.decode()) for t, p in messages])))
        async with asyncio.timeout(max(60.0, len(messages) / 500)):
            arrived = asyncio.create_task(done.wait())
            await asyncio.wait([sending, arrived], return_when=asyncio.FIRST_COMPLETED)
            if sending.done() and publisher.returncode:  # it failed before every message was sent
                arrived.cancel()
                raise BenchError(f"publisher exited with {publisher.returncode}: {sending.result()[1].decode()[-500:]}")
            await arrived
            if batched:
                await ingest.settled()
        elapsed = time.perf_counter() - first
        await sending
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if publisher is not None and publisher.returncode is None:
            publisher.kill()
            await publisher.wait()
    return elapsed, latencies, ingest


async def _path(redis_url: str, name: str, seeds: list[SiteSeed], updates: int, mqtt_url: str | None,
                rate: float) -> dict[str, Any]:  # fmt: skip
    store = Store.from_url(redis_url, f"bi{uuid.uuid4().hex[:6]}")
    boot = uuid.uuid4().hex[:12]
    try:
        await _online(_ingest(store), seeds, boot)
        messages, last = _messages(seeds, updates, boot)
        first = await _redis_counts(redis_url)
        before = await _redis_counts(redis_url)  # (the reads of `before` itself: before - first)
        cpu = time.process_time()
        if name == "direct":
            elapsed, latencies, ingest = await _direct(store, messages)
        elif name == "link":
            elapsed, latencies, ingest = await _linked(store, messages)
        elif name == "link-paced":
            elapsed, latencies, ingest = await _linked(store, messages, rate)
        elif mqtt_url is not None:
            elapsed, latencies, ingest = await _mosquitto(store, messages, mqtt_url, batched=name == "mosquitto")
        cpu = time.process_time() - cpu
        after = await _redis_counts(redis_url)
        spent = {node: tuple(a - b - max(b - f, 0) if i < 2 else a - b
                             for i, (a, b, f) in enumerate(zip(after[node], before[node], first[node], strict=True)))
                 for node in after if node in before and node in first}  # fmt: skip
        counts = tuple(sum(n[i] for n in spent.values()) for i in range(3))
        summary = _summary(updates, elapsed, cpu, latencies, counts, await _verify(store, last), ingest)
        if len(spent) > 1:  # a cluster: how the shards share Redis's CPU, and how many hubs each serves
            summary["redis_cpu_us_per_update_by_node"] = {node: round(n[2] / updates * 1e6, 1)
                                                          for node, n in spent.items()}  # fmt: skip
            summary["hubs_by_node"] = _hubs_by_node(store, {seed.hub for seed in seeds})
        return summary
    finally:
        await store.close()


async def measure(updates: int, sites: int, redis_url: str | None, *, mqtt_url: str | None = None,
                  paths: tuple[str, ...] = PATHS, rate: float = 2000.0, shards: int = 0) -> dict[str, Any]:  # fmt: skip
    """Feed `updates` capacity messages from `sites` sites through each of `paths` ("direct", "link",
    "link-paced": offered at `rate` a second, for latency below saturation, "mosquitto", and
    "mosquitto-direct": Mosquitto to `handle` one message after another); a redis-server and a Mosquitto of
    its own when no URL is given (with `shards`, a Redis Cluster of that many masters). Each path's figures,
    and whether every effect landed."""
    if updates < 1 or sites < 1:
        raise ValueError("updates and sites must be at least 1")
    unknown = set(paths) - {*PATHS, "mosquitto-direct"}
    if unknown:
        raise ValueError(f"unknown ingest paths: {', '.join(sorted(unknown))}")
    own: list[RedisServer | RedisClusterGroup | MosquittoServer] = []
    own_redis = not redis_url
    try:
        if not redis_url and shards:
            group = RedisClusterGroup(masters=shards)
            own.append(group)
            group.start()
            redis_url = group.url
        if not redis_url:
            server = RedisServer()
            server.start()
            own.append(server)
            redis_url = server.url
        names = list(paths)
        if any(name.startswith("mosquitto") for name in names) and not mqtt_url:
            if mosquitto_available():
                broker = MosquittoServer()
                broker.start()
                own.append(broker)
                mqtt_url = broker.url
            else:
                names = [name for name in names if not name.startswith("mosquitto")]
        seeds = _seeds(sites)
        results = {name: await _path(redis_url, name, seeds, updates, mqtt_url, rate) for name in names}
        return {
            "mode": "ingest",
            "updates": updates,
            "sites": len(seeds),
            "paced_rate": rate,
            "results": results,
            "redis": _whose(own_redis, shards),
            "cpu_count": os.cpu_count(),
        }
    finally:
        for own_server in own:
            own_server.cleanup()


def _hubs_by_node(store: Store, hubs: set[str]) -> dict[str, int]:
    """How many of `hubs` each cluster node serves (the node of each hub's tag)."""
    redis = cast(NamespaceCluster, store.redis)
    served = Counter(redis.node_of(store.keys.hub(hub).prefix).name for hub in hubs)
    return dict(sorted(served.items()))


def _whose(own: bool, shards: int) -> str:
    if not own:
        return "given (its counts include other clients')"
    return f"own Redis Cluster of {shards} masters" if shards else "own redis-server"


def ingest_table(report: dict[str, Any]) -> Table:
    """The report as one row per path, for `suanwang bench --ingest`."""
    table = Table("path", "updates/s", "p50 ms", "p99 ms", "broker CPU µs", "Redis CPU µs", "Redis reads",
                  "Redis commands", "sites wrong", "dropped", caption="CPU, reads and commands: per update",
                  title=f"suanwang bench --ingest {report['updates']:,} ({report['sites']:,} sites, "
                        f"link-paced at {report['paced_rate']:,.0f}/s, {report['cpu_count']} cores)")  # fmt: skip
    for name, row in report["results"].items():
        cpu, latency = row["cpu_us_per_update"], row["latency_ms"]
        table.add_row(name, f"{row['updates_per_s']:,}", str(latency["p50"]), str(latency["p99"]), str(cpu["broker"]),
                      str(cpu["redis"]), str(row["redis_reads_per_update"]),
                      str(row["redis_commands_per_update"]), str(row["sites_wrong"]), str(row["dropped"]))  # fmt: skip
    return table
