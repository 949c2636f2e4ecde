"""Quotes: ranked candidates with totals, and the what-if relaxations that would make a job fit or cost less."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from broker.matching import Request
from broker.matching.quote import quote
from broker.matching.snapshot import Snapshot
from broker.model.job import JobSpec
from broker.model.records import SiteRecord
from regions import Device, load_geography

GEO = load_geography()
CATALOG = {
    d.model: d
    for d in (
        Device(model="A100-80G", arch="GPU", vendor="test", domestic=False, memory_gb=80, stack="cuda",
               stack_version="12.4", interconnect="nvlink", per_node=8, perf_training=1.0, perf_inference=1.0,
               price_cny_per_hour=10.0),
        Device(model="Ascend-910B", arch="ASIC", vendor="test", domestic=True, memory_gb=64, stack="cann",
               stack_version="8.0", interconnect="hccs", per_node=8, perf_training=0.5, perf_inference=0.65,
               price_cny_per_hour=5.0),
    )
}  # fmt: skip


@dataclass(frozen=True)
class S:
    """A site with one pool, placed in guizhou, with the latency from shanghai it measured."""

    id: str
    price: float
    latency_ms: float
    model: str = "A100-80G"
    total: int = 64
    allocated: int = 0
    latency: dict[str, float] = field(default_factory=dict)


def snapshot(*sites: S) -> Snapshot:
    snap = Snapshot(GEO, devices=CATALOG)
    for s in sites:
        pool = {"arch": CATALOG[s.model].arch, "model": s.model, "memory_gb": 80, "per_node": 8,
                "interconnect": "nvlink", "stacks": ["cuda-12.4"], "price_cny_per_hour": s.price}  # fmt: skip
        snap.apply(
            SiteRecord(
                id=s.id,
                hub="guizhou",
                cluster="guian",
                status="online",
                seen_ms=1,
                meta_version=1,
                meta={"pools": [pool], "energy": {}, "latency_ms": {"shanghai": s.latency_ms}},
                capacity={f"t:{s.model}": s.total, f"x:{s.model}": 0, f"a:{s.model}": s.allocated},
            )
        )
    return snap


def job(job_id: str = "job-1", *, resources: dict[str, Any] | None = None, **top: Any) -> Request:
    body: dict[str, Any] = {"resources": resources or {"arch": "GPU", "count": 8}, "origin": "shanghai",
                            "duration_hours": 2, "policy": "cheapest", **top}  # fmt: skip
    return Request.of(job_id, JobSpec.model_validate(body))


# Two sites in each latency band from shanghai; farther is cheaper.
FLEET = [
    S("near-a", 20.0, 5), S("near-b", 19.0, 12),
    S("mid-a", 15.0, 25), S("mid-b", 16.0, 28),
    S("far-a", 12.0, 36), S("far-b", 13.0, 39),
    S("west-a", 10.0, 55), S("west-b", 11.0, 60),
]  # fmt: skip


def changes(body: dict[str, Any]) -> list[str]:
    return [w["change"] for w in body["what_if"]]


# --------------------------------------------------------------------------- candidates


def test_candidates_are_ranked_by_score_with_totals():
    """Candidates come best score first, one per site, each with total_cost = cost per hour x estimated hours."""
    body = quote(job(), snapshot(*FLEET))
    offers = body["candidates"]
    assert [o["site"] for o in offers][:3] == ["west-a", "west-b", "far-a"]
    assert len(offers) == len({o["site"] for o in offers}) == len(FLEET)
    assert [o["score"] for o in offers] == sorted((o["score"] for o in offers), reverse=True)
    for o in offers:
        assert o["devices"] == 8
        assert o["cost_cny_per_hour"] == pytest.approx(o["price_cny_per_hour"] * 8)
        assert o["est_hours"] == pytest.approx(2.0)
        assert o["total_cost_cny"] == pytest.approx(o["cost_cny_per_hour"] * o["est_hours"], abs=0.01)
    assert body["feasible_sites"] == len(FLEET)
    assert "waiting" not in body


def test_quote_for_equivalent_compute_prices_delivered_units():
    """For equivalent compute, each offer's devices, unit price and estimated hours follow the model's performance."""
    snap = snapshot(S("a100", 10.0, 5), S("ascend", 4.0, 5, model="Ascend-910B", total=256))
    body = quote(job(resources={"equivalent": {"units": 64}}, workload="training"), snap)
    by_site = {o["site"]: o for o in body["candidates"]}
    assert (by_site["ascend"]["devices"], by_site["a100"]["devices"]) == (128, 64)
    assert by_site["ascend"]["unit_price_cny_per_hour"] == pytest.approx(4.0 * 128 / 64)
    assert by_site["ascend"]["est_hours"] == pytest.approx(2.0)
    assert by_site["ascend"]["total_cost_cny"] == pytest.approx(4.0 * 128 * 2.0)
    assert body["candidates"][0]["site"] == "ascend"


def test_top_limits_the_candidates():
    """`top` bounds how many ranked candidates a quote returns, while feasible_sites still counts them all."""
    body = quote(job(), snapshot(*FLEET), top=3)
    assert [o["site"] for o in body["candidates"]] == ["west-a", "west-b", "far-a"]
    assert body["feasible_sites"] == len(FLEET)


def test_quote_takes_no_capacity():
    """Quoting leaves the snapshot's allocations untouched, so the same quote can be asked again."""
    snap = snapshot(*FLEET)
    before = {m: t.allocated[: t.size].copy().tolist() for m, t in snap.tables.items()}
    first = quote(job(), snap)
    assert {m: t.allocated[: t.size].tolist() for m, t in snap.tables.items()} == before
    assert quote(job(), snap) == first


# --------------------------------------------------------------------------- what-ifs when nothing fits

WAITING = [
    # (request overrides, waiting message, expected what-ifs as (change, more_sites) in order)
    pytest.param({"max_latency_ms": 4}, "8 sites: latency from shanghai above 4 ms",
                 [("no latency cap", 8), ("allow 14 ms", 2), ("allow 24 ms", 2)], id="latency-cap"),
    pytest.param({"max_latency_ms": 20, "max_price_cny_per_hour": 14},
                 # each site counts once, under the first filter it fails: price comes before latency
                 "4 sites: latency from shanghai above 20 ms; 4 sites: price above 14 CNY/h",
                 [("no latency cap", 4), ("allow 40 ms", 2), ("no price cap", 2)], id="latency-and-price"),
    pytest.param({"max_price_cny_per_hour": 8}, "8 sites: price above 8 CNY/h",
                 [("no price cap", 8), ("pay up to 10 CNY/h", 1)], id="price-cap"),
    pytest.param({"max_latency_ms": 2, "max_price_cny_per_hour": 8}, None, [], id="no-single-relaxation-helps"),
]  # fmt: skip


@pytest.mark.parametrize(("overrides", "waiting", "expected"), WAITING)
def test_unfit_job_gets_waiting_reasons_and_what_ifs_that_fit(overrides, waiting, expected):
    """A job that fits nowhere gets `waiting` with per-reason site counts and only the relaxations that make it fit."""
    body = quote(job(**overrides), snapshot(*FLEET))
    assert body["candidates"] == [] and body["feasible_sites"] == 0
    if waiting is not None:
        assert body["waiting"] == waiting
    assert sum(r["sites"] for r in body["reasons"]) == len(FLEET)
    assert [(w["change"], w["more_sites"]) for w in body["what_if"]] == expected
    for w in body["what_if"]:
        assert w["sites"] == w["more_sites"]
        plural = "s" if w["sites"] != 1 else ""
        assert w["text"].startswith(f"{w['change']} -> fits: {w['sites']} site{plural}")
        assert w["best"]["site"] in {s.id for s in FLEET}


# --------------------------------------------------------------------------- what-ifs when the job fits


def test_loosening_latency_reports_how_much_cheaper_and_how_many_more_sites():
    """With a 20 ms cap, looser caps bring cheaper sites: "allow 30 ms -> 21% cheaper, 2 more sites"."""
    body = quote(job(max_latency_ms=20), snapshot(*FLEET))
    assert body["feasible_sites"] == 2 and body["candidates"][0]["site"] == "near-b"
    what_if = {w["change"]: w for w in body["what_if"]}
    assert list(what_if) == ["no latency cap", "allow 40 ms", "allow 30 ms"]
    # base: near-b at 19 CNY/h; 30 ms adds mid-a (15), 40 ms also far-a (12), no cap also west-a (10)
    for change, more, cheapest in (("allow 30 ms", 2, 15.0), ("allow 40 ms", 4, 12.0), ("no latency cap", 6, 10.0)):
        pct = round(100 * (1 - cheapest / 19.0), 1)
        assert (what_if[change]["more_sites"], what_if[change]["cheaper_pct"]) == (more, pct)
        assert what_if[change]["sites"] == 2 + more
        assert what_if[change]["text"] == f"{change} -> {pct:.0f}% cheaper, {more} more sites"


def test_relaxations_that_change_nothing_are_omitted():
    """Caps nobody comes near (and a residency that already admits every site) produce no what-ifs."""
    body = quote(job(max_latency_ms=500, max_price_cny_per_hour=1000, residency={"allow_hubs": ["guizhou"]}),
                 snapshot(*FLEET))  # fmt: skip
    assert body["feasible_sites"] == len(FLEET)
    assert body["what_if"] == []


def test_a_relaxation_that_only_adds_sites_has_no_cheaper_part():
    """If loosening adds sites that are all dearer, the what-if says only "N more sites"."""
    fleet = [S("near", 10.0, 5), S("mid-1", 30.0, 25), S("mid-2", 31.0, 26)]
    body = quote(job(max_latency_ms=20), snapshot(*fleet))
    what_if = {w["change"]: w for w in body["what_if"]}
    assert what_if["allow 30 ms"]["text"] == "allow 30 ms -> 2 more sites"
    assert what_if["allow 30 ms"]["cheaper_pct"] == 0.0
    assert "allow 40 ms" in what_if and "no latency cap" in what_if


def test_relaxing_a_full_model_list_and_capacity():
    """A model list naming only a full model gets "any GPU model" as a way to fit."""
    snap = snapshot(S("full", 5.0, 5, total=8, allocated=8), S("other", 9.0, 5, model="Ascend-910B"))
    body = quote(job(resources={"archs": ["GPU", "ASIC"], "count": 8, "models": ["A100-80G"]}), snap)
    assert body["waiting"] == "1 site: fewer than 8 devices free; 1 site: no A100-80G pool"
    assert changes(body) == ["any GPU/ASIC model"]
    assert body["what_if"][0]["best"]["site"] == "other"
