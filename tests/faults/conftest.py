"""The fault suite's parts: a cluster of real processes on a Redis (AOF) and a Mosquitto of the test's own.

Each test starts two `suanwang serve` replicas (site TTL 3 s, accept timeout 3 s) and one simulated-site
process per hub, drives a load of jobs over HTTP as careful users would, breaks something, and then
checks, once the system has settled, that Redis agrees with what users were told (`assert_recovered`).
When the test ends and its processes have stopped, the audit and the history checker read what it left in
Redis and fail the test at teardown on any violation (`final_problems`).

Each test runs on a Redis of its own, or, where a module parametrizes `redis_kind` with "cluster", on the
session's three-master Redis Cluster as well (`fault_redis`).

The suite's `own_redis` takes its `appendfsync` from the `appendfsync` fixture (everysec), so a test can
run on a Redis that writes every change to disk before it answers:
`@pytest.mark.parametrize("appendfsync", ["always"])`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.state.store import Store
from suanwang.servers import MosquittoServer, RedisClusterGroup, RedisServer
from suanwang.soak import Cluster, Wire
from tests.faults.helpers import final_problems

MakeCluster = Callable[..., Awaitable[Cluster]]


def _log_tails(workdir: Path) -> str:
    out = []
    for log in sorted(workdir.glob("*.log")):
        text = log.read_text(errors="replace")
        if "Traceback" in text or "error" in text.lower():
            out.append(f"--- {log.name} ---\n{text[-3000:]}")
    return "\n".join(out)


@pytest.fixture
def appendfsync() -> str:
    return "everysec"


@pytest.fixture
def own_redis(appendfsync: str) -> Iterator[RedisServer]:
    server = RedisServer(appendonly=True, appendfsync=appendfsync)
    server.start()
    yield server
    server.cleanup()


@pytest.fixture
def fault_redis(redis_kind: str, request: pytest.FixtureRequest) -> RedisServer | RedisClusterGroup:
    """The Redis a test's cluster runs on: its own server (AOF, `own_redis`, which a test may kill), or with
    `redis_kind` "cluster" the session's three-master Redis Cluster (tests/conftest.py)."""
    if redis_kind == "cluster":
        return request.getfixturevalue("redis_cluster")  # type: ignore[no-any-return]
    return request.getfixturevalue("own_redis")  # type: ignore[no-any-return]


@pytest.fixture
async def make_cluster(fault_redis: RedisServer | RedisClusterGroup, own_mosquitto: MosquittoServer,
                       tmp_path: Path) -> AsyncIterator[MakeCluster]:  # fmt: skip
    """Start a cluster (options as for `Cluster`) and wait until its brokers are healthy and sites online."""
    clusters: list[Cluster] = []

    async def make(**options: Any) -> Cluster:
        cluster = Cluster(fault_redis.url, own_mosquitto.url, tmp_path, **options)
        clusters.append(cluster)
        await cluster.start()
        return cluster

    yield make
    for cluster in clusters:
        cluster.close()
    tails = _log_tails(tmp_path)
    if tails:
        print(tails)  # shown by pytest when the test failed
    if isinstance(fault_redis, RedisServer) and (fault_redis.proc is None or fault_redis.proc.poll() is not None):
        pytest.fail("Redis was left down: the audit and the history check could not run")
    for cluster in clusters:
        problems = await final_problems(fault_redis.url, cluster.namespace)
        assert not problems, f"{len(problems)} problems left in Redis:\n" + "\n".join(problems[:40])


@pytest.fixture
async def cluster(make_cluster: MakeCluster) -> Cluster:
    return await make_cluster()


@pytest.fixture
async def store(fault_redis: RedisServer | RedisClusterGroup, cluster: Cluster) -> AsyncIterator[Store]:
    store = Store.from_url(fault_redis.url, cluster.namespace)
    yield store
    await store.close()


@pytest.fixture
async def wire(own_mosquitto: MosquittoServer) -> AsyncIterator[Wire]:
    """Every site event and reconcile message on the MQTT broker, as seen by an extra subscriber."""
    watcher = Wire(own_mosquitto.url)
    task = asyncio.create_task(watcher.run())
    async with asyncio.timeout(10):
        await watcher.connected.wait()
    yield watcher
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
