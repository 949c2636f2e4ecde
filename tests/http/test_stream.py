"""The live stream over HTTP: it resumes after the event a client names, and refuses an id that is none."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from broker.http.deps import Subscription
from tests.http.doubles import MemoryFeed
from tests.http.harness import Start

EVENTS = [(f"17000000000{i:02d}-0", b'{"type":"allocated","n":%d}' % i) for i in range(3)]


async def test_stream_resumes_after_last_event_id(start: Start) -> None:
    """With Last-Event-ID the stream first sends every logged event after it, in order, each with its id."""
    api = await start(feed=MemoryFeed(EVENTS))
    operator = api.tokens.add("operator", "ops")
    headers = {"Authorization": f"Bearer {operator}", "Last-Event-ID": EVENTS[0][0]}
    async with api.client.get("/v1/allocations/stream", headers=headers) as response:
        assert response.status == 200 and response.headers["Cache-Control"] == "no-cache"
        received = b""
        async with asyncio.timeout(5):
            while f"id: {EVENTS[2][0]}".encode() not in received:
                received += await response.content.readany()
    assert f"id: {EVENTS[0][0]}".encode() not in received
    assert received.index(EVENTS[1][1]) < received.index(EVENTS[2][1])
    assert b"event: allocation\ndata: " + EVENTS[1][1] + b"\n\n" in received


async def test_stream_refuses_a_malformed_last_event_id(start: Start) -> None:
    """A Last-Event-ID that is not a stream id is 400 naming it."""
    api = await start(feed=MemoryFeed(EVENTS))
    reply = await api.call("GET", "/v1/allocations/stream", api.tokens.add("operator", "ops"),
                           headers={"Last-Event-ID": "yesterday"})  # fmt: skip
    assert reply.status == 400 and reply.body["error"]["field"] == "Last-Event-ID"


class LateFeed(MemoryFeed):
    """A live feed whose tail has not yet found the log's end until `start()`; it delivers `live` to every
    subscription made by then, as the real tail delivers the events logged after it started."""

    def __init__(self, live: list[tuple[str, bytes]]) -> None:
        super().__init__()
        self.live = live
        self.started = asyncio.Event()
        self.waited = asyncio.Event()

    async def wait_started(self, timeout: float) -> None:
        self.waited.set()
        await asyncio.wait_for(self.started.wait(), timeout)

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[Subscription]:
        subscription = Subscription(100)
        for item in self.live:
            subscription.queue.put_nowait(item)
        yield subscription

    def start(self) -> None:
        self.started.set()


async def test_a_stream_answers_once_the_live_feed_has_started_and_misses_nothing_after(start: Start) -> None:
    """A replica just started: the stream waits for its tail to find the log's end before it answers (an event
    logged in between would otherwise be skipped by the tail and never reach this operator), then sends every
    live event."""
    feed = LateFeed(EVENTS)
    api = await start(feed=feed)
    operator = api.tokens.add("operator", "ops")
    opening = asyncio.ensure_future(api.client.get("/v1/allocations/stream",
                                                   headers={"Authorization": f"Bearer {operator}"}))  # fmt: skip
    async with asyncio.timeout(5):
        await feed.waited.wait()
    assert not opening.done(), "the stream answered before its feed could deliver what comes next"
    feed.start()
    async with asyncio.timeout(5):
        response = await opening
        received = b""
        while f"id: {EVENTS[2][0]}".encode() not in received:
            received += await response.content.readany()
    response.release()
    assert received.startswith(b": "), "the preamble first"
    assert all(data in received for _, data in EVENTS)
