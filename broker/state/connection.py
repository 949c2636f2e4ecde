"""The Redis connection's edge: redis-py errors become the project's own, replies become text."""

from __future__ import annotations

import contextlib
import time
import urllib.parse
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

from common.errors import InvalidInput, StoreUnavailable


def now_ms() -> int:
    return int(time.time() * 1000)


# What XRANGE, XREAD and XREADGROUP give back (redis-py's own annotations are too wide to use)
StreamEntries = list[tuple[bytes, dict[bytes, bytes]]]
StreamReply = list[tuple[bytes, StreamEntries]]


def text(value: object) -> str:
    """A reply value as text ('' for a missing one)."""
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)


def decode_hash(raw: Mapping[Any, Any]) -> dict[str, str]:
    return {text(k): text(v) for k, v in raw.items()}


@contextlib.asynccontextmanager
async def translated() -> AsyncIterator[None]:
    """Turn redis-py's connection and server errors into the project's own."""
    try:
        yield
    except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
        raise StoreUnavailable(f"Redis is unreachable: {exc}") from None
    except redis_errors.RedisError as exc:
        raise StoreUnavailable(f"Redis error: {exc}") from None


SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}  # scheme -> TLS to Redis and sentinels


@dataclass(frozen=True)
class SentinelTarget:
    """A `redis+sentinel://[user:password@]HOST:PORT[,HOST:PORT...]/MASTER_NAME[/DB]` URL, read.

    The password authenticates to the Redis servers; sentinels that require their own take
    `?sentinel_password=`. Query parameters otherwise are those of `redis://` URLs (`ssl_ca_certs`, ...)."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False
    sentinel_password: str | None = None
    options: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, url: str) -> SentinelTarget:
        scheme, sep, rest = url.partition("://")
        if not sep or scheme not in SENTINEL_SCHEMES:
            raise InvalidInput(f"a Sentinel URL starts with redis+sentinel:// or rediss+sentinel://, got {url[:40]!r}",
                               "redis_url")  # fmt: skip
        rest, _, query = rest.partition("?")
        userinfo, at, hosts_path = rest.rpartition("@")
        if not at:
            userinfo, hosts_path = "", rest
        hosts, _, path = hosts_path.partition("/")
        sentinels = []
        for item in hosts.split(","):
            host, colon, port = item.strip().rpartition(":")
            if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise InvalidInput(f"sentinel address {item!r} must be HOST:PORT", "redis_url")
            sentinels.append((host.strip("[]"), int(port)))
        master, _, db = path.strip("/").partition("/")
        if not master:
            raise InvalidInput("a Sentinel URL names its master: redis+sentinel://HOST:PORT/MASTER/DB", "redis_url")
        if db and not db.isdigit():
            raise InvalidInput(f"database {db!r} must be a number", "redis_url")
        username, colon, password = userinfo.partition(":")
        if not colon:
            username, password = "", username  # redis+sentinel://password@... as redis:// takes it
        options = dict(urllib.parse.parse_qsl(query))
        sentinel_password = options.pop("sentinel_password", None)
        return cls(tuple(sentinels), urllib.parse.unquote(master), int(db or 0),
                   urllib.parse.unquote(username) or None, urllib.parse.unquote(password) or None,
                   SENTINEL_SCHEMES[scheme], sentinel_password, tuple(sorted(options.items())))  # fmt: skip


def is_sentinel_url(url: str) -> bool:
    return url.partition("://")[0] in SENTINEL_SCHEMES


class _BlockingSentinelPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """Sentinel's discovery of the current primary with the blocking pool's patience: a burst of callers
    waits for a connection instead of failing."""


def redis_client(url: str, *, max_connections: int = 64, blocking: bool = True, **options: Any) -> aioredis.Redis:
    """A client for `redis://`, `rediss://`, `unix://` or a Sentinel URL (`redis+sentinel://`): through Sentinel
    it asks the sentinels for the primary on every new connection and follows a failover by itself (a
    connection to a demoted primary is dropped on its first refused write)."""
    if not is_sentinel_url(url):
        plain = aioredis.BlockingConnectionPool if blocking else aioredis.ConnectionPool
        return aioredis.Redis(connection_pool=plain.from_url(url, max_connections=max_connections, **options))
    target = SentinelTarget.parse(url)
    socket_options = {k: v for k, v in options.items() if k.startswith("socket_")}
    tls: dict[str, Any] = {k: v for k, v in target.options if k.startswith("ssl_")}
    sentinel_kwargs: dict[str, Any] = {**socket_options, **({"ssl": True, **tls} if target.tls else {})}
    if target.sentinel_password:
        sentinel_kwargs["password"] = target.sentinel_password
    sentinel = Sentinel(list(target.sentinels), sentinel_kwargs=sentinel_kwargs)
    pool_class: type[SentinelConnectionPool] = _BlockingSentinelPool if blocking else SentinelConnectionPool
    connection: dict[str, Any] = {"db": target.db, "username": target.username, "password": target.password,
                                  "ssl": target.tls, "max_connections": max_connections, **tls, **options}  # fmt: skip
    client: aioredis.Redis = sentinel.master_for(target.master, connection_pool_class=pool_class, **connection)
    return client
