"""Preemption over HTTP: a real broker in-process, real Redis and Mosquitto, a site over MQTT.

A preemptible low-priority job runs on every device of the site; an urgent job arrives: the low job is
given back to the queue ("preempted by job X of tenant Y"), the site is told to checkpoint it within its
grace period, the urgent job gets the devices when the grace ends, and the low job comes back once they are
free again. Audit and the history checker agree with all of it."""

from __future__ import annotations

from typing import Any

import aiohttp

from broker.service import Broker
from broker.state.audit import audit_report
from broker.state.history import check_history
from common.protocol import Assignments
from suanwang.servers import MosquittoServer
from tests.integration.test_end_to_end import job_events
from tests.integration.test_quote_api import all_online, call, job_when, pool, sites

SITE = [("guian-p1", "guizhou", "guian", [pool("A100-80G", price=10.0, total=8)])]


def body(priority: str, **extra: Any) -> dict[str, Any]:
    return {"name": f"{priority}-job", "workload": "training", "resources": {"arch": "GPU", "count": 8},
            "origin": "guiyang", "duration_hours": 10, "priority": priority, **extra}  # fmt: skip


async def test_a_preemptible_job_gives_way_to_an_urgent_one_and_comes_back(
    broker: Broker, http: aiohttp.ClientSession, own_mosquitto: MosquittoServer
) -> None:
    async with sites(own_mosquitto, SITE) as links:
        told: list[tuple[str, str, float | None]] = []
        accept = links[0].on_assignments

        def record(batch: Assignments) -> None:
            told.extend((a.job, a.action, a.grace_s) for a in batch.assignments)
            if accept is not None:
                accept(batch)

        links[0].on_assignments = record
        await all_online(http, {"guian-p1"})
        status, low = await call(http, "POST", "/v1/jobs", body("low", preemptible=True, grace_s=1))
        assert status == 202, low
        await job_when(http, low["id"], lambda j: j["state"] == "running")

        status, urgent = await call(http, "POST", "/v1/jobs", body("high", name="urgent"))
        assert status == 202, urgent
        placed = await job_when(http, urgent["id"], lambda j: j["state"] == "running")
        assert placed["allocation"]["site"] == "guian-p1"

        back = await job_when(http, low["id"], lambda j: j["state"] == "queued")
        preempted = [h for h in back["history"] if h["event"] == "requeued"]
        assert preempted and preempted[0]["reason"] == f"preempted by job {urgent['id']} of tenant default"
        assert (low["id"], "preempt", 1.0) in told, "the site was told to checkpoint within the grace period"
        assert told.index((low["id"], "preempt", 1.0)) < next(
            i for i, t in enumerate(told) if t[0] == urgent["id"] and t[1] == "run"
        ), "the urgent job is sent only after the preempted one was told to stop"
        kinds = [e["type"] for e in await job_events(broker, low["id"])]
        assert kinds[-2:] == ["released", "requeued"]

        # the urgent job ends; the preempted one comes back to the devices
        status, _ = await call(http, "DELETE", f"/v1/jobs/{urgent['id']}")
        assert status == 200
        again = await job_when(http, low["id"], lambda j: j["state"] == "running")
        assert again["attempts"] == 2


    report = await audit_report(broker.store)
    assert report.violations == [], report.violations
    assert (await check_history(broker.store)).ok
