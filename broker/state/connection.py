"""The Redis connection's edge: redis-py errors become the project's own, replies become text."""

from __future__ import annotations

import contextlib
import time
import urllib.parse
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

from broker.state.cluster import NamespaceCluster
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


def entry_key(entry_id: str) -> tuple[int, int]:
    """A stream entry id as (ms, seq), to order the entries of several streams (ValueError if it is none)."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


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


@dataclass(frozen=True)
class _UrlParts:
    """What a `SCHEME://[user:password@]HOST:PORT[,HOST:PORT...]/PATH?QUERY` URL holds."""

    tls: bool
    username: str | None
    password: str | None
    addresses: tuple[tuple[str, int], ...]
    path: str
    options: dict[str, str]

    @classmethod
    def split(cls, url: str, schemes: Mapping[str, bool], kind: str, what: str) -> _UrlParts:
        """`schemes` maps each scheme taken to whether it is TLS; `kind` and `what` name the URL and its
        addresses in errors."""
        scheme, sep, rest = url.partition("://")
        if not sep or scheme not in schemes:
            raise InvalidInput(f"a {kind} URL starts with {' or '.join(f'{s}://' for s in schemes)}, got "
                               f"{url[:40]!r}", "redis_url")  # fmt: skip
        rest, _, query = rest.partition("?")
        userinfo, at, hosts_path = rest.rpartition("@")
        if not at:
            userinfo, hosts_path = "", rest
        hosts, _, path = hosts_path.partition("/")
        addresses = []
        for item in hosts.split(","):  # HOST:PORT, [IPv6]:PORT
            host, colon, port = item.strip().rpartition(":")
            if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise InvalidInput(f"{what} address {item!r} must be HOST:PORT", "redis_url")
            addresses.append((host.strip("[]"), int(port)))
        username, colon, password = userinfo.partition(":")
        if not colon:
            username, password = "", username  # SCHEME://password@... as redis:// takes it
        return cls(schemes[scheme], urllib.parse.unquote(username) or None, urllib.parse.unquote(password) or None,
                   tuple(addresses), path.strip("/"), dict(urllib.parse.parse_qsl(query)))  # fmt: skip


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
        parts = _UrlParts.split(url, SENTINEL_SCHEMES, "Sentinel", "sentinel")
        master, _, db = parts.path.partition("/")
        if not master:
            raise InvalidInput("a Sentinel URL names its master: redis+sentinel://HOST:PORT/MASTER/DB", "redis_url")
        if db and not db.isdigit():
            raise InvalidInput(f"database {db!r} must be a number", "redis_url")
        sentinel_password = parts.options.pop("sentinel_password", None)
        return cls(parts.addresses, urllib.parse.unquote(master), int(db or 0), parts.username, parts.password,
                   parts.tls, sentinel_password, tuple(sorted(parts.options.items())))  # fmt: skip


def is_sentinel_url(url: str) -> bool:
    return url.partition("://")[0] in SENTINEL_SCHEMES


CLUSTER_SCHEMES = {"redis+cluster": False, "rediss+cluster": True}  # scheme -> TLS to the nodes
CLUSTER_OPTIONS = frozenset({"ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs"})


@dataclass(frozen=True)
class ClusterTarget:
    """A `redis+cluster://[user:password@]HOST:PORT[,HOST:PORT...]/` URL, read.

    The nodes are where the client starts: any that answers tells it the others and which serves which
    slots. A cluster has one database (0); query parameters are the `ssl_*` ones of `rediss://` URLs."""

    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None
    tls: bool = False
    options: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, url: str) -> ClusterTarget:
        parts = _UrlParts.split(url, CLUSTER_SCHEMES, "cluster", "cluster node")
        if parts.path not in ("", "0"):
            raise InvalidInput(f"a Redis Cluster has only database 0, not {parts.path!r}", "redis_url")
        unknown = sorted(set(parts.options) - CLUSTER_OPTIONS)
        if unknown:
            raise InvalidInput(f"a cluster URL takes only {', '.join(sorted(CLUSTER_OPTIONS))}, not {unknown[0]!r}",
                               "redis_url")  # fmt: skip
        return cls(parts.addresses, parts.username, parts.password, parts.tls,
                   tuple(sorted(parts.options.items())))  # fmt: skip


def is_cluster_url(url: str) -> bool:
    return url.partition("://")[0] in CLUSTER_SCHEMES


def cluster_client(target: ClusterTarget, *, max_connections: int = 64, **options: Any) -> NamespaceCluster:
    """A Redis Cluster client starting from the target's nodes, with at most `max_connections` to each node; a
    burst of callers waits up to `timeout` seconds (as a blocking pool's) for a connection."""
    wait_s = float(options.pop("timeout", 20))
    settings: dict[str, Any] = {"username": target.username, "password": target.password, "ssl": target.tls,
                                "max_connections": max_connections, **dict(target.options), **options}  # fmt: skip
    return NamespaceCluster(startup_nodes=[ClusterNode(host, port) for host, port in target.nodes], wait_s=wait_s,
                            **settings)  # fmt: skip


class _BlockingSentinelPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """Sentinel's discovery of the current primary with the blocking pool's patience: a burst of callers
    waits for a connection instead of failing."""


def redis_client(url: str, *, max_connections: int = 64, **options: Any) -> aioredis.Redis:
    """A client for `redis://`, `rediss://`, `unix://`, a Sentinel URL (`redis+sentinel://`) or a Redis Cluster
    URL (`redis+cluster://`): through Sentinel it asks the sentinels for the primary on every new connection
    and follows a failover by itself (a connection to a demoted primary is dropped on its first refused
    write); on a cluster it follows the slots (broker.state.cluster)."""
    if is_cluster_url(url):
        # Typed as the client of one Redis the store is written against: for a namespace's keys, all in one
        # slot, the cluster client answers the commands the store sends as one Redis does (broker.state.cluster).
        cluster = cluster_client(ClusterTarget.parse(url), max_connections=max_connections, **options)
        return cast(aioredis.Redis, cluster)
    if not is_sentinel_url(url):
        pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=max_connections, **options)
        return aioredis.Redis(connection_pool=pool)
    target = SentinelTarget.parse(url)
    socket_options = {k: v for k, v in options.items() if k.startswith("socket_")}
    tls: dict[str, Any] = {k: v for k, v in target.options if k.startswith("ssl_")}
    sentinel_kwargs: dict[str, Any] = {**socket_options, **({"ssl": True, **tls} if target.tls else {})}
    if target.sentinel_password:
        sentinel_kwargs["password"] = target.sentinel_password
    sentinel = Sentinel(list(target.sentinels), sentinel_kwargs=sentinel_kwargs)
    connection: dict[str, Any] = {"db": target.db, "username": target.username, "password": target.password,
                                  "ssl": target.tls, "max_connections": max_connections, **tls, **options}  # fmt: skip
    client: aioredis.Redis = sentinel.master_for(target.master, connection_pool_class=_BlockingSentinelPool,
                                                 **connection)  # fmt: skip
    return client


async def replication_ids(redis: aioredis.Redis, keys: list[str]) -> list[str]:
    """The replication id (INFO replication's master_replid) of the primary serving each key: on Redis Cluster
    each key's node's, elsewhere the one server's for all."""
    if not isinstance(redis, NamespaceCluster):
        info = await redis.info("replication")
        return [text(info.get("master_replid", ""))] * len(keys)
    by_node: dict[str, str] = {}
    out = []
    for key in keys:
        node = redis.get_node_from_key(key)
        if node is None:
            out.append("")
            continue
        if node.name not in by_node:
            info = await redis.execute_command("INFO", "replication", target_nodes=node)
            by_node[node.name] = text(cast(dict[str, Any], info).get("master_replid", ""))
        out.append(by_node[node.name])
    return out
