"""Liveness: whether this replica reaches Redis and the MQTT broker."""

from __future__ import annotations

from aiohttp import web

from broker.http.deps import DEPS
from broker.http.responses import json_response
from broker.http.routes import Route


async def health(request: web.Request) -> web.Response:
    """200 when Redis and MQTT are both reachable, else 503; the body says which is not."""
    deps = request.app[DEPS]
    redis_ok = await deps.store.ping()
    mqtt_ok = deps.mqtt_up()
    ok = redis_ok and mqtt_ok
    return json_response({"status": "ok" if ok else "degraded", "redis": redis_ok, "mqtt": mqtt_ok},
                         200 if ok else 503)  # fmt: skip


ROUTES = (
    Route("GET", "/healthz", health, "Liveness and whether Redis and MQTT are reachable", role="public",
          ok=(200, "Health"), also_ok={503: "Health"}),
)  # fmt: skip
