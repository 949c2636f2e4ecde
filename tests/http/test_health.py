"""Liveness over HTTP: healthy only when both Redis and MQTT are reachable, and public."""

from __future__ import annotations

import pytest

from tests.http.harness import Api, Start, job_body


@pytest.mark.parametrize(("redis", "mqtt", "status", "state"), [
    (True, True, 200, "ok"),
    (False, True, 503, "degraded"),
    (True, False, 503, "degraded"),
])  # fmt: skip
async def test_health_reports_each_dependency(api: Api, redis: bool, mqtt: bool, status: int, state: str) -> None:
    """/healthz is 200 when Redis and MQTT are both up, else 503, and says which is reachable; no token needed."""
    api.store.reachable, api.mqtt[0] = redis, mqtt
    reply = await api.call("GET", "/healthz")
    assert reply.status == status
    assert reply.body == {"status": state, "redis": redis, "mqtt": mqtt}


async def test_metrics_refresh_the_network_gauges_at_each_scrape(start: Start) -> None:
    """/metrics runs the scrape callable and sets the queue depth per priority from the store before exposing."""
    scrapes: list[int] = []

    async def scrape() -> None:
        scrapes.append(1)

    api = await start(scrape=scrape)
    await api.call("POST", "/v1/jobs", api.tokens.add("user", "acme"), job_body())
    reply = await api.call("GET", "/metrics", api.tokens.add("operator", "ops"))
    assert reply.status == 200 and reply.headers["Content-Type"].startswith("text/plain")
    assert b'suanwang_queue_depth{priority="normal"} 1.0' in reply.body
    assert scrapes == [1]
