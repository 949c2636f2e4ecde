"""Real servers for the tests: one redis-server and one mosquitto per session, on free ports.

Tests that need to kill or restart a server ask for the function-scoped `own_redis` / `own_mosquitto`.
Every test gets its own key namespace, so tests sharing a server never see each other's state.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from common import logs
from suanwang.servers import MosquittoServer, RedisClusterGroup, RedisServer, mosquitto_available


def _ensure_debian_package(binary: str, package: str) -> None:
    if shutil.which(binary) or (binary == "mosquitto" and mosquitto_available()):
        return
    subprocess.run(["apt-get", "install", "-y", "-q", package], check=True)


@pytest.fixture(scope="session", autouse=True)
def _logging() -> None:
    logs.configure("warning", json=True)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    _ensure_debian_package("redis-server", "redis-server")
    server = RedisServer()
    server.start()
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterGroup]:
    """A real Redis Cluster of three masters (no replicas), shared by the session's tests."""
    _ensure_debian_package("redis-server", "redis-server")
    group = RedisClusterGroup(masters=3)
    group.start()
    yield group
    group.cleanup()


@pytest.fixture
def redis_kind() -> str:
    """Which Redis `redis_target` is: "redis" (one server) unless a test parametrizes it, e.g.
    `pytestmark = pytest.mark.parametrize("redis_kind", ["redis", "cluster"])` runs a module on both."""
    return "redis"


@pytest.fixture
def redis_target(redis_kind: str, request: pytest.FixtureRequest) -> RedisServer | RedisClusterGroup:
    """The session's Redis the test runs on: one server, or the three-master cluster (`redis_kind`)."""
    if redis_kind == "cluster":
        return request.getfixturevalue("redis_cluster")  # type: ignore[no-any-return]
    if redis_kind == "redis":
        return request.getfixturevalue("redis_server")  # type: ignore[no-any-return]
    raise ValueError(f"redis_kind must be 'redis' or 'cluster', not {redis_kind!r}")


@pytest.fixture(scope="session")
def mosquitto() -> Iterator[MosquittoServer]:
    _ensure_debian_package("mosquitto", "mosquitto")
    server = MosquittoServer()
    server.start()
    yield server
    server.cleanup()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = RedisServer(appendonly=True)
    server.start()
    yield server
    server.cleanup()


@pytest.fixture
def own_mosquitto() -> Iterator[MosquittoServer]:
    server = MosquittoServer()
    server.start()
    yield server
    server.cleanup()


@pytest.fixture
def namespace() -> str:
    """A key and topic-free namespace unique to the test."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()
