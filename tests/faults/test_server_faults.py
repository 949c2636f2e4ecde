"""The servers under the broker fail mid-load: redis-server killed (AOF, everysec and always) and Mosquitto
restarted."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import orjson
import pytest

from broker.state.store import Store
from suanwang.servers import MosquittoServer, RedisServer
from suanwang.soak import TENANT, Ack, Client, Cluster, Wire, settle
from tests.faults.conftest import MakeCluster
from tests.faults.helpers import LOAD_RATE, assert_clean, assert_recovered, bodies, settled_findings

pytestmark = pytest.mark.timeout(150)

EVERYSEC_WINDOW_S = 1.0  # `appendfsync everysec`: what was acknowledged in the last second may be lost


async def _kill_redis_mid_load(cluster: Cluster, own_redis: RedisServer, jobs: int) -> tuple[Client, float]:
    """Submit `jobs` at LOAD_RATE, kill -9 redis-server 3 s in and start it again 2 s later (it replays its
    AOF); returns the client once the load is done and the cluster is healthy, and the time of the kill."""
    client = Client(cluster.urls)
    load = asyncio.create_task(client.load(bodies(jobs), LOAD_RATE))
    await asyncio.sleep(3)
    killed = time.time()
    own_redis.kill()
    await asyncio.sleep(2)
    own_redis.start()
    await load
    await cluster.ready()
    assert sum(1 for ack in client.acks.values() if ack.at < killed) >= 40, "the crash came before any load"
    assert client.retries, "no submission met the outage"
    return client, killed


async def test_redis_killed_mid_load_keeps_every_job_acknowledged_before_the_last_second(
    cluster: Cluster, store: Store, own_redis: RedisServer, wire: Wire
) -> None:
    """kill -9 of redis-server: after its AOF is replayed, every job acknowledged more than a second before the
    crash is there, clients' retries with the same Idempotency-Key create nothing twice, and work resumes."""
    client, killed = await _kill_redis_mid_load(cluster, own_redis, jobs=200)
    recent = {ack.job for ack in client.acks.values() if ack.at > killed - EVERYSEC_WINDOW_S}
    found = await settled_findings(store, client)
    lost = set(found.lost)
    print(f"lost {len(lost)} of {len(recent)} acknowledged in the last {EVERYSEC_WINDOW_S}s before the crash")
    assert lost <= recent, f"lost jobs acknowledged before the everysec window: {sorted(lost - recent)}"
    assert_clean(found, may_lose=recent, wire=wire)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("appendfsync", ["always"])
async def test_redis_killed_mid_load_with_appendfsync_always_loses_no_acknowledged_job(
    cluster: Cluster, store: Store, own_redis: RedisServer, wire: Wire
) -> None:
    """With `appendfsync always` a write is on disk before Redis answers: after kill -9 and the AOF's replay,
    every job whose submission was answered 202 (or 200 for a retry) is there, and completes or is queued."""
    assert await store.redis.config_get("appendfsync") == {"appendfsync": "always"}
    client, _killed = await _kill_redis_mid_load(cluster, own_redis, jobs=150)
    found = await settled_findings(store, client, timeout=25)
    assert not found.lost, f"lost {len(found.lost)} acknowledged jobs: {found.lost[:10]}"
    assert found.jobs == len(client.jobs) >= 100
    assert_clean(found, wire=wire)


async def test_mosquitto_restarted_mid_load_loses_nothing(
    cluster: Cluster, store: Store, own_mosquitto: MosquittoServer
) -> None:
    """Mosquitto stopped for longer than the site TTL and started again: brokers and sites reconnect with
    backoff, silent sites' jobs return to the queue, the sites are reconciled, and every job finishes."""
    client = Client(cluster.urls)
    load = asyncio.create_task(client.load(bodies(), LOAD_RATE))
    await asyncio.sleep(3)
    own_mosquitto.stop()
    await asyncio.sleep(cluster.site_ttl_s + 1.5)
    own_mosquitto.start()
    await load
    await cluster.ready(timeout=45)
    await assert_recovered(store, client)


async def _post(session: aiohttp.ClientSession, url: str, key: str) -> tuple[int, dict[str, object], float]:
    body = orjson.dumps(bodies(1, seed=7)[0])
    headers = {"Content-Type": "application/json", "Idempotency-Key": key, "X-Suanwang-Tenant": TENANT}
    started = time.monotonic()
    async with session.post(f"{url}/v1/jobs", data=body, headers=headers) as response:
        return response.status, await response.json(), time.monotonic() - started


async def test_api_answers_503_while_redis_is_down_and_202_after(
    make_cluster: MakeCluster, own_redis: RedisServer
) -> None:
    """With Redis down every replica answers 503 with a clear error at once (no hang, nothing accepted);
    once Redis is back the same Idempotency-Key is accepted, exactly once."""
    cluster = await make_cluster(hubs=("guizhou",))
    store = Store.from_url(own_redis.url, cluster.namespace)
    client = Client(cluster.urls)
    try:
        await client.load(bodies(20, hours=(0.5, 1.0)), rate=20)
        # Nothing running during the outage (site events then are another test's business), and every
        # job written well before the crash, past the everysec window.
        await settle(store, list(client.jobs), timeout=20)
        own_redis.kill()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            for url in cluster.urls:
                status, answer, took = await _post(session, url, "while-down")
                assert status == 503, (status, answer)
                error = answer["error"]
                assert isinstance(error, dict) and "redis" in str(error["message"]).lower(), error
                assert took < 5.0, f"503 took {took:.1f}s"
                job = next(iter(client.jobs))
                async with session.get(f"{url}/v1/jobs/{job}") as response:
                    assert response.status == 503, await response.text()
                async with session.get(f"{url}/healthz") as response:
                    assert response.status == 503 and (await response.json())["redis"] is False
            own_redis.start()
            deadline = time.monotonic() + 20
            status = 0
            while status != 202 and time.monotonic() < deadline:
                status, answer, _ = await _post(session, cluster.urls[0], "while-down")
                await asyncio.sleep(0.2)
            assert status == 202, (status, answer)
            replay_status, replay, _ = await _post(session, cluster.urls[-1], "while-down")
            assert (replay_status, replay["id"]) == (200, answer["id"])
        client.acks["while-down"] = Ack(str(answer["id"]), 202, time.time())
        await assert_recovered(store, client)
    finally:
        await store.close()
