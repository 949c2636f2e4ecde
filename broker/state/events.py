"""The event log (a capped Redis Stream) and its readers: one tail per process fanned out to every
live view, and the MQTT mirror fed through a consumer group so that each event is mirrored once
however many broker replicas run.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import orjson
from redis import exceptions as redis_errors

from broker.state.connection import StreamEntries, StreamReply, entry_key, text, translated
from broker.state.store import Store
from common import logs
from common.errors import StoreUnavailable

log = logs.get("suanwang.events")

_NUMBERS = {"count": int, "attempt": int, "price": float, "latency_ms": float, "ts": int}
MIRROR_GROUP = "mirror"
CLAIM_IDLE_MS = 30_000  # a replica silent this long on an entry is taken to be dead


def decode_event(event_id: bytes | str, fields: dict[bytes, bytes]) -> dict[str, Any]:
    """A stream entry as the JSON object operators see; empty fields are left out."""
    event: dict[str, Any] = {"id": event_id.decode() if isinstance(event_id, bytes) else event_id}
    for raw_key, raw_value in fields.items():
        key, value = raw_key.decode(), raw_value.decode()
        if value == "":
            continue
        convert = _NUMBERS.get(key)
        if convert is not None:
            try:
                event[key] = convert(value)
            except ValueError:
                event[key] = value
        else:
            event[key] = value
    return event


def id_after(a: str, b: str) -> bool:
    """Whether stream id `a` comes after `b`."""
    ams, _, aseq = a.partition("-")
    bms, _, bseq = b.partition("-")
    return (int(ams), int(aseq or 0)) > (int(bms), int(bseq or 0))


def cursor_after(a: str, b: str) -> bool:
    """Whether the live stream's position `a` comes after `b`. A position is the stream id of the last event
    read of each job shard's log, comma-separated (with one shard, that one id): `a` is after `b` when it has
    read further in any of them. ValueError for a position that is neither."""
    pa, pb = a.split(","), b.split(",")
    if len(pa) != len(pb):
        raise ValueError(f"a position of {len(pa)} logs against one of {len(pb)}")
    return any(id_after(x, y) for x, y in zip(pa, pb, strict=True))


class Subscription:
    """A live view's queue; `overflowed` is set when it fell too far behind and was dropped."""

    def __init__(self, size: int) -> None:
        self.queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(size)
        self.overflowed = False


class EventFeed:
    """Tails every job shard's log once and hands each event, encoded once, to every subscriber, with the
    position after it (`cursor_after`): `backlog` given that position reads on from there."""

    def __init__(self, store: Store, block_ms: int = 1000, subscriber_buffer: int = 10_000) -> None:
        self.store = store
        self.block_ms = block_ms
        self.subscriber_buffer = subscriber_buffer
        self._subscribers: set[Subscription] = set()
        self.logs = [sk.events for sk in store.keys.each_shard]
        self.positions = ["$"] * len(self.logs)  # the last id read of each log ('$': its end not yet found)
        # set once the tail knows where every log ends: every event after a subscription made from then on
        # reaches the subscriber (before it, events logged before the tail's first read would be skipped)
        self.started = asyncio.Event()

    @property
    def last_id(self) -> str:
        return ",".join(self.positions)

    def valid(self, position: str) -> bool:
        """Whether `position` is one this feed's logs can resume from."""
        parts = position.split(",")
        try:
            return len(parts) == len(self.logs) and all(entry_key(p) >= (0, 0) for p in parts)
        except ValueError:
            return False

    async def wait_started(self, timeout: float) -> None:
        """Until the tail knows where the log ends, or StoreUnavailable after `timeout` seconds."""
        try:
            await asyncio.wait_for(self.started.wait(), timeout)
        except TimeoutError:
            raise StoreUnavailable("the event log cannot be read yet") from None

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[Subscription]:
        subscription = Subscription(self.subscriber_buffer)
        self._subscribers.add(subscription)
        try:
            yield subscription
        finally:
            self._subscribers.discard(subscription)

    def resubscribe(self, subscription: Subscription) -> None:
        subscription.overflowed = False
        self._subscribers.add(subscription)

    async def backlog(self, after: str, count: int = 1000) -> list[tuple[str, bytes]]:
        """Events after position `after` (exclusive), each log's oldest first, at most `count`, each with the
        position after it."""
        positions = after.split(",")
        async with translated():
            pipe = self.store.redis.pipeline(transaction=False)
            for log, position in zip(self.logs, positions, strict=True):
                pipe.xrange(log, f"({position}", "+", count=count)
            found = cast(list[StreamEntries], await pipe.execute())
        rows = sorted(((entry_key(text(i)), shard, i, f) for shard, entries in enumerate(found) for i, f in entries),
                      key=lambda row: (row[0], row[1]))[:count]  # fmt: skip
        out = []
        for _key, shard, event_id, fields in rows:
            positions[shard] = text(event_id)
            out.append((",".join(positions), orjson.dumps(self._event(shard, event_id, fields))))
        return out

    def _event(self, shard: int, event_id: bytes | str, fields: dict[bytes, bytes]) -> dict[str, Any]:
        event = decode_event(event_id, fields)
        if len(self.logs) > 1:
            event["shard"] = shard
        return event

    async def run(self, stop: asyncio.Event) -> None:
        tails = [asyncio.create_task(self._tail(shard, stop)) for shard in range(len(self.logs))]
        try:
            await asyncio.gather(*tails)
        finally:
            for tail in tails:
                tail.cancel()

    async def _tail(self, shard: int, stop: asyncio.Event) -> None:
        redis, key = self.store.redis, self.logs[shard]
        while not stop.is_set():
            try:
                if self.positions[shard] == "$":
                    newest = cast(StreamEntries, await redis.xrevrange(key, count=1))
                    self.positions[shard] = newest[0][0].decode() if newest else "0-0"
                    if "$" not in self.positions:
                        self.started.set()
                reply = cast(StreamReply, await redis.xread({key: self.positions[shard]}, block=self.block_ms,
                                                            count=1000))  # fmt: skip
            except (redis_errors.RedisError, OSError) as exc:
                log.warning("events.tail_failed", error=str(exc))
                await asyncio.sleep(1)
                continue
            for _stream, entries in reply or ():
                for event_id, fields in entries:
                    event = self._event(shard, event_id, fields)
                    self.positions[shard] = event["id"]
                    item = (self.last_id, orjson.dumps(event))
                    for subscription in list(self._subscribers):
                        try:
                            subscription.queue.put_nowait(item)
                        except asyncio.QueueFull:
                            # a subscriber this far behind catches up from the log by its last position
                            self._subscribers.discard(subscription)
                            subscription.overflowed = True


async def run_mirror(store: Store, consumer: str, publish: Callable[[list[bytes]], Awaitable[None]] | None,
                     stop: asyncio.Event, publish_batch: Callable[[bytes], Awaitable[None]] | None = None
                     ) -> None:  # fmt: skip
    """Publish every event to the MQTT mirror once, sharing the work between replicas: each event as its own
    message with `publish` (given a read's events in order), and each read of the log as one JSON array with
    `publish_batch` (either may be None). Each job shard's log has its own consumer group and loop."""
    loops = [asyncio.create_task(_mirror_log(store, sk.events, consumer, publish, stop, publish_batch))
             for sk in store.keys.each_shard]  # fmt: skip
    try:
        await asyncio.gather(*loops)
    finally:
        for loop in loops:
            loop.cancel()


async def _mirror_log(store: Store, key: str, consumer: str, publish: Callable[[list[bytes]], Awaitable[None]] | None,
                      stop: asyncio.Event, publish_batch: Callable[[bytes], Awaitable[None]] | None) -> None:
    redis = store.redis
    created = False
    while not stop.is_set():
        try:
            if not created:
                with contextlib.suppress(redis_errors.ResponseError):  # BUSYGROUP: it exists
                    await redis.xgroup_create(key, MIRROR_GROUP, id="$", mkstream=True)
                created = True
            # First entries a dead replica read but never acknowledged, then our own pending ones
            # (published but not acknowledged before a reconnect), then new ones.
            claimed = await redis.xautoclaim(key, MIRROR_GROUP, consumer, min_idle_time=CLAIM_IDLE_MS, count=500)
            if claimed and claimed[1]:
                log.info("mirror.claimed", entries=len(claimed[1]))
            reply = cast(StreamReply, await redis.xreadgroup(MIRROR_GROUP, consumer, {key: "0"}, count=500))
            if not reply or not reply[0][1]:
                reply = cast(StreamReply, await redis.xreadgroup(MIRROR_GROUP, consumer, {key: ">"}, count=500,
                                                                 block=1000))  # fmt: skip
            for _stream, entries in reply or ():
                if not entries:
                    continue
                events = [decode_event(i, f) for i, f in entries]
                if publish is not None:
                    await publish([orjson.dumps(event) for event in events])
                if publish_batch is not None:
                    await publish_batch(orjson.dumps(events))
                await redis.xack(key, MIRROR_GROUP, *[event_id for event_id, _ in entries])
        except redis_errors.ResponseError as exc:
            if "NOGROUP" in str(exc):
                created = False  # the stream was deleted (Redis restarted without persistence)
                continue
            log.warning("mirror.failed", error=str(exc))
            await asyncio.sleep(1)
        except Exception as exc:  # MQTT or Redis away: retry; unacknowledged events are published again
            log.warning("mirror.failed", error=str(exc), error_type=type(exc).__name__)
            await asyncio.sleep(1)
