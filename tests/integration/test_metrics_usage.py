"""Prometheus metrics after known activity, and usage records against jobs with known durations and prices."""

from __future__ import annotations

import asyncio
import csv
import io
import time
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from broker.service import Broker
from suanwang.servers import MosquittoServer
from tests.integration.test_end_to_end import (
    GPU_MODEL,
    HandSite,
    get_json,
    gpu_pool,
    hand_site,
    job_body,
    job_when,
    online,
    submit,
)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus exposition as {(name, sorted labels): value}."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def scrape(http: aiohttp.ClientSession) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with http.get("/metrics") as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        return samples(await response.text())


def hold(site: HandSite, item: Any) -> None:
    """Accept and report running; the test decides when the job ends."""
    site.link.emit(item.job, item.attempt, "accepted")
    site.link.emit(item.job, item.attempt, "running")


def reject(site: HandSite, item: Any) -> None:
    site.link.emit(item.job, item.attempt, "rejected", "maintenance window")


async def test_metrics_count_placements_rejections_messages_and_capacity(
    broker: Broker, http: aiohttp.ClientSession, own_mosquitto: MosquittoServer
) -> None:
    """After one placement and one site rejection, /metrics shows them, the latency histogram, MQTT traffic
    and the hub's capacity and utilization."""
    async with hand_site(own_mosquitto, "metered-1", [gpu_pool(16, price=9.0)], hold) as site:
        await online(http, "metered-1")
        job_id = await submit(http, job_body(4))
        await job_when(http, job_id, lambda j: j["state"] == "running")
        site.answer = reject
        second = await submit(http, job_body(2))
        await job_when(http, second, lambda j: j["attempts"] >= 1 and j["state"] in ("queued", "assigned"))
        await asyncio.sleep(0.3)  # let the rejection event be ingested
        metrics = await scrape(http)
    assert metrics[("suanwang_placements_total", (("arch", "GPU"), ("hub", "guizhou")))] >= 2
    assert metrics[("suanwang_rejections_total", (("reason", "site_rejected"),))] >= 1
    assert metrics[("suanwang_submit_to_allocation_seconds_count", ())] >= 2
    assert metrics[("suanwang_mqtt_messages_total", (("type", "capacity"),))] >= 1
    assert metrics[("suanwang_mqtt_messages_total", (("type", "events"),))] >= 3
    total = metrics[("suanwang_capacity_devices", (("arch", "GPU"), ("hub", "guizhou"), ("kind", "total")))]
    assert total == 16
    assert metrics[("suanwang_utilization_ratio", (("arch", "GPU"), ("hub", "guizhou")))] >= 4 / 16
    assert ("suanwang_queue_depth", (("priority", "normal"),)) in metrics
    assert metrics[("suanwang_redis_roundtrip_seconds_count", ())] >= 1


async def test_dropped_mqtt_messages_are_counted_by_reason(
    broker: Broker, http: aiohttp.ClientSession, own_mosquitto: MosquittoServer
) -> None:
    """A malformed capacity message is dropped and counted under its reason."""
    from tests.integration.test_end_to_end import mqtt_client

    async with mqtt_client(own_mosquitto) as client:
        await client.publish("suanwang/v1/sites/garbled-1/capacity", b"{not json", qos=1)
    for _ in range(50):
        metrics = await scrape(http)
        if metrics.get(("suanwang_mqtt_dropped_total", (("reason", "invalid_capacity"),)), 0) >= 1:
            break
        await asyncio.sleep(0.1)
    assert metrics[("suanwang_mqtt_dropped_total", (("reason", "invalid_capacity"),))] == 1


async def test_usage_record_prices_the_time_a_job_held_its_devices(
    broker: Broker, http: aiohttp.ClientSession, own_mosquitto: MosquittoServer
) -> None:
    """A job of 4 devices at 9 CNY/h that runs ~0.6 s gets one usage record: device-hours = 4 x elapsed, cost =
    price x device-hours, with its hub, tenant and model; the CSV export carries the same row."""
    started_before = int(time.time() * 1000)
    async with hand_site(own_mosquitto, "billed-1", [gpu_pool(16, price=9.0)], hold) as site:
        await online(http, "billed-1")
        job_id = await submit(http, job_body(4))
        view = await job_when(http, job_id, lambda j: j["state"] == "running")
        await asyncio.sleep(0.6)
        site.link.emit(job_id, view["allocation"]["attempt"], "completed")
        done = await job_when(http, job_id, lambda j: j["state"] == "completed")
    status, usage = await get_json(http, f"/v1/usage?from={started_before}")
    assert status == 200
    [record] = [r for r in usage["records"] if r["job"] == job_id]
    elapsed_h = (record["end"] - record["start"]) / 3_600_000
    assert 0.5 / 3600 < elapsed_h < 5 / 3600
    assert record["devices"] == 4 and record["model"] == GPU_MODEL and record["hub"] == "guizhou"
    assert record["tenant"] == done["tenant"] and record["state"] == "completed"
    assert record["price"] == 9.0
    assert abs(record["device_hours"] - 4 * elapsed_h) < 1e-5
    assert abs(record["cost"] - 9.0 * record["device_hours"]) < 1e-3
    hub_total = next(row for row in usage["by_hub"] if row["hub"] == "guizhou")
    assert hub_total["jobs"] == 1 and abs(hub_total["cost_cny"] - round(record["cost"], 2)) < 0.01
    async with http.get(f"/v1/usage?from={started_before}&format=csv") as response:
        assert response.status == 200 and response.content_type == "text/csv"
        rows = list(csv.DictReader(io.StringIO(await response.text())))
    assert [r["job"] for r in rows] == [job_id]
    assert float(rows[0]["cost"]) == record["cost"]


async def test_usage_range_and_bad_times(broker: Broker, http: aiohttp.ClientSession) -> None:
    """A range that ends before anything ran is empty; a malformed time is a 400 naming the parameter."""
    status, usage = await get_json(http, "/v1/usage?to=1000")
    assert status == 200 and usage["records"] == [] and usage["total_cost_cny"] == 0
    status, body = await get_json(http, "/v1/usage?from=yesterday")
    assert status == 400 and body["error"]["field"] == "from"
    status, body = await get_json(http, "/v1/usage?from=2026-11-21T00:00:00")
    assert status == 400 and body["error"]["field"] == "from"


async def test_dashboard_summary_shows_revenue_by_hub_and_sites_keep_a_status_history(
    broker: Broker, http: aiohttp.ClientSession, own_mosquitto: MosquittoServer
) -> None:
    """A finished job's cost shows in the dashboard's 24-hour revenue by hub, and a site's status changes
    (online, then offline) are listed on its page."""
    from tests.integration.test_end_to_end import mqtt_client

    async with hand_site(own_mosquitto, "earning-1", [gpu_pool(16, price=9.0)], hold) as site:
        await online(http, "earning-1")
        job_id = await submit(http, job_body(2))
        view = await job_when(http, job_id, lambda j: j["state"] == "running")
        site.link.emit(job_id, view["allocation"]["attempt"], "completed")
        await job_when(http, job_id, lambda j: j["state"] == "completed")
    status, summary = await get_json(http, "/v1/dashboard/summary")
    assert status == 200
    [guizhou] = [row for row in summary["revenue_24h_by_hub"] if row["hub"] == "guizhou"]
    assert guizhou["jobs"] == 1 and guizhou["cost_cny"] >= 0
    async with mqtt_client(own_mosquitto) as client:
        await client.publish("suanwang/v1/sites/earning-1/status", b"offline", qos=1, retain=True)
    for _ in range(50):
        status, page = await get_json(http, "/v1/sites/earning-1")
        if [e["status"] for e in page["status_history"]][-1:] == ["offline"]:
            break
        await asyncio.sleep(0.1)
    assert [e["status"] for e in page["status_history"]][-2:] == ["online", "offline"]
    assert all(e["ts"].endswith("Z") for e in page["status_history"])
