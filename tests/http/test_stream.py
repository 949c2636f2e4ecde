"""The live stream over HTTP: it resumes after the event a client names, and refuses an id that is none."""

from __future__ import annotations

import asyncio

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
