"""Backfill: small work uses what a blocked gang cannot use yet, without delaying the gang's expected start."""

from __future__ import annotations

from typing import Any

import aiohttp

from suanwang.servers import MosquittoServer, RedisServer
from tests.integration.test_end_to_end import (
    HandSite,
    get_json,
    gpu_pool,
    hand_site,
    job_body,
    job_when,
    online,
    running_broker,
    submit,
)


def hold(site: HandSite, item: Any) -> None:
    site.link.emit(item.job, item.attempt, "accepted")
    site.link.emit(item.job, item.attempt, "running")


async def test_gang_keeps_its_place_while_shorter_jobs_backfill(
    redis_server: RedisServer, own_mosquitto: MosquittoServer, namespace: str
) -> None:
    """With 6 of 8 devices busy for an hour, an 8-device gang waits with the site held for it: a 2-device job
    of 2 hours (it would delay the gang) waits too, a 2-device job of 30 minutes runs in the gap, and the
    gang starts as soon as the devices come back."""
    async with (
        running_broker(redis_server, own_mosquitto, namespace, reserve_after_s=0.0) as broker,
        aiohttp.ClientSession(base_url=broker.url) as http,
        hand_site(own_mosquitto, "gap-1", [gpu_pool(8)], hold) as site,
    ):
        await online(http, "gap-1")
        first = await submit(http, job_body(6, duration_hours=1.0))
        first_view = await job_when(http, first, lambda j: j["state"] == "running")
        gang = await submit(http, job_body(8, duration_hours=4.0))
        gang_view = await job_when(http, gang, lambda j: "held for it" in j.get("waiting", ""))
        assert "gap-1" in gang_view["waiting"]
        long_small = await submit(http, job_body(2, duration_hours=2.0))
        short_small = await submit(http, job_body(2, duration_hours=0.5))
        short_view = await job_when(http, short_small, lambda j: j["state"] == "running")
        assert short_view["allocation"]["site"] == "gap-1"
        status, long_view = await get_json(http, f"/v1/jobs/{long_small}")
        assert status == 200 and long_view["state"] == "queued"
        # the devices come back: the gang goes first, the long small job still waits
        site.link.emit(first, first_view["allocation"]["attempt"], "completed")
        site.link.emit(short_small, short_view["allocation"]["attempt"], "completed")
        placed = await job_when(http, gang, lambda j: j["state"] == "running")
        assert placed["allocation"]["devices"] == 8
        status, long_view = await get_json(http, f"/v1/jobs/{long_small}")
        assert long_view["state"] == "queued"
