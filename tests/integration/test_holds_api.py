"""Quote, hold, commit over HTTP: a real broker in-process, real Redis and Mosquitto, sites over MQTT.

A quote holds its best place at the quoted price; the job submitted with the hold runs exactly there at that
price even after the site raised it; an unused hold expires by itself and gives its devices back; a hold
is used once; users and operators see holds; audit and the history checker agree with what happened."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from broker.service import Broker
from broker.state.audit import audit_report
from broker.state.history import check_history
from suanwang.servers import MosquittoServer
from tests.integration.test_quote_api import all_online, call, job_when, pool, sites
from tests.support import eventually

SITES = [
    ("guian-h1", "guizhou", "guian", [pool("A100-80G", price=10.0, total=16)]),
    ("guian-h2", "guizhou", "guian", [pool("A100-80G", price=11.0, total=16)]),
]


def body(**extra: Any) -> dict[str, Any]:
    return {"name": "held", "workload": "training", "resources": {"arch": "GPU", "count": 8}, "origin": "guiyang",
            "duration_hours": 2, "policy": "cheapest", **extra}  # fmt: skip


async def allocated(http: aiohttp.ClientSession, site: str) -> int:
    _, view = await call(http, "GET", f"/v1/sites/{site}")
    return int(view["pools"][0]["allocated"])


async def test_a_held_quote_commits_at_the_quoted_price_and_an_unused_hold_expires(
    broker: Broker, http: aiohttp.ClientSession, own_mosquitto: MosquittoServer
) -> None:
    async with sites(own_mosquitto, SITES) as links:
        await all_online(http, {s[0] for s in SITES})
        status, quoted = await call(http, "POST", "/v1/quote?hold=true", body())
        assert status == 200, quoted
        hold = quoted["hold"]
        best = quoted["candidates"][0]
        assert (hold["state"], hold["site"], hold["devices"]) == ("held", "guian-h1", 8)
        assert hold["price_cny_per_hour"] == best["price_cny_per_hour"] == 10.0
        assert 0 < hold["expires_in_s"] <= 60
        assert await allocated(http, "guian-h1") == 8, "the held devices are taken"

        # the site raises its price after the quote: the held job still pays what was quoted
        links[0].set_capacity([pool("A100-80G", price=30.0, total=16)])

        async def repriced() -> bool:
            _, view = await call(http, "GET", "/v1/sites/guian-h1")
            return view["pools"][0]["price_cny_per_hour"] == 30.0

        await eventually(repriced, "the new price to reach the broker")
        status, job = await call(http, "POST", "/v1/jobs", body(hold=hold["id"], name="renamed"))
        assert status == 202, job
        assert job["state"] == "assigned", "placed in the same step that stored it"
        assert (job["allocation"]["site"], job["allocation"]["price_cny_per_hour"]) == ("guian-h1", 10.0)
        await job_when(http, job["id"], lambda j: j["state"] == "running")
        assert await allocated(http, "guian-h1") == 8, "the hold's devices passed to the job, not taken twice"
        status, used = await call(http, "GET", f"/v1/holds/{hold['id']}")
        assert (status, used["state"], used["job"]) == (200, "used", job["id"])

        status, again = await call(http, "POST", "/v1/jobs", body(hold=hold["id"]))
        assert (status, again["error"]["code"]) == (409, "hold_used"), again

        # a hold nobody uses gives its devices back by itself
        status, short = await call(http, "POST", "/v1/quote?hold=true&hold_ttl_s=1", body())
        assert status == 200, short
        assert short["hold"]["site"] == "guian-h2", "guian-h1 has 8 left at 30 CNY/h now; guian-h2 is cheaper"
        assert await allocated(http, "guian-h2") == 8

        async def expired() -> dict[str, Any] | None:
            _, view = await call(http, "GET", f"/v1/holds/{short['hold']['id']}")
            return view if view["state"] == "expired" else None

        await eventually(expired, "the hold to expire")
        assert await allocated(http, "guian-h2") == 0
        status, late = await call(http, "POST", "/v1/jobs", body(hold=short["hold"]["id"]))
        assert (status, late["error"]["code"]) == (409, "hold_expired"), late
        assert "quote again" in late["error"]["message"]

    report = await audit_report(broker.store)
    assert report.violations == [], report.violations
    assert (await check_history(broker.store)).ok


async def test_holds_are_listed_released_and_refused_with_reasons(
    broker: Broker, http: aiohttp.ClientSession, own_mosquitto: MosquittoServer
) -> None:
    async with sites(own_mosquitto, SITES):
        await all_online(http, {s[0] for s in SITES})
        status, quoted = await call(http, "POST", "/v1/quote?hold_site=guian-h2", body())
        assert status == 200, quoted
        hold = quoted["hold"]
        assert hold["site"] == "guian-h2", "a chosen candidate, not the best"
        status, listed = await call(http, "GET", "/v1/holds")
        assert status == 200 and [h["id"] for h in listed["holds"]] == [hold["id"]]

        status, full = await call(http, "POST", "/v1/quote?hold_site=guian-h2", body(resources={"arch": "GPU",
                                                                                                "count": 12}))
        assert (status, full["error"]["code"]) == (409, "hold_refused"), "guian-h2 has 8 free, the job wants 12"

        status, other = await call(http, "POST", "/v1/jobs", body(hold=hold["id"], origin="beijing"))
        assert (status, other["error"]["code"]) == (409, "hold_mismatch"), other

        status, released = await call(http, "DELETE", f"/v1/holds/{hold['id']}")
        assert (status, released["state"]) == (200, "released")
        assert await allocated(http, "guian-h2") == 0
        status, twice = await call(http, "DELETE", f"/v1/holds/{hold['id']}")
        assert status == 409, twice
        assert (await call(http, "GET", "/v1/holds"))[1]["holds"] == []


@pytest.mark.parametrize(("query", "field"), [("hold=maybe", "hold"), ("hold=true&hold_ttl_s=100000", "hold_ttl_s"),
                                              ("hold=true&hold_ttl_s=soon", "hold_ttl_s")])  # fmt: skip
async def test_bad_hold_parameters_are_refused_by_name(http: aiohttp.ClientSession, query: str, field: str) -> None:
    status, answer = await call(http, "POST", f"/v1/quote?{query}", body())
    assert (status, answer["error"]["field"]) == (400, field), answer


async def test_a_held_job_is_not_taken_in_a_batch(http: aiohttp.ClientSession) -> None:
    status, answer = await call(http, "POST", "/v1/jobs:batch", {"jobs": [body(hold="h0")]})
    assert status == 200
    assert (answer["jobs"][0]["status"], answer["jobs"][0]["error"]["field"]) == (400, "jobs[0].hold")


async def test_an_unknown_hold_is_refused(http: aiohttp.ClientSession) -> None:
    status, answer = await call(http, "POST", "/v1/jobs", body(hold="hnothere"))
    assert (status, answer["error"]["code"]) == (409, "hold_unknown"), answer


async def cli(*args: str) -> tuple[int, Any]:
    """Run `suanwang ARGS --json` in its own process; its exit status and printed JSON."""
    pipe = asyncio.subprocess.PIPE
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "suanwang.cli", *args, "--json",
                                                stdout=pipe, stderr=pipe)  # fmt: skip
    out, err = await proc.communicate()
    return proc.returncode or 0, orjson.loads(out) if out.strip() else err.decode()


async def test_the_command_line_holds_submits_on_the_hold_and_lists_holds(
    broker: Broker, http: aiohttp.ClientSession, own_mosquitto: MosquittoServer, tmp_path: Path
) -> None:
    job_file = tmp_path / "job.json"
    job_file.write_bytes(orjson.dumps(body()))
    address = broker.url
    async with sites(own_mosquitto, SITES):
        await all_online(http, {s[0] for s in SITES})
        status, taken = await cli("hold", "take", str(job_file), "--ttl", "30", "--http", address)
        assert status == 0, taken
        hold = taken["hold"]
        assert hold["site"] == "guian-h1" and hold["expires_in_s"] <= 30
        status, listed = await cli("hold", "list", "--http", address)
        assert status == 0 and [h["id"] for h in listed["holds"]] == [hold["id"]]
        status, job = await cli("submit", str(job_file), "--hold", hold["id"], "--http", address)
        assert status == 0, job
        assert (job["state"], job["allocation"]["site"]) == ("assigned", "guian-h1")
        status, shown = await cli("hold", "show", hold["id"], "--http", address)
        assert status == 0 and shown["state"] == "used" and shown["job"] == job["id"]
