"""The live allocation stream: server-sent events from the event log, resumable with `Last-Event-ID`."""

from __future__ import annotations

import asyncio

from aiohttp import web

from broker.http.deps import DEPS
from broker.http.routes import STR, Route, param
from broker.state.events import cursor_after
from common.errors import InvalidInput

KEEPALIVE_S = 15.0
BATCH = 500  # events written to the operator at once when many are waiting
STARTED_WAIT_S = 10.0  # a replica just started: how long a stream waits for the tail to find the log's end


async def stream(request: web.Request) -> web.StreamResponse:
    """Server-sent events: the backlog after `Last-Event-ID` (if given), then every event live."""
    feed = request.app[DEPS].feed
    last = request.headers.get("Last-Event-ID") or request.query.get("last_event_id") or ""
    if last and not feed.valid(last):
        raise InvalidInput("Last-Event-ID must be an event's id, a stream id like 1700000000000-0 (with more than "
                           "one job shard, one per shard, comma-separated)", "Last-Event-ID")  # fmt: skip
    await feed.wait_started(STARTED_WAIT_S)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})  # fmt: skip

    async def send(items: list[tuple[str, bytes]]) -> None:
        nonlocal last
        chunk = bytearray()
        for event_id, data in items:
            if last and not cursor_after(event_id, last):
                continue
            chunk += b"id: " + event_id.encode() + b"\nevent: allocation\ndata: " + data + b"\n\n"
            last = event_id
        if chunk:
            await response.write(bytes(chunk))

    async def catch_up() -> None:
        while last:
            backlog = await feed.backlog(last)
            if not backlog:
                return
            await send(backlog)

    try:
        async with feed.subscribe() as subscription:
            # subscribed before the preamble: every event logged after the operator reads it is sent
            await response.prepare(request)
            await response.write(b": suanwang allocation stream\nretry: 2000\n\n")
            await catch_up()
            while True:
                if subscription.overflowed and subscription.queue.empty():
                    await catch_up()  # fell behind the live feed: read the rest from the log
                    feed.resubscribe(subscription)
                try:
                    first = await asyncio.wait_for(subscription.queue.get(), KEEPALIVE_S)
                except TimeoutError:
                    await response.write(b": keepalive\n\n")
                    continue
                batch = [first]
                while not subscription.queue.empty() and len(batch) < BATCH:
                    batch.append(subscription.queue.get_nowait())
                await send(batch)
    except ConnectionResetError:
        pass  # the operator went away
    return response


ROUTES = (
    Route("GET", "/v1/allocations/stream", stream, "Server-sent events: every allocation, release and state change",
          role="operator", errors=(400,), content="text/event-stream", query_token=True, params=(
              param("Last-Event-ID", "header", STR, "Resume after this event id"),
              param("last_event_id", "query", STR, "Resume after this event id (for EventSource)"),
              param("access_token", "query", STR, "The API token, for EventSource, which cannot send headers"),
          )),
)  # fmt: skip
