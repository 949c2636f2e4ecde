"""`GET /metrics`: the replica's Prometheus metrics, with the gauges that describe the whole network (queue
depth, capacity by hub and architecture) brought up to date at each scrape."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from broker.http.deps import DEPS
from broker.http.routes import Route


async def scrape_metrics(request: web.Request) -> web.Response:
    """The exposition of the replica's registry, after refreshing the capacity and queue-depth gauges."""
    deps = request.app[DEPS]
    await deps.scrape()
    for priority, n in (await deps.store.queue_depths()).items():
        deps.metrics.queue_depth.labels(priority).set(n)
    return web.Response(body=deps.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})


ROUTES = (Route("GET", "/metrics", scrape_metrics, "Prometheus metrics of this replica", role="operator", content=""),)
