"""Data gravity (东数西算) over HTTP: a real broker in-process, real Redis and Mosquitto, sites over MQTT.

A 40 TB dataset in Shanghai: a quote weighs running by it, in the Yangtze delta, against moving it to a cheaper
site in Qingyang, and a 200 GB one flips the choice; data that may not be copied keeps the job by it; a site
that publishes its measured rate changes the transfer a quote counts; a placed job shows its transfer; bad
datasets are refused naming the field.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest

from adapters.site import SiteLink
from broker.service import Broker
from regions import load_transfer
from suanwang.servers import MosquittoServer
from tests.integration.test_quote_api import all_online, call, job_when, pool, sites, submit
from tests.support import eventually

TB40 = 40_000.0
NEAR, WEST = "sh-near", "qy-west"
SITES = [
    (NEAR, "yangtze", "yangtze-demo", [pool("A100-80G", price=20.0, total=16)]),
    (WEST, "gansu", "qingyang", [pool("A100-80G", price=10.0, total=16)]),
]


@asynccontextmanager
async def network(mqtt: MosquittoServer) -> AsyncIterator[dict[str, SiteLink]]:
    """The SITES over real MQTT, accepting and starting whatever they are assigned; by id."""
    async with sites(mqtt, SITES) as links:
        yield {link.site: link for link in links}


def body(size_gb: float = TB40, *, copyable: bool = True, location: str = "shanghai", **extra: Any) -> dict[str, Any]:
    """Training on 8 GPUs for 10 hours from Shanghai, reading one dataset."""
    return {"name": "corpus-train", "workload": "training", "resources": {"arch": "GPU", "count": 8},
            "origin": "shanghai", "duration_hours": 10,
            "datasets": [{"name": "corpus", "size_gb": size_gb, "location": location, "copyable": copyable}],
            **extra}  # fmt: skip


def seeded_hours(size_gb: float) -> float:
    """Hours to move `size_gb` from the Yangtze delta to Gansu at the seeded rate."""
    return size_gb * 8 / load_transfer().gbps("yangtze", "gansu") / 3600


def egress(size_gb: float) -> float:
    return size_gb * load_transfer().egress_cny_per_gb("yangtze")


async def quoted(http: aiohttp.ClientSession, job: dict[str, Any]) -> dict[str, Any]:
    status, answer = await call(http, "POST", "/v1/quote", job)
    assert status == 200, answer
    return dict(answer)


def offers(answer: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {o["site"]: o for o in answer["candidates"]}


# --------------------------------------------------------------------------- quotes


async def test_a_quote_weighs_moving_40_tb_west_against_running_near_it_and_200_gb_flips_it(
    broker: Broker, http: aiohttp.ClientSession, own_mosquitto: MosquittoServer
) -> None:
    """40 TB: run by the data at ¥1,600, or move it to Qingyang (hours of transfer, ¥20,000 of egress) and pay
    more in all; 200 GB: moving it is cheaper, so the quote's first place is the western site."""
    async with network(own_mosquitto):
        await all_online(http, {s[0] for s in SITES})
        answer = await quoted(http, body())
        hours, cost = seeded_hours(TB40), egress(TB40)
        assert hours < 10, "the text below writes the transfer with one decimal"
        assert answer["candidates"][0]["site"] == NEAR
        gravity = answer["data_gravity"]
        assert gravity["data_gb"] == TB40
        near, moved = gravity["near"], gravity["moved"]
        assert (near["site"], near["transfer_hours"], near["transfer_cost_cny"]) == (NEAR, 0, 0)
        assert near["total_cost_cny"] == pytest.approx(8 * 20.0 * 10)
        assert moved["site"] == WEST
        assert moved["transfer_hours"] == pytest.approx(hours, abs=1e-3)
        assert moved["transfer_cost_cny"] == pytest.approx(cost)
        assert moved["compute_cost_cny"] == pytest.approx(8 * 10.0 * 10)
        assert moved["total_cost_cny"] == pytest.approx(800 + cost)
        assert moved["finish_hours"] == pytest.approx(10 + hours, abs=1e-3)
        assert gravity["places"] == {"near": "上海/Shanghai", "moved": "庆阳/Qingyang"}
        assert (gravity["cheaper"], gravity["sooner"]) == ("near", "near")
        assert gravity["text"].startswith("Run in 上海/Shanghai now at ¥1,600 (finish in 10 h), or move the 40 TB to "
                                          f"庆阳/Qingyang (about {hours:.1f} h of transfer, ¥{cost:,.0f})")  # fmt: skip
        assert gravity["text"].endswith(f"at ¥{800 + cost:,.0f} in all")

        small = await quoted(http, body(200.0))
        assert small["candidates"][0]["site"] == WEST
        assert offers(small)[WEST]["transfer_hours"] == pytest.approx(seeded_hours(200.0), abs=1e-3)
        assert offers(small)[WEST]["total_cost_cny"] == pytest.approx(800 + egress(200.0))
        assert (small["data_gravity"]["cheaper"], small["data_gravity"]["sooner"]) == ("moved", "near")
        assert "move the 200 GB to 庆阳/Qingyang" in small["data_gravity"]["text"]


async def test_data_that_may_not_be_copied_keeps_the_job_near_it(
    broker: Broker, http: aiohttp.ClientSession, own_mosquitto: MosquittoServer
) -> None:
    """200 GB that may not leave Shanghai: the quote offers only the site by it, and the job is placed there."""
    async with network(own_mosquitto):
        await all_online(http, {s[0] for s in SITES})
        job = body(200.0, copyable=False)
        answer = await quoted(http, job)
        assert set(offers(answer)) == {NEAR}
        gravity = answer["data_gravity"]
        assert gravity["moved"] is None and gravity["near"]["site"] == NEAR
        assert gravity["text"].endswith("(the data may not be copied)")
        assert any(w["change"] == "data may be copied" and w["best"]["site"] == WEST for w in answer["what_if"])

        job_id = await submit(http, job)
        view = await job_when(http, job_id, lambda v: v["state"] == "running")
        assert view["allocation"]["site"] == NEAR
        assert "transfer_hours" not in view["allocation"], "nothing moves"


async def test_a_rate_the_site_measured_changes_the_transfer_the_quote_counts(
    broker: Broker, http: aiohttp.ClientSession, own_mosquitto: MosquittoServer
) -> None:
    """Qingyang publishes a measured 25 Gbps from the Yangtze delta: the quote's move takes that long instead."""
    async with network(own_mosquitto) as links:
        await all_online(http, {s[0] for s in SITES})
        before = (await quoted(http, body()))["data_gravity"]["moved"]
        assert before["transfer_hours"] == pytest.approx(seeded_hours(TB40), abs=1e-3)

        links[WEST].set_bandwidth({"yangtze": 25.0})
        measured = TB40 * 8 / 25.0 / 3600
        assert abs(measured - seeded_hours(TB40)) > 0.1, "the measured rate must differ from the seed"

        async def remeasured() -> dict[str, Any] | None:
            moved = (await quoted(http, body()))["data_gravity"]["moved"]
            return moved if moved["transfer_hours"] == pytest.approx(measured, abs=1e-3) else None

        moved = await eventually(remeasured, "the quote to count the measured rate")
        assert moved["site"] == WEST
        assert moved["transfer_cost_cny"] == pytest.approx(egress(TB40)), "egress does not depend on the rate"
        assert moved["finish_hours"] == pytest.approx(10 + measured, abs=1e-3)
        _, site = await call(http, "GET", f"/v1/sites/{WEST}")
        assert site["measured_bandwidth_gbps"] == {"yangtze": 25.0}


# --------------------------------------------------------------------------- placing a job with data


async def test_a_placed_job_shows_the_transfer_of_its_data(
    broker: Broker, http: aiohttp.ClientSession, own_mosquitto: MosquittoServer
) -> None:
    """A 200 GB job goes west; its view shows the transfer's hours and cost and the total with the run."""
    async with network(own_mosquitto):
        await all_online(http, {s[0] for s in SITES})
        job_id = await submit(http, body(200.0))
        view = await job_when(http, job_id, lambda v: v["state"] == "running")
        allocation = view["allocation"]
        assert allocation["site"] == WEST
        assert allocation["transfer_hours"] == pytest.approx(seeded_hours(200.0), abs=1e-3)
        assert allocation["transfer_cost_cny"] == pytest.approx(egress(200.0))
        assert allocation["total_cost_cny"] == pytest.approx(8 * 10.0 * 10 + egress(200.0))
        assert allocation["finish_hours"] == pytest.approx(10 + seeded_hours(200.0), abs=1e-3)
        assert view["datasets"] == body(200.0)["datasets"]
        async with http.get("/metrics") as response:
            metrics = (await response.read()).decode()
        assert 'suanwang_data_moves_total{hub="gansu"} 1.0' in metrics
        assert "suanwang_data_transfer_hours_count 1.0" in metrics


# --------------------------------------------------------------------------- bad datasets

BAD_DATASETS = [
    pytest.param(body(location="atlantis"), "datasets.0.location", id="unknown-place"),
    pytest.param(body(location="Shanghai!"), "datasets.0.location", id="not-an-id"),
    pytest.param({**body(), "datasets": [*body()["datasets"], {"name": "b", "size_gb": 1, "location": "nowhere"}]},
                 "datasets.1.location", id="second-dataset-unknown-place"),
    pytest.param(body(0), "datasets.0.size_gb", id="zero-size"),
    pytest.param(body(-5), "datasets.0.size_gb", id="negative-size"),
    pytest.param({**body(), "datasets": [{**body()["datasets"][0], "copyable": "no"}]}, "datasets.0.copyable",
                 id="copyable-not-a-boolean"),
]  # fmt: skip


@pytest.mark.parametrize(("job", "field"), BAD_DATASETS)
@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/quote"])
async def test_a_bad_dataset_is_400_naming_the_field(http: aiohttp.ClientSession, path: str, job: dict[str, Any],
                                                     field: str) -> None:  # fmt: skip
    """A dataset at an unknown place, of no or negative size, or with a non-boolean `copyable` is refused by
    submission and quote alike, naming the dataset's field; nothing is stored."""
    status, answer = await call(http, "POST", path, job)
    assert status == 400, answer
    assert answer["error"]["field"] == field, answer
    if path == "/v1/jobs":
        _, jobs = await call(http, "GET", "/v1/jobs")
        assert jobs["jobs"] == [], "nothing is stored"
