"""Quotes and explanations over HTTP: a real broker in-process, real Redis and Mosquitto, sites over MQTT.

Each test runs its own broker under its own key namespace against its own Mosquitto, so sites of one test
never reach another test's broker.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import aiohttp
import orjson
import pytest

from adapters.fleet import all_sites
from adapters.sim import run_sim
from adapters.site import SiteLink
from broker.matching import BALANCED_SENSITIVE, BALANCED_TOLERANT
from broker.model.stacks import parse_requirement
from broker.service import Broker
from broker.state.tokens import Tokens
from common.config import MqttTarget
from common.protocol import Assignments
from suanwang.servers import MosquittoServer, RedisServer
from tests.support import eventually, running_broker

WAIT = 20.0
T = TypeVar("T")


# --------------------------------------------------------------------------- helpers


async def call(http: aiohttp.ClientSession, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with http.request(method, path, json=body) as response:
        return response.status, orjson.loads(await response.read())


def pool(model: str, arch: str = "GPU", *, price: float = 10.0, total: int = 64,
         stacks: tuple[str, ...] = ("cuda-12.4",), per_node: int = 8, interconnect: str = "nvlink"
         ) -> dict[str, Any]:  # fmt: skip
    return {"arch": arch, "model": model, "memory_gb": 80, "total": total, "in_use_external": 0, "per_node": per_node,
            "interconnect": interconnect, "stacks": list(stacks), "price_cny_per_hour": price}  # fmt: skip


@asynccontextmanager
async def sites(mqtt: MosquittoServer, specs: list[tuple[str, str, str, list[dict[str, Any]]]]
                ) -> AsyncIterator[list[SiteLink]]:  # fmt: skip
    """Real MQTT sites (id, hub, cluster, pools) that accept and start whatever they are assigned."""
    links: list[SiteLink] = []
    for site, hub, cluster, pools in specs:
        link = SiteLink(MqttTarget.from_url(mqtt.url), site, hub, pools, cluster=cluster, interval=1.0)

        def accept(batch: Assignments, link: SiteLink = link) -> None:
            for item in batch.assignments:
                if item.action == "run":
                    link.emit(item.job, item.attempt, "accepted")
                    link.emit(item.job, item.attempt, "running")

        link.on_assignments = accept
        links.append(link)
    tasks = [asyncio.create_task(link.run(), name=f"site-{link.site}") for link in links]
    try:
        yield links
    finally:
        for link in links:
            link.stop()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def all_online(http: aiohttp.ClientSession, ids: set[str]) -> dict[str, dict[str, Any]]:
    """Wait until the broker lists every site in `ids` online; returns their views by id."""

    async def probe() -> dict[str, dict[str, Any]] | None:
        _, listed = await call(http, "GET", "/v1/sites")
        online = {s["id"]: s for s in listed["sites"] if s["status"] == "online" and s["pools"]}
        return online if ids <= set(online) else None

    return await eventually(probe, f"{len(ids)} sites online")


async def submit(http: aiohttp.ClientSession, body: dict[str, Any]) -> str:
    status, view = await call(http, "POST", "/v1/jobs", body)
    assert status == 202, view
    return str(view["id"])


async def job_when(http: aiohttp.ClientSession, job_id: str, check: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        status, view = await call(http, "GET", f"/v1/jobs/{job_id}")
        assert status == 200, view
        return view if check(view) else None

    return await eventually(probe, f"job {job_id}")


def job_body(**extra: Any) -> dict[str, Any]:
    return {"name": "quote-it", "workload": "training", "resources": {"arch": "GPU", "count": 8},
            "origin": "guiyang", "duration_hours": 1, **extra}  # fmt: skip


THREE_SITES = [
    ("guian-q1", "guizhou", "guian", [pool("A100-80G", price=10.0), pool("Ascend-910B", "ASIC", price=4.0,
                                                                           stacks=("cann-8.0",), interconnect="hccs")]),
    ("guian-q2", "guizhou", "guian", [pool("A100-80G", price=11.0, stacks=("cuda-11.8", "cuda-12.4"))]),
    ("qingyang-q3", "gansu", "qingyang", [pool("A100-80G", price=12.0, stacks=("cuda-12.0",))]),
]  # fmt: skip


# --------------------------------------------------------------------------- quotes


async def test_quote_returns_ranked_candidates_without_taking_capacity(
    broker: Broker, http: aiohttp.ClientSession, own_mosquitto: MosquittoServer
) -> None:
    """POST /v1/quote ranks the places a job could go with prices and totals, and allocates nothing."""
    async with sites(own_mosquitto, THREE_SITES):
        await all_online(http, {s[0] for s in THREE_SITES})
        body = job_body(policy="cheapest", duration_hours=3)
        for _ in range(2):
            status, quoted = await call(http, "POST", "/v1/quote", body)
            assert status == 200, quoted
            offers = quoted["candidates"]
            assert [o["site"] for o in offers] == ["guian-q1", "guian-q2", "qingyang-q3"]
            assert quoted["feasible_sites"] == 3 and "waiting" not in quoted
            for o in offers:
                assert o["model"] == "A100-80G" and o["devices"] == 8
                assert o["cost_cny_per_hour"] == pytest.approx(8 * o["price_cny_per_hour"])
                assert o["total_cost_cny"] == pytest.approx(o["cost_cny_per_hour"] * o["est_hours"], abs=0.01)
                assert o["hub"] in {"guizhou", "gansu"} and o["latency_ms"] is not None
        _, listed = await call(http, "GET", "/v1/sites")
        assert all(p["allocated"] == 0 for s in listed["sites"] for p in s["pools"])
        _, jobs = await call(http, "GET", "/v1/jobs")
        assert jobs["jobs"] == []


async def test_quote_for_a_job_that_does_not_fit_says_what_would(
    broker: Broker, http: aiohttp.ClientSession, own_mosquitto: MosquittoServer
) -> None:
    """A quote for an unfit job carries the aggregated reasons and what-ifs with the sites each would open."""
    async with sites(own_mosquitto, THREE_SITES):
        await all_online(http, {s[0] for s in THREE_SITES})
        status, quoted = await call(http, "POST", "/v1/quote", job_body(max_price_cny_per_hour=9.5))
        assert status == 200, quoted
        assert quoted["candidates"] == []
        assert quoted["waiting"] == "3 sites: price above 9.5 CNY/h"
        what_if = {w["change"]: w for w in quoted["what_if"]}
        assert set(what_if) == {"no price cap", "pay up to 11.88 CNY/h"}
        assert (what_if["no price cap"]["sites"], what_if["pay up to 11.88 CNY/h"]["sites"]) == (3, 2)
        assert what_if["no price cap"]["text"].startswith("no price cap -> fits: 3 sites, best ")


# --------------------------------------------------------------------------- explanations on jobs


async def test_queued_job_shows_why_it_waits_aggregated_over_sites(
    broker: Broker, http: aiohttp.ClientSession, own_mosquitto: MosquittoServer
) -> None:
    """A job nothing can take stays queued and its view says why, counted per reason over sites."""
    async with sites(own_mosquitto, THREE_SITES):
        await all_online(http, {s[0] for s in THREE_SITES})
        job_id = await submit(http, job_body(software=[{"stack": "cuda", "versions": ">=12.1"}],
                                             max_price_cny_per_hour=9.5))  # fmt: skip
        view = await job_when(http, job_id, lambda v: v["waiting"] != "waiting for the matcher")
        assert view["state"] == "queued" and view["allocation"] is None
        # guian-q1 and guian-q2 run cuda-12.4 but cost 10 and 11; qingyang-q3 is cheap enough but has cuda-12.0
        assert view["waiting"] == "2 sites: price above 9.5 CNY/h; 1 site: no pool with cuda>=12.1"


async def test_allocated_job_records_scores_runners_up_and_stack(
    broker: Broker, http: aiohttp.ClientSession, own_mosquitto: MosquittoServer
) -> None:
    """An allocated job's view has the named scores, distinct runner-up sites, and the stack and image chosen."""
    async with sites(own_mosquitto, THREE_SITES):
        await all_online(http, {s[0] for s in THREE_SITES})
        software = [{"stack": "cann", "versions": ">=8.0", "image": "reg/train:cann8"},
                    {"stack": "cuda", "versions": ">=12.1", "image": "reg/train:cuda12"}]  # fmt: skip
        job_id = await submit(http, job_body(resources={"archs": ["GPU", "ASIC"], "count": 8}, software=software,
                                             workload="inference"))  # fmt: skip
        view = await job_when(http, job_id, lambda v: v["allocation"] is not None)
        allocation = view["allocation"]
        assert set(allocation["scores"]) == set(BALANCED_SENSITIVE)
        assert all(0 <= v <= 100 for v in allocation["scores"].values())
        runners = [r["site"] for r in allocation["runners_up"]]
        assert len(set(runners)) == len(runners) and allocation["site"] not in runners
        # qingyang-q3 has only cuda-12.0: never a candidate
        assert {allocation["site"], *runners} == {"guian-q1", "guian-q2"}
        expected = {("guian-q1", "Ascend-910B"): ("cann-8.0", "reg/train:cann8"),
                    ("guian-q1", "A100-80G"): ("cuda-12.4", "reg/train:cuda12"),
                    ("guian-q2", "A100-80G"): ("cuda-12.4", "reg/train:cuda12")}  # fmt: skip
        assert (allocation["stack"], allocation["image"]) == expected[(allocation["site"], allocation["model"])]
        assert allocation["unit_price_cny_per_hour"] == pytest.approx(allocation["price_cny_per_hour"])
        for runner in allocation["runners_up"]:
            assert set(runner["scores"]) == set(BALANCED_SENSITIVE)


# --------------------------------------------------------------------------- the "Done means"

ALLOWED_HUBS = ["yangtze", "neimenggu", "guizhou", "gansu", "ningxia"]
DONE_SOFTWARE = [{"stack": "cann", "versions": ">=8.0", "image": "reg/llm:cann"},
                 {"stack": "cuda", "versions": ">=12.1", "image": "reg/llm:cuda"}]  # fmt: skip


def done_means_job(cap: float) -> dict[str, Any]:
    """The equivalent of 64 A100s for training, CANN or CUDA, data in the Yangtze delta or the west, under `cap`."""
    return {"name": "llm-pretrain", "workload": "training", "origin": "shanghai", "duration_hours": 2,
            "resources": {"equivalent": {"units": 64, "reference": "A100-80G"}}, "software": DONE_SOFTWARE,
            "residency": {"allow_hubs": ALLOWED_HUBS}, "max_price_cny_per_hour": cap}  # fmt: skip


@pytest.mark.slow
async def test_done_means_equivalent_job_on_the_demo_fleet(
    broker: Broker, http: aiohttp.ClientSession, own_mosquitto: MosquittoServer
) -> None:
    """On the demo fleet, "64 A100-equivalents for training, CANN or CUDA, Yangtze or west, under 12 CNY per
    A100-hour" is placed inside the rules with its reasons; with a cap too low the quote says what would fit."""
    stop = asyncio.Event()
    hubs = sorted({s.hub for s in all_sites()})
    assert len(hubs) == 8
    sims = [asyncio.create_task(run_sim(MqttTarget.from_url(own_mosquitto.url), hub, interval=2.0,
                                        time_scale=3600.0, stop=stop)) for hub in hubs]  # fmt: skip
    try:
        await all_online(http, {s.id for s in all_sites()})
        # too low a cap: a quote with reasons and the relaxations that would fit
        status, quoted = await call(http, "POST", "/v1/quote", done_means_job(1.0))
        assert status == 200, quoted
        assert quoted["candidates"] == [] and "price above 1 CNY/h" in quoted["waiting"]
        assert "outside the allowed hubs and provinces" in quoted["waiting"]
        what_if = {w["change"]: w for w in quoted["what_if"]}
        assert "no price cap" in what_if and what_if["no price cap"]["sites"] > 0
        assert what_if["no price cap"]["best"]["hub"] in ALLOWED_HUBS
        for w in quoted["what_if"]:
            assert w["sites"] > 0 and w["text"].startswith(w["change"] + " -> ")
        # the real cap: placed, with its reasons
        job_id = await submit(http, done_means_job(12.0))
        view = await job_when(http, job_id, lambda v: v["allocation"] is not None)
        allocation = view["allocation"]
        assert allocation["hub"] in ALLOWED_HUBS
        assert allocation["unit_price_cny_per_hour"] <= 12.0
        assert allocation["cost_cny_per_hour"] == pytest.approx(allocation["unit_price_cny_per_hour"] * 64, rel=1e-3)
        options = [parse_requirement(s["stack"], s["versions"], s["image"]) for s in DONE_SOFTWARE]
        admitting = [o for o in options if o.admits(allocation["stack"])]
        assert admitting and allocation["image"] == admitting[0].image
        assert set(allocation["scores"]) == set(BALANCED_TOLERANT)
        runners = allocation["runners_up"]
        assert runners and len({r["site"] for r in runners}) == len(runners)
        assert all(r["hub"] in ALLOWED_HUBS and r["unit_price_cny_per_hour"] <= 12.0 for r in runners)
        assert all(r["score"] <= allocation["score"] for r in runners)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*sims, return_exceptions=True), 20)


# --------------------------------------------------------------------------- bad input for the new fields

BAD_INPUT = [
    pytest.param({"residency": {"allow_hubs": ["atlantis"]}}, "residency.allow_hubs", id="unknown-hub"),
    pytest.param({"residency": {"deny_hubs": ["atlantis"]}}, "residency.deny_hubs", id="unknown-deny-hub"),
    pytest.param({"residency": {"allow_provinces": ["Atlantis"]}}, "residency.allow_provinces", id="unknown-province"),
    pytest.param(
        {"resources": {"equivalent": {"units": 8, "reference": "Z9000"}}},
        "resources.equivalent.reference",
        id="unknown-reference",
    ),
    pytest.param(
        {"resources": {"arch": "GPU", "count": 8, "equivalent": {"units": 8}}}, "resources", id="count-and-equivalent"
    ),
    pytest.param({"resources": {"arch": "GPU"}}, "resources", id="neither-count-nor-equivalent"),
    pytest.param({"software": [{"stack": "cuda", "versions": "=>12"}]}, "software", id="bad-version-range"),
    pytest.param({"software": [{"stack": "cuda", "versions": ">=12.*"}]}, "software", id="wildcard-with->="),
    pytest.param({"weights": {"speedy": 1}}, "weights.speedy", id="unknown-score-name"),
    pytest.param({"policy": "quickest"}, "policy", id="unknown-policy"),
]


@pytest.mark.parametrize(("change", "field"), BAD_INPUT)
@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/quote"])
async def test_bad_new_fields_are_400_naming_the_field(http: aiohttp.ClientSession, path, change, field) -> None:
    """Submitting or quoting a job with a bad residency, reference, amount or range is a 400 naming the field."""
    status, body = await call(http, "POST", path, job_body(**change))
    assert status == 400, body
    # pydantic names a bad dict key "weights.speedy.[key]": the prefix is what a client can rely on
    assert body["error"]["field"] == field or body["error"]["field"].startswith(field + "."), body
    assert body["error"]["code"]


# --------------------------------------------------------------------------- bounds, rate limits, what a user sees


@asynccontextmanager
async def with_tokens(redis_server: RedisServer, mqtt: MosquittoServer, namespace: str, replicas: int = 1,
                      **overrides: Any) -> AsyncIterator[tuple[list[Broker], Tokens]]:  # fmt: skip
    """`replicas` brokers on one namespace with API tokens required, and the token store."""
    async with contextlib.AsyncExitStack() as stack:
        brokers = [await stack.enter_async_context(running_broker(redis_server, mqtt, namespace, auth="required",
                                                                  **overrides)) for _ in range(replicas)]  # fmt: skip
        yield brokers, Tokens(brokers[0].store.redis, brokers[0].store.keys)


async def call_as(broker: Broker, token: str, method: str, path: str, body: Any = None
                  ) -> tuple[int, Any, dict[str, str]]:  # fmt: skip
    async with aiohttp.ClientSession(base_url=broker.url, headers={"Authorization": f"Bearer {token}"}) as http, \
            http.request(method, path, json=body) as response:  # fmt: skip
        return response.status, orjson.loads(await response.read()), dict(response.headers)


async def test_quotes_are_rate_limited_per_token_across_replicas(
    redis_server: RedisServer, own_mosquitto: MosquittoServer, namespace: str
) -> None:
    """A token's quotes come from one bucket in Redis whichever replica answers: past its burst a 429 with
    Retry-After on the other replica too; another token has its own bucket."""
    async with with_tokens(redis_server, own_mosquitto, namespace, replicas=2, quote_rate=0.2,
                           quote_burst=2) as ((first, second), tokens):  # fmt: skip
        alice, _ = await tokens.create("user", "acme")
        bob, _ = await tokens.create("user", "acme")
        for replica in (first, second):
            status, body, _ = await call_as(replica, alice, "POST", "/v1/quote", job_body())
            assert status == 200, body
        status, body, headers = await call_as(first, alice, "POST", "/v1/quote", job_body())
        assert status == 429 and body["error"]["code"] == "quote_rate_limited", body
        assert 1 <= int(headers["Retry-After"]) <= 5
        status, body, headers = await call_as(second, alice, "POST", "/v1/quote", job_body())
        assert status == 429 and "Retry-After" in headers
        status, body, _ = await call_as(second, bob, "POST", "/v1/quote", job_body())
        assert status == 200, body


async def test_quote_candidates_are_capped_by_limit(
    broker: Broker, http: aiohttp.ClientSession, own_mosquitto: MosquittoServer
) -> None:
    """`?limit=` asks for fewer candidates, best first; out of range it is a 400 naming `limit`."""
    async with sites(own_mosquitto, THREE_SITES):
        await all_online(http, {s[0] for s in THREE_SITES})
        status, quoted = await call(http, "POST", "/v1/quote?limit=2", job_body(policy="cheapest"))
        assert status == 200, quoted
        assert [o["site"] for o in quoted["candidates"]] == ["guian-q1", "guian-q2"]
        assert quoted["feasible_sites"] == 3
        for bad in ("0", "11", "x"):
            status, body = await call(http, "POST", f"/v1/quote?limit={bad}", job_body())
            assert status == 400 and body["error"]["field"] == "limit", body


async def test_a_user_sees_free_devices_and_prices_but_not_other_tenants(
    redis_server: RedisServer, own_mosquitto: MosquittoServer, namespace: str
) -> None:
    """Another tenant's placed job shows to a user only as fewer free devices in quotes and runners-up: its
    id, name and tenant appear nowhere the user can read, and reading it is a 404."""
    async with with_tokens(redis_server, own_mosquitto, namespace, quote_burst=1000) as ((replica,), tokens), \
            sites(own_mosquitto, THREE_SITES):  # fmt: skip
        acme, _ = await tokens.create("user", "acme")
        initech, _ = await tokens.create("user", "initech")

        async def online() -> bool:
            status, body, _ = await call_as(replica, acme, "POST", "/v1/quote", job_body())
            return status == 200 and body["feasible_sites"] == 3

        await eventually(online, "three sites in quotes")
        status, theirs, _ = await call_as(replica, initech, "POST", "/v1/jobs",
                                          job_body(name="initech-secret-run", policy="cheapest"))  # fmt: skip
        assert status == 202, theirs

        async def placed() -> dict[str, Any] | None:
            _, view, _ = await call_as(replica, initech, "GET", f"/v1/jobs/{theirs['id']}")
            return view if view["allocation"] is not None else None

        allocation = (await eventually(placed, "the other tenant's job placed"))["allocation"]
        status, quoted, _ = await call_as(replica, acme, "POST", "/v1/quote", job_body())
        assert status == 200, quoted
        free = {(o["site"], o["model"]): o["free"] for o in quoted["candidates"]}
        assert free[(allocation["site"], allocation["model"])] == 64 - 8  # the market: fewer devices free
        status, mine, _ = await call_as(replica, acme, "POST", "/v1/jobs", job_body())
        assert status == 202, mine

        async def mine_placed() -> dict[str, Any] | None:
            _, view, _ = await call_as(replica, acme, "GET", f"/v1/jobs/{mine['id']}")
            return view if view["allocation"] is not None else None

        view = await eventually(mine_placed, "the user's job placed")
        _, listed, _ = await call_as(replica, acme, "GET", "/v1/jobs")
        _, usage, _ = await call_as(replica, acme, "GET", "/v1/usage")
        seen = orjson.dumps([quoted, view, listed, usage]).decode()
        for secret in (theirs["id"], "initech-secret-run", "initech"):
            assert secret not in seen
        assert view["allocation"]["runners_up"] and all("free" in r for r in view["allocation"]["runners_up"])
        status, _, _ = await call_as(replica, acme, "GET", f"/v1/jobs/{theirs['id']}")
        assert status == 404
