"""The ingest queue the MQTT link hands messages to, against a real Redis: capacity messages queued together
go to Redis in one pipelined round trip and leave exactly the state that applying them one at a time leaves
(the last message per site stands, a stale seq is refused, a bad message is dropped and counted and the ones
after it are applied), and they wait while Redis is away instead of being lost."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import orjson
import redis.asyncio as aioredis

from broker.model.records import Applied
from broker.sites.ingest import Ingest
from broker.state.keys import Keys
from broker.state.store import Store
from common import topics
from common.errors import StoreUnavailable
from common.protocol import CAPACITY_SCHEMA, Capacity
from regions import load_geography
from suanwang.bench_ingest import measure as measure_ingest
from suanwang.servers import MosquittoServer, RedisServer
from tests.support import eventually

GEO = load_geography()
SITES = ("guian-01", "guian-02", "guian-03")
HUB = "guizhou"  # every message's hub: the site shard that holds their keys
MODEL = "A100-80G"


class CountingStore(Store):
    """A real store that records how many capacity messages went to Redis in each pipelined round trip."""

    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        super().__init__(redis, keys)
        self.batches: list[int] = []

    async def apply_capacities(self, caps: Sequence[Capacity]) -> list[Applied | StoreUnavailable]:
        self.batches.append(len(caps))
        return await super().apply_capacities(caps)


def capacity(site: str, seq: int, external: int, *, total: int = 64, boot: str = "boot-a") -> tuple[str, bytes]:
    """A capacity message as an adapter sends it."""
    body: dict[str, Any] = {
        "schema": CAPACITY_SCHEMA, "site": site, "hub": HUB, "cluster": "guian", "seq": seq, "boot": boot,
        "pools": [{"arch": "GPU", "model": MODEL, "memory_gb": 80, "total": total, "in_use_external": external,
                   "per_node": 8, "interconnect": "nvlink", "stacks": ["cuda-12.4"], "price_cny_per_hour": 9.5}],
        "energy": {"pue": 1.2, "green_share": 0.5, "tariff_cny_per_kwh": 0.3},
    }  # fmt: skip
    return topics.capacity(site), orjson.dumps(body)


async def no_site_listens(site: str, payload: bytes, /) -> None:
    """Reconciles of sites coming online go nowhere: no site process runs in these tests."""


def ingest_on(store: Store) -> Ingest:
    return Ingest(store, no_site_listens, asyncio.Event(), GEO)


@asynccontextmanager
async def consuming(ingest: Ingest) -> AsyncIterator[None]:
    """The ingest's consumer running, as the broker runs it."""
    stop = asyncio.Event()
    task = asyncio.create_task(ingest.run(stop))
    try:
        yield
    finally:
        stop.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def queued(ingest: Ingest, messages: Sequence[tuple[str, bytes]]) -> None:
    """Offer every message before the consumer runs (so they are queued together), then apply them."""
    for topic, payload in messages:
        await ingest.offer(topic, payload)
    async with consuming(ingest), asyncio.timeout(15):
        await ingest.settled()


async def pool_of(store: Store, site: str) -> tuple[int, int, int]:
    """(seq, total, in use outside) as stored for the site's pool."""
    k = store.keys.hub(HUB)
    seq = await store.redis.hget(k.site(site), "seq")
    counts = await store.redis.hmget(k.capacity(site), [f"t:{MODEL}", f"x:{MODEL}"])
    return int(seq or -1), int(counts[0] or -1), int(counts[1] or -1)


async def state_of(store: Store) -> dict[str, Any]:
    """Everything the capacity and status scripts keep, less the heartbeat times (Redis's clock)."""
    k = store.keys.hub(HUB)
    out: dict[str, Any] = {
        "places": await store.redis.hgetall(store.keys.places),
        "sites": await store.redis.zrange(k.sites, 0, -1, withscores=True),
        "clock": await store.redis.get(k.clock),
        "wake": await store.redis.get(k.wake),
    }
    for site in SITES:
        fields = await store.redis.hgetall(k.site(site))
        fields.pop(b"seen", None)
        log = [orjson.loads(entry)["status"] for entry in await store.redis.lrange(k.site_status_log(site), 0, -1)]
        out[site] = (fields, await store.redis.hgetall(k.capacity(site)), log)
    return out


async def test_queued_capacity_messages_go_in_one_round_trip_and_each_sites_last_one_stands(
    redis_client: aioredis.Redis, namespace: str
) -> None:
    """60 messages from 3 sites, each a real change, queued together: one pipelined batch, and every site
    holds its last message's seq and counts."""
    store = CountingStore(redis_client, Keys(namespace))
    ingest = ingest_on(store)
    messages = [capacity(SITES[i % 3], seq=i // 3 + 1, external=i) for i in range(60)]
    await queued(ingest, messages)
    assert store.batches == [60]
    assert [await pool_of(store, site) for site in SITES] == [(20, 64, 57), (20, 64, 58), (20, 64, 59)]
    assert ingest.received["capacity"] == 60 and not ingest.dropped


async def test_a_stale_seq_in_a_batch_is_refused_as_on_its_own(redis_client: aioredis.Redis, namespace: str) -> None:
    """A message older than one before it in the same batch (and a repeat of one) changes nothing and is
    counted as stale, as when each waits for its own round trip."""
    store = CountingStore(redis_client, Keys(namespace))
    ingest = ingest_on(store)
    site = SITES[0]
    await queued(ingest, [capacity(site, 5, 10), capacity(site, 3, 30, total=32), capacity(site, 5, 10)])
    assert store.batches == [3]
    assert await pool_of(store, site) == (5, 64, 10)
    assert ingest.dropped == {"stale_seq": 2}


async def test_a_bad_message_in_the_middle_is_dropped_and_counted_and_the_ones_after_it_applied(
    redis_client: aioredis.Redis, namespace: str
) -> None:
    """Malformed JSON, a message that fails the protocol's validation and one naming another site sit
    between good ones: each is dropped and counted, and the good ones on both sides of them are applied."""
    store = CountingStore(redis_client, Keys(namespace))
    ingest = ingest_on(store)
    a, b = SITES[0], SITES[1]
    topic_a, _ = capacity(a, 0, 0)
    over = orjson.loads(capacity(a, 3, 0)[1])
    over["pools"][0]["in_use_external"] = 65  # more in use than there is
    messages = [
        capacity(a, 1, 1), capacity(b, 1, 1),
        (topic_a, b'{"schema": "suanwang.capacity/1", "site": '),
        (topic_a, orjson.dumps(over)),
        (topic_a, capacity(b, 2, 2)[1]),
        capacity(a, 2, 7), capacity(b, 3, 9),
    ]  # fmt: skip
    await queued(ingest, messages)
    assert await pool_of(store, a) == (2, 64, 7)
    assert await pool_of(store, b) == (3, 64, 9)
    assert ingest.dropped == {"invalid_capacity": 3}
    assert store.batches == [4]  # the four good ones, still together


async def test_a_batch_leaves_redis_exactly_as_one_message_at_a_time_does(
    redis_client: aioredis.Redis, namespace: str
) -> None:
    """The same mixed stream (sites coming online, changes, a stale and a repeated message, a bad one, a
    site going offline and reporting again) through `handle` one at a time and through the queue: the same
    state in Redis, down to the change versions' order, and the same counts."""
    messages: list[tuple[str, bytes]] = [(topics.status(site), b"online") for site in SITES]
    for turn in range(1, 8):
        messages += [capacity(site, turn, (turn * (i + 3)) % 64) for i, site in enumerate(SITES)]
    messages += [capacity(SITES[0], 2, 40), capacity(SITES[1], 7, (7 * 4) % 64), (topics.capacity(SITES[2]), b"[]")]
    messages += [(topics.status(SITES[1]), b"offline"), capacity(SITES[1], 8, 5), capacity(SITES[0], 8, 6)]
    messages += [capacity(SITES[2], 1, 3, boot="boot-b")]  # the adapter restarted: its order starts again

    one_at_a_time = Store(redis_client, Keys(f"{namespace}-one"))
    single = ingest_on(one_at_a_time)
    for topic, payload in messages:
        await single.handle(topic, payload)
    batched_store = CountingStore(redis_client, Keys(f"{namespace}-batch"))
    batched = ingest_on(batched_store)
    await queued(batched, messages)

    assert await state_of(batched_store) == await state_of(one_at_a_time)
    assert batched.dropped == single.dropped == {"stale_seq": 2, "invalid_capacity": 1}
    assert batched.received == single.received
    assert max(batched_store.batches) > 1 and sum(batched_store.batches) == len(messages) - 5  # less status, bad


async def test_queued_messages_wait_while_redis_is_away_and_are_applied_when_it_is_back(
    own_redis: RedisServer, namespace: str
) -> None:
    """Redis stops with messages queued: the batch is retried (counted) until Redis is back, then every
    message is applied, in order; nothing later overtakes it."""
    store = CountingStore(aioredis.Redis.from_url(own_redis.url, socket_timeout=2), Keys(namespace))
    ingest = ingest_on(store)
    try:
        await queued(ingest, [capacity(SITES[0], 1, 1)])
        own_redis.stop()
        async with consuming(ingest):
            for seq in range(2, 12):
                await ingest.offer(*capacity(SITES[0], seq, seq))
            await eventually(lambda: _true(ingest.dropped["store_unavailable_capacity_retried"] >= 1), "a retry")
            own_redis.start()
            async with asyncio.timeout(15):
                await ingest.settled()
        assert await pool_of(store, SITES[0]) == (11, 64, 11)
        assert "stale_seq" not in ingest.dropped
    finally:
        await store.close()


async def _true(value: bool) -> bool:
    return value


def test_bench_ingest_reports_updates_per_second(redis_server: RedisServer, mosquitto: MosquittoServer) -> None:
    """`suanwang bench --ingest 2000 --json`: every path applies every site's last message and says how fast."""
    env = {**os.environ, "SUANWANG_REDIS_URL": redis_server.url, "SUANWANG_MQTT_URL": mosquitto.url}
    done = subprocess.run([sys.executable, "-m", "suanwang.cli", "bench", "--ingest", "2000", "--sites", "100",
                           "--json"], env=env, capture_output=True, timeout=90, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    report = orjson.loads(done.stdout)
    assert report["mode"] == "ingest" and report["updates"] == 2000 and report["sites"] == 100
    assert set(report["results"]) == {"direct", "link", "link-paced", "mosquitto"}
    for name, result in report["results"].items():
        assert result["updates_per_s"] > 0 and result["sites_wrong"] == 0 and result["dropped"] == 0, name
        assert result["latency_ms"]["p99"] >= result["latency_ms"]["p50"] > 0, name
    assert report["results"]["direct"]["redis_reads_per_update"] >= 1  # a round trip each
    assert report["results"]["link"]["redis_reads_per_update"] < 0.5  # pipelined


async def test_bench_ingest_on_a_cluster_reports_redis_cpu_by_node_and_the_hubs_each_serves() -> None:
    """`bench --ingest --shards 3`: a real three-master cluster started for it; every effect lands, Redis's CPU
    per update is given by node (summing to the total) and each hub is served by one node."""
    report = await measure_ingest(1000, 40, None, paths=("link",), shards=3)
    assert report["redis"] == "own Redis Cluster of 3 masters"
    result = report["results"]["link"]
    assert result["sites_wrong"] == 0 and result["dropped"] == 0
    by_node = result["redis_cpu_us_per_update_by_node"]
    assert len(by_node) == 3
    assert abs(sum(by_node.values()) - result["cpu_us_per_update"]["redis"]) <= 0.2
    assert set(result["hubs_by_node"]) <= set(by_node)
    assert sum(result["hubs_by_node"].values()) == len(load_geography().hubs)
