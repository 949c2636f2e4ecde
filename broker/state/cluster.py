"""Redis Cluster for a deployment whose keys all share one hash tag (`{namespace}`, broker.state.keys).

Every key of the deployment lives in one slot, so the whole deployment is on the node serving it. The
client routes keyed commands and scripts by their keys as redis-py does; what has no key to route by is
sent to that node too, so it behaves as it does on one Redis:

- TIME, INFO, WAIT, PING, SCAN, DBSIZE, KEYS go to the node (redis-py sends them to a random node or
  to all of them): Redis's clock is the one the scripts read, INFO replication names the primary that
  holds the data, WAIT counts the replicas of the node that took the writes (it goes down the same
  pipeline connection), SCAN (and scan_iter) walks the node's keys with one cursor, as one Redis gives it.
- A MULTI/EXEC pipeline (and WATCH) runs as a plain pipeline on one of that node's connections.
  redis-py's cluster transactions queue each command through a thread of its own running a second
  event loop, which blocks the broker's loop for about a millisecond a command.

And a burst of callers waits for a connection, as on one Redis's blocking pool: redis-py's cluster client
fails a command outright when every connection to its node is busy.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import AsyncIterator
from typing import Any

from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.connection import AbstractConnection, ConnectionPoolInterface
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import SlotNotCoveredError

# Commands without keys that the store sends: each goes to the node serving the deployment's slot.
HOME_COMMANDS = frozenset({"TIME", "INFO", "WAIT", "PING", "SCAN", "DBSIZE", "KEYS"})


# Set while a caller holds its turn: the commands redis-py sends again inside a pipeline (a redirection) go
# without waiting for another.
_HOLDING: contextvars.ContextVar[bool] = contextvars.ContextVar("holding", default=False)


class NamespaceCluster(RedisCluster):
    """A Redis Cluster client for one deployment; `home` is a key of its slot (`{namespace}`), set by the
    store it serves (with no home, keyless commands go where redis-py sends them).

    With `wait_s`, at most `max_connections` commands and pipelines are in flight at once (each takes at
    most one connection to a node); the rest wait their turn up to `wait_s` seconds, as on a blocking pool."""

    home = ""

    def __init__(self, *args: Any, wait_s: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.wait_s = wait_s
        self._turns = asyncio.Semaphore(int(kwargs.get("max_connections", 100))) if wait_s is not None else None

    async def take_turn(self) -> None:
        """Wait until fewer than `max_connections` calls are in flight (no wait without `wait_s`)."""
        if self._turns is None:
            return
        try:
            async with asyncio.timeout(self.wait_s):
                await self._turns.acquire()
        except TimeoutError:
            raise RedisConnectionError(f"no connection to the cluster came free within {self.wait_s}s") from None

    def give_turn(self) -> None:
        if self._turns is not None:
            self._turns.release()

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        if _HOLDING.get():
            yield
            return
        await self.take_turn()
        held = _HOLDING.set(True)
        try:
            yield
        finally:
            _HOLDING.reset(held)
            self.give_turn()

    def home_node(self) -> ClusterNode:
        """The node serving the deployment's slot, as the client last learned it."""
        node = self.get_node_from_key(self.home)
        if node is None:
            raise SlotNotCoveredError(f"no node serves the slot of {self.home}")
        return node

    def node_of(self, key: str) -> ClusterNode:
        node = self.get_node_from_key(key)
        if node is None:
            raise SlotNotCoveredError(f"no node serves the slot of {key}")
        return node

    async def _determine_nodes(self, command: str, *args: Any, **kwargs: Any) -> list[ClusterNode]:
        # redis-py asks this for every command it sends, alone or in a pipeline, inside its retries
        if self.home and command in HOME_COMMANDS:
            return [self.home_node()]
        nodes: list[ClusterNode] = await super()._determine_nodes(command, *args, **kwargs)
        return nodes

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async with self.turn():
            reply = await super().execute_command(*args, **kwargs)
        if self.home and args[0] == "SCAN":  # redis-py keeps a cursor per node; there is one node
            cursors, keys = reply
            return next(iter(cursors.values()), 0), keys
        return reply

    async def scan_iter(  # type: ignore[override]  # (redis-py types it as its blocking client's)
        self, match: Any = None, count: int | None = None, _type: str | None = None, **kwargs: Any
    ) -> AsyncIterator[Any]:
        if not self.home:
            async for key in super().scan_iter(match, count, _type, **kwargs):
                yield key
            return
        cursor = None
        while cursor != 0:
            cursor, keys = await self.scan(cursor or 0, match=match, count=count, _type=_type, **kwargs)
            for key in keys:
                yield key

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> ClusterPipeline:
        if transaction and self.home:
            # on the node serving the namespace's slot, or with a shard hint (a key), the node serving that key's
            connections = _HomeConnections(self, shard_hint if isinstance(shard_hint, str) else self.home)
            plain = Pipeline(connections, self.response_callbacks, True, shard_hint)  # type: ignore[arg-type]
            return plain  # type: ignore[return-value]
        return _TakingTurns(self, transaction)  # type: ignore[abstract]  # as redis-py makes its own


class _TakingTurns(ClusterPipeline):
    """A cluster pipeline that waits its client's turn before it is sent."""

    cluster_client: NamespaceCluster

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> list[Any]:
        async with self.cluster_client.turn():
            return await super().execute(raise_on_error, allow_redirections)


class _HomeConnections(ConnectionPoolInterface):
    """The connections of the node serving the deployment's slot, lent to a plain pipeline one at a time.

    The node is looked up on every loan, so a transaction after the slot moved (and the client learned it
    from a MOVED reply) goes to the new node; one sent before that is refused by the old node, as a MOVED
    error in place of its replies."""

    def __init__(self, cluster: NamespaceCluster, key: str) -> None:
        self.cluster = cluster
        self.key = key
        self.connection_kwargs = cluster.connection_kwargs
        self._lent: dict[int, ClusterNode] = {}

    async def get_connection(self, command_name: str | None = None, *keys: Any, **options: Any) -> AbstractConnection:
        await self.cluster.take_turn()  # held until the connection is back: a WATCH keeps it meanwhile
        try:
            await self.cluster.initialize()
            node = self.cluster.node_of(self.key)
            connection = node.acquire_connection()
            try:
                await connection.connect()
            except BaseException:
                await connection.disconnect()
                node.release(connection)
                raise
        except BaseException:
            self.cluster.give_turn()
            raise
        self._lent[id(connection)] = node
        return connection

    async def release(self, connection: AbstractConnection) -> None:
        node = self._lent.pop(id(connection))
        try:
            await node.disconnect_if_needed(connection)  # type: ignore[arg-type]
        finally:
            node.release(connection)  # type: ignore[arg-type]
            self.cluster.give_turn()

    def get_encoder(self) -> Any:
        return self.cluster.get_encoder()

    def get_protocol(self) -> Any:
        return self.connection_kwargs.get("protocol")

    # the node's connections belong to the cluster client, which closes them: nothing to do here
    def reset(self) -> None:
        pass

    async def disconnect(self, inuse_connections: bool = True) -> None:
        pass

    async def aclose(self) -> None:
        pass

    def set_retry(self, retry: Any) -> None:
        pass

    async def re_auth_callback(self, token: Any) -> None:
        pass

    def get_connection_count(self) -> list[tuple[int, dict[str, Any]]]:
        return []
