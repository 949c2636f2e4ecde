"""Heterogeneous matching: equivalent compute, software stacks, gangs, residency, 信创 and the policies.

Snapshots are built from plain tables (as in test_matching) against a small custom device catalog whose
performance figures the tests choose, so every expected device count and price can be worked by hand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.matching import CHUNK, POLICIES, Decision, NoFit, Request, match
from broker.matching.snapshot import Snapshot, green_score
from broker.model.job import JobSpec
from broker.model.records import SiteRecord
from regions import Device, LatencyModel, load_geography

GEO = load_geography()


def device(model: str, arch: str, domestic: bool, training: float, inference: float, stack: str = "cuda",
           interconnect: str = "nvlink") -> Device:  # fmt: skip
    return Device(model=model, arch=arch, vendor="test", domestic=domestic, memory_gb=64, stack=stack,
                  stack_version="1.0", interconnect=interconnect, per_node=8, perf_training=training,
                  perf_inference=inference, price_cny_per_hour=10.0)  # fmt: skip


CATALOG: dict[str, Device] = {
    d.model: d
    for d in (
        device("A100-80G", "GPU", False, 1.0, 1.0),
        device("H800", "GPU", False, 2.0, 2.5),
        device("Ascend-910B", "ASIC", True, 0.5, 0.65, "cann", "hccs"),
        device("MLU590", "ASIC", True, 0.8, 0.8, "neuware", "mlu-link"),
        device("Infer-Only", "ASIC", True, 0.0, 0.4, "bpu", "pcie"),
        device("Kunpeng-920", "CPU", True, 0.01, 0.01, "aarch64", "none"),
        device("Xeon-8480", "CPU", False, 0.01, 0.01, "x86-64", "none"),
    )
}
ARCH = {m: d.arch for m, d in CATALOG.items()} | {"Mystery-X": "GPU"}  # Mystery-X is not in the catalog


# --------------------------------------------------------------------------- fleet tables


@dataclass(frozen=True)
class P:
    """One pool of a site as the tables write it; arch comes from the catalog unless given."""

    model: str = "A100-80G"
    price: float = 10.0
    total: int = 64
    memory_gb: float = 80
    external: int = 0
    allocated: int = 0
    per_node: int = 8
    interconnect: str = "nvlink"
    stacks: tuple[str, ...] = ("cuda-12.4",)
    arch: str | None = None


ENERGY = {"pue": 1.3, "green_share": 0.3, "tariff_cny_per_kwh": 0.5}


@dataclass(frozen=True)
class S:
    """One site: pools, place, status, measured latency (empty: the latency model decides) and energy."""

    id: str
    pools: tuple[P, ...] = (P(),)
    hub: str = "guizhou"
    cluster: str = "guian"
    status: str = "online"
    latency: dict[str, float] = field(default_factory=lambda: {"shanghai": 10.0})
    energy: dict[str, float] = field(default_factory=lambda: dict(ENERGY))


def record(site: S) -> SiteRecord:
    pools = [
        {"arch": p.arch or ARCH[p.model], "model": p.model, "memory_gb": p.memory_gb, "per_node": p.per_node,
         "interconnect": p.interconnect, "stacks": list(p.stacks), "price_cny_per_hour": p.price}
        for p in site.pools
    ]  # fmt: skip
    capacity: dict[str, int] = {}
    for p in site.pools:
        capacity |= {f"t:{p.model}": p.total, f"x:{p.model}": p.external, f"a:{p.model}": p.allocated}
    return SiteRecord(id=site.id, hub=site.hub, cluster=site.cluster, status=site.status, seen_ms=1, meta_version=1,
                      meta={"pools": pools, "energy": dict(site.energy), "latency_ms": dict(site.latency)},
                      capacity=capacity)  # fmt: skip


def snapshot(*sites: S) -> Snapshot:
    snap = Snapshot(GEO, devices=CATALOG)
    for site in sites:
        snap.apply(record(site))
    return snap


def job(job_id: str = "job-1", *, resources: dict[str, Any] | None = None, **top: Any) -> Request:
    """A Request made the way the broker makes one: from a validated JobSpec (default one GPU from shanghai)."""
    body: dict[str, Any] = {"resources": resources or {"arch": "GPU", "count": 1}, "origin": "shanghai",
                            "duration_hours": 1, **top}  # fmt: skip
    return Request.of(job_id, JobSpec.model_validate(body))


def equivalent(units: float, reference: str = "A100-80G", **resources: Any) -> dict[str, Any]:
    """The `resources` of an equivalent-compute request."""
    return {"equivalent": {"units": units, "reference": reference}, **resources}


def decided(result: Decision | NoFit) -> Decision:
    assert isinstance(result, Decision), f"expected a decision, got {result}"
    return result


# --------------------------------------------------------------------------- equivalent compute

EQUIVALENTS = [
    # (pool, workload, units, expected devices)
    pytest.param(P(model="Ascend-910B", total=200), "training", 64, 128, id="910B-training-0.5"),
    pytest.param(P(model="Ascend-910B", total=200), "inference", 65, 100, id="910B-inference-0.65"),
    pytest.param(P(model="A100-80G"), "training", 64, 64, id="reference-itself"),
    pytest.param(P(model="H800"), "training", 64, 32, id="faster-model-fewer-devices"),
    pytest.param(P(model="H800"), "inference", 5, 2, id="rounds-up-to-whole-devices"),
    pytest.param(P(model="H800"), "general", 4.5, 2, id="general-averages-training-and-inference"),
    pytest.param(P(model="MLU590"), "hpc", 0.1, 1, id="at-least-one-device"),
]


@pytest.mark.parametrize(("pool", "workload", "units", "devices"), EQUIVALENTS)
def test_equivalent_compute_becomes_a_device_count_per_model(pool, workload, units, devices):
    """Equivalent units turn into ceil(units x reference perf / pool perf) devices of the pool's one model."""
    result = decided(match(job(resources=equivalent(units), workload=workload), snapshot(S("a", (pool,)))))
    c = result.chosen
    assert (c.model, c.devices) == (pool.model, devices)
    assert c.cost_per_hour == pytest.approx(pool.price * devices)
    assert c.unit_price == pytest.approx(pool.price * devices / units)


def test_equivalent_units_counted_in_another_reference():
    """Units of a faster reference (H800 = 2.0 for training) need proportionally more devices of a slower model."""
    req = job(resources=equivalent(8, reference="H800"), workload="training")
    result = decided(match(req, snapshot(S("a", (P(model="A100-80G"),)))))
    assert result.chosen.devices == 16


PRICED_PER_UNIT = [
    # the 910B needs twice the devices: it is cheaper only below half the A100's price per device
    pytest.param(4.5, "ascend", 9.0, id="910B-below-half-price-wins"),
    pytest.param(5.5, "a100", 10.0, id="910B-above-half-price-loses"),
]


@pytest.mark.parametrize(("ascend_price", "expected", "unit_price"), PRICED_PER_UNIT)
def test_cheapest_equivalent_compares_price_per_delivered_unit(ascend_price, expected, unit_price):
    """Under cheapest, equivalent jobs compare cost for the compute delivered, not the price per device."""
    snap = snapshot(S("a100", (P(model="A100-80G", price=10.0),)),
                    S("ascend", (P(model="Ascend-910B", price=ascend_price, total=256),)))  # fmt: skip
    result = decided(match(job(resources=equivalent(64), workload="training", policy="cheapest"), snap))
    assert result.chosen.site == expected
    assert result.chosen.unit_price == pytest.approx(unit_price)


def test_equivalent_never_mixes_models_in_one_gang():
    """A site whose pools reach the compute only together (100 x 910B + 40 x A100 >= 64 units) does not fit."""
    mixed = S("mixed", (P(model="Ascend-910B", total=100), P(model="A100-80G", total=40)))
    result = match(job(resources=equivalent(64), workload="training"), snapshot(mixed))
    assert isinstance(result, NoFit)
    assert result.reasons == (("too few devices free", 1),)


def test_each_candidate_has_exactly_one_model():
    """With two pools at a site that could each carry the job, the decision names one model and its own count."""
    snap = snapshot(S("two", (P(model="Ascend-910B", total=200, price=4), P(model="A100-80G", total=64, price=10))),
                    S("other", (P(model="H800", total=64, price=30),)))  # fmt: skip
    result = decided(match(job(resources=equivalent(64), workload="training", policy="cheapest"), snap))
    expected_devices = {"Ascend-910B": 128, "A100-80G": 64, "H800": 32}
    for c in (result.chosen, *result.runners_up):
        assert c.devices == expected_devices[c.model]
    assert (result.chosen.site, result.chosen.model) == ("two", "Ascend-910B")


def test_model_without_catalog_performance_is_ineligible_for_equivalent():
    """A model missing from the catalog, or with 0 performance for the workload, cannot serve equivalent compute."""
    snap = snapshot(S("mystery", (P(model="Mystery-X", price=1),)), S("infer", (P(model="Infer-Only", price=1),)))
    result = match(job(resources=equivalent(4), workload="training"), snap)
    assert isinstance(result, NoFit)
    assert result.reasons == (("no pool with a catalog training performance for equivalent compute", 2),)
    # ... but a device count does not need a catalog figure
    assert decided(match(job(resources={"arch": "GPU", "count": 4}), snap)).chosen.site == "mystery"
    # ... and the inference-only model serves equivalent inference
    assert decided(match(job(resources=equivalent(4), workload="inference"), snap)).chosen.site == "infer"


def test_equivalent_without_arch_considers_every_architecture():
    """An equivalent request without arch may land on any architecture the catalog rates for the workload."""
    snap = snapshot(S("asic", (P(model="MLU590", price=5, total=64),)), S("gpu", (P(model="A100-80G", price=9),)))
    result = decided(match(job(resources=equivalent(8), policy="cheapest"), snap))
    assert (result.chosen.site, result.chosen.devices) == ("asic", 10)


# --------------------------------------------------------------------------- software stacks

CUDA_12_1 = [{"stack": "cuda", "versions": ">=12.1", "image": "img:cuda"}]

STACK_CHOICES = [
    # (site stacks, software, expected stack, expected image)
    pytest.param(("cuda-12.10",), CUDA_12_1, "cuda-12.10", "img:cuda", id="12.10-admitted-for->=12.1"),
    pytest.param(("cuda-11.8", "cuda-12.4"), CUDA_12_1, "cuda-12.4", "img:cuda", id="the-admitted-one-reported"),
    pytest.param(("cuda-12.4", "cann-8.0"),
                 [{"stack": "cann", "versions": ">=8.0", "image": "img:cann"}, *CUDA_12_1],
                 "cann-8.0", "img:cann", id="first-option-wins"),
    pytest.param(("cuda-12.4", "cann-8.0"),
                 [*CUDA_12_1, {"stack": "cann", "versions": ">=8.0", "image": "img:cann"}],
                 "cuda-12.4", "img:cuda", id="first-option-wins-other-order"),
    pytest.param(("cuda-12.4", "cann-7.0"),
                 [{"stack": "cann", "versions": ">=8.0", "image": "img:cann"}, *CUDA_12_1],
                 "cuda-12.4", "img:cuda", id="second-option-when-first-does-not-match"),
    pytest.param(("cann",), [{"stack": "cann", "image": "img:any"}], "cann", "img:any", id="versionless-tag"),
]  # fmt: skip


@pytest.mark.parametrize(("stacks", "software", "stack", "image"), STACK_CHOICES)
def test_chosen_candidate_reports_the_matching_stack_and_its_image(stacks, software, stack, image):
    """The decision names the site's tag the first admitting software option matched, and that option's image."""
    result = decided(match(job(software=software), snapshot(S("a", (P(stacks=stacks),)))))
    assert (result.chosen.stack, result.chosen.image) == (stack, image)


def test_software_range_filters_pools():
    """A pool with cuda-12.0 is refused for cuda>=12.1 while a dearer one with cuda-12.10 is chosen."""
    snap = snapshot(S("old", (P(stacks=("cuda-12.0",), price=1),)), S("new", (P(stacks=("cuda-12.10",), price=20),)))
    assert decided(match(job(software=CUDA_12_1), snap)).chosen.site == "new"
    assert decided(match(job(), snap)).chosen.site == "old"


def test_no_software_means_no_stack_reported():
    """A job without software options gets no stack and no image in its decision."""
    result = decided(match(job(), snapshot(S("a"))))
    assert (result.chosen.stack, result.chosen.image) == (None, None)


# --------------------------------------------------------------------------- interconnect, whole nodes, packing


def test_interconnect_filter_takes_any_listed_case_insensitively():
    """Only pools with one of the listed interconnects are eligible; names compare case-insensitively."""
    snap = snapshot(S("pcie", (P(interconnect="pcie", price=1),)), S("ib", (P(interconnect="InfiniBand", price=9),)),
                    S("nvl", (P(interconnect="nvlink", price=5),)))  # fmt: skip
    pick = lambda *ics: decided(match(job(resources={"arch": "GPU", "count": 1, "interconnect": list(ics)},  # noqa: E731
                                          policy="cheapest"), snap)).chosen.site  # fmt: skip
    assert pick() == "pcie"
    assert pick("infiniband") == "ib"
    assert pick("NVLink", "infiniband") == "nvl"


WHOLE_NODES = [
    # (pool, count, whole_nodes, expected devices or None for no fit)
    pytest.param(P(total=64, per_node=8), 12, True, 16, id="12-rounds-up-to-2-nodes"),
    pytest.param(P(total=64, per_node=8), 12, False, 12, id="12-without-whole-nodes"),
    pytest.param(P(total=64, per_node=8), 16, True, 16, id="exact-multiple"),
    pytest.param(P(total=16, per_node=8), 16, True, 16, id="fits-only-using-every-node"),
    pytest.param(P(total=16, per_node=8), 17, True, None, id="one-more-than-every-node"),
    pytest.param(P(total=16, per_node=8), 9, True, 16, id="rounds-up-to-every-node"),
    pytest.param(P(total=16, per_node=8, allocated=1), 9, True, None, id="no-whole-node-left-for-the-rest"),
    pytest.param(P(total=16, per_node=8, allocated=1), 9, False, 9, id="partial-nodes-fit"),
]


@pytest.mark.parametrize(("pool", "count", "whole", "devices"), WHOLE_NODES)
def test_whole_nodes_round_the_gang_up_to_full_servers(pool, count, whole, devices):
    """With whole_nodes a gang takes ceil(count / per_node) full nodes, and fits only if that many are free."""
    result = match(job(resources={"arch": "GPU", "count": count, "whole_nodes": whole}), snapshot(S("a", (pool,))))
    if devices is None:
        assert isinstance(result, NoFit)
        assert result.reasons == ((f"fewer than {count} devices free", 1),)
    else:
        assert decided(result).chosen.devices == devices
        assert result.chosen.cost_per_hour == pytest.approx(devices * pool.price)


@pytest.mark.parametrize("job_id", [f"job-{n}" for n in range(8)])
def test_packing_prefers_a_partly_used_node_for_a_small_job(job_id):
    """Two equal sites: a 2-device job goes where a node is already partly used, keeping whole nodes for gangs."""
    snap = snapshot(S("whole", (P(total=16, per_node=8),)), S("partial", (P(total=16, per_node=8, allocated=3),)))
    result = decided(match(job(job_id, resources={"arch": "GPU", "count": 2}), snap))
    assert result.chosen.site == "partial"
    assert result.chosen.scores["packing"] == 100.0
    assert result.runners_up[0].scores["packing"] < 100.0


# --------------------------------------------------------------------------- residency and 信创

FLEET_BY_PLACE = [
    S("yz", hub="yangtze", cluster="yangtze-demo", pools=(P(price=30),)),
    S("wuhu", hub="yangtze", cluster="wuhu", pools=(P(price=25),)),
    S("gz", hub="guizhou", cluster="guian", pools=(P(price=20),)),
    S("nm", hub="neimenggu", cluster="horinger", pools=(P(price=10),)),
    S("gs", hub="gansu", cluster="qingyang", pools=(P(price=15),)),
]

RESIDENCY = [
    pytest.param({"allow_hubs": ["yangtze"]}, "wuhu", id="allow-hub"),
    pytest.param({"allow_hubs": ["yangtze", "guizhou"]}, "gz", id="allow-two-hubs"),
    pytest.param({"deny_hubs": ["neimenggu"]}, "gs", id="deny-hub"),
    pytest.param({"allow_provinces": ["Shanghai"]}, "yz", id="allow-province"),
    pytest.param({"allow_provinces": ["guizhou", "Shanghai"]}, "gz", id="allow-provinces-any-case"),
    pytest.param({"deny_provinces": ["Inner Mongolia", "Gansu"]}, "gz", id="deny-provinces"),
    pytest.param({"allow_hubs": ["yangtze"], "deny_provinces": ["Anhui"]}, "yz", id="deny-wins-inside-allow"),
    pytest.param({"allow_hubs": ["yangtze", "neimenggu", "guizhou", "gansu", "ningxia"], "deny_hubs": ["neimenggu"]},
                 "gs", id="deny-hub-inside-allowed-hubs"),
]  # fmt: skip


@pytest.mark.parametrize(("residency", "expected"), RESIDENCY)
def test_residency_keeps_the_job_inside_allowed_places(residency, expected):
    """Allow lists (hubs, provinces as in seeds/hubs.toml) bound where a job may go; deny lists always exclude."""
    result = decided(match(job(residency=residency, policy="cheapest"), snapshot(*FLEET_BY_PLACE)))
    assert result.chosen.site == expected


DOMESTIC = [
    pytest.param({"archs": ["GPU", "ASIC"], "count": 4}, "ascend", id="accelerators"),
    pytest.param({"arch": "CPU", "count": 4}, "kunpeng", id="cpus"),
    pytest.param(equivalent(4), "ascend", id="equivalent"),
]


@pytest.mark.parametrize(("resources", "expected"), DOMESTIC)
def test_domestic_only_admits_only_domestic_chips_and_cpus(resources, expected):
    """domestic_only (信创) picks the catalog-domestic Ascend/Kunpeng over cheaper NVIDIA and Xeon pools."""
    snap = snapshot(S("a100", (P(model="A100-80G", price=1),)), S("xeon", (P(model="Xeon-8480", price=0.1),)),
                    S("ascend", (P(model="Ascend-910B", price=20),)), S("kunpeng", (P(model="Kunpeng-920", price=2),)),
                    S("mystery", (P(model="Mystery-X", price=0.5),)))  # fmt: skip
    assert decided(match(job(resources=resources, domestic_only=True, policy="cheapest"), snap)).chosen.site == expected
    assert decided(match(job(resources=resources, policy="cheapest"), snap)).chosen.site != expected


# --------------------------------------------------------------------------- NoFit reasons for the new filters

NO_FITS = [
    pytest.param([S("a", (P(stacks=("cuda-12.0",)),)), S("b", (P(stacks=("cann-8.0",)),))], {"software": CUDA_12_1},
                 (("no pool with cuda>=12.1", 2),), id="software"),
    pytest.param([S("a", (P(stacks=("cuda-11.8",)),))],
                 {"software": [{"stack": "cann", "versions": ">=8.0"}, {"stack": "cuda", "versions": ">=12.1,<13"}]},
                 (("no pool with cann>=8.0 or cuda>=12.1,<13", 1),), id="software-options"),
    pytest.param([S("a"), S("x", (P(model="Xeon-8480"),))],
                 {"resources": {"archs": ["GPU", "CPU"], "count": 1}, "domestic_only": True},
                 (("no domestic (信创) pool", 2),), id="domestic"),
    pytest.param([S("a", hub="yangtze", cluster="wuhu"), S("b")], {"residency": {"allow_provinces": ["Shanghai"]}},
                 (("outside the allowed hubs and provinces", 2),), id="residency-provinces"),
    pytest.param([S("a", hub="neimenggu", cluster="horinger")], {"residency": {"deny_hubs": ["neimenggu"]}},
                 (("outside the allowed hubs and provinces", 1),), id="residency-deny"),
    pytest.param([S("a", (P(interconnect="pcie"),))], {"resources": {"arch": "GPU", "count": 1,
                                                                       "interconnect": ["nvlink", "hccs"]}},
                 (("no pool with nvlink or hccs interconnect", 1),), id="interconnect"),
    pytest.param([S("a", (P(total=16, per_node=8),))], {"resources": {"arch": "GPU", "count": 17, "whole_nodes": True}},
                 (("fewer than 17 devices free", 1),), id="whole-nodes"),
    pytest.param([S("a", (P(model="Mystery-X"),))], {"resources": equivalent(1), "workload": "training"},
                 (("no pool with a catalog training performance for equivalent compute", 1),), id="perf"),
    pytest.param([S("a", (P(model="Ascend-910B", price=6),))],
                 {"resources": equivalent(8), "workload": "training", "max_price_cny_per_hour": 11.9},
                 (("price above 11.9 CNY/h", 1),), id="price-per-unit"),
    # stages are counted in pipeline order: a pool failing both stack and residency counts under the stack
    pytest.param([S("a", (P(stacks=("cuda-11.8",)),), hub="gansu", cluster="qingyang")],
                 {"software": CUDA_12_1, "residency": {"allow_hubs": ["yangtze"]}},
                 (("no pool with cuda>=12.1", 1),), id="first-failed-stage"),
]  # fmt: skip


@pytest.mark.parametrize(("sites", "overrides", "reasons"), NO_FITS)
def test_no_fit_names_each_new_filter(sites, overrides, reasons):
    """When a new filter rules every site out, NoFit names it and counts each site once."""
    result = match(job(**overrides), snapshot(*sites))
    assert isinstance(result, NoFit)
    assert result.reasons == reasons


def test_equivalent_price_cap_is_per_reference_unit():
    """A 910B at 6 CNY/h delivers an A100-hour for 12 CNY: inside a 12 CNY cap, outside 11.9."""
    snap = snapshot(S("a", (P(model="Ascend-910B", price=6),)))
    result = decided(match(job(resources=equivalent(8), workload="training", max_price_cny_per_hour=12), snap))
    assert (result.chosen.devices, result.chosen.unit_price) == (16, pytest.approx(12.0))


# --------------------------------------------------------------------------- policies

EAST = {"hub": "yangtze", "cluster": "yangtze-demo"}
WEST = {"hub": "guizhou", "cluster": "guian"}
GREEN = {"pue": 1.1, "green_share": 0.9, "tariff_cny_per_kwh": 0.3}

POLICY_FLEET = [
    S("cheap", (P(price=6),), hub="gansu", cluster="qingyang", latency={"shanghai": 40}),
    S("near", (P(price=12),), latency={"shanghai": 2}, **EAST),
    S("fast", (P(model="H800", price=25),), latency={"shanghai": 20}, **EAST),
    S("green", (P(price=11),), hub="ningxia", cluster="zhongwei", latency={"shanghai": 35}, energy=GREEN),
]

POLICY_CHOICES = [
    pytest.param("cheapest", "cheap", id="cheapest"),
    pytest.param("nearest", "near", id="nearest"),
    pytest.param("fastest", "fast", id="fastest-by-perf"),
    pytest.param("greenest", "green", id="greenest-by-energy"),
]


@pytest.mark.parametrize(("policy", "expected"), POLICY_CHOICES)
@pytest.mark.parametrize("job_id", ["job-1", "job-2", "job-3"])
def test_each_single_score_policy_picks_its_site(policy, expected, job_id):
    """cheapest, nearest, fastest (catalog perf) and greenest (tariff, PUE, green share) each pick their own site."""
    req = job(job_id, resources={"arch": "GPU", "count": 8, "models": ["A100-80G", "H800"]}, policy=policy)
    result = decided(match(req, snapshot(*POLICY_FLEET)))
    assert result.chosen.site == expected
    assert set(result.chosen.scores) == set(POLICIES[policy])


BALANCED = [
    # (workload, east price, west price, expected)
    pytest.param("training", 10.0, 10.0, "west", id="training-west-at-equal-prices"),
    pytest.param("training", 10.0, 10.5, "west", id="training-west-when-a-little-dearer"),
    pytest.param("training", 10.0, 14.0, "east", id="training-stays-east-when-west-much-dearer"),
    pytest.param("batch", 10.0, 10.5, "west", id="batch-is-tolerant-too"),
    pytest.param("inference", 10.0, 10.0, "east", id="inference-stays-near"),
    pytest.param("inference", 10.0, 9.5, "east", id="inference-stays-near-when-west-a-little-cheaper"),
    pytest.param("inference", 10.0, 5.0, "west", id="inference-moves-when-west-far-cheaper"),
]


@pytest.mark.parametrize(("workload", "east", "west", "expected"), BALANCED)
def test_balanced_steers_tolerant_work_west_and_keeps_sensitive_work_near(workload, east, west, expected):
    """东数西算: balanced sends latency-tolerant work west when prices are close and keeps inference near its origin."""
    snap = snapshot(S("east", (P(price=east),), latency={"shanghai": 3}, **EAST),
                    S("west", (P(price=west),), latency={"shanghai": 30}, **WEST))  # fmt: skip
    for n in range(5):
        result = decided(match(job(f"job-{n}", resources={"arch": "GPU", "count": 8}, workload=workload), snap))
        assert result.chosen.site == expected


WEIGHTS = [
    pytest.param("cheapest", {"price": 0, "latency": 1}, "near", {"latency"}, id="cheapest-turned-nearest"),
    pytest.param("nearest", {"green": 100}, "green", {"latency", "green"}, id="nearest-outweighed-by-green"),
    pytest.param("balanced", {"price": 100}, "cheap", {"price", "latency", "speed", "packing", "reliability"},
                 id="balanced-price-heavy"),
    pytest.param("balanced", {"price": 0, "latency": 0, "speed": 0, "packing": 0, "reliability": 0, "green": 1},
                 "green", {"green"}, id="balanced-only-green"),
]  # fmt: skip


@pytest.mark.parametrize(("policy", "weights", "expected", "names"), WEIGHTS)
def test_user_weights_override_the_policy(policy, weights, expected, names):
    """User weights replace the policy's weights by name; a zero weight drops that score."""
    req = job(resources={"arch": "GPU", "count": 8, "models": ["A100-80G", "H800"]}, policy=policy, weights=weights)
    result = decided(match(req, snapshot(*POLICY_FLEET)))
    assert result.chosen.site == expected
    assert set(result.chosen.scores) == names


SCORED = [
    pytest.param(policy, workload, id=f"{policy}-{workload}")
    for policy in ("balanced", "cheapest", "fastest", "nearest", "greenest")
    for workload in ("training", "inference")
]


@pytest.mark.parametrize(("policy", "workload"), SCORED)
def test_scores_are_bounded_and_named_after_the_policy_weights(policy, workload):
    """Every candidate's total and named scores lie in 0-100, named exactly as the policy's (or balanced's) weights."""
    fleet = [*POLICY_FLEET, S("far", (P(price=9, total=16, allocated=5),), hub="unknown-hub", cluster="", latency={}),
             S("whole", (P(model="H800", price=40, per_node=4),), latency={"shanghai": 150})]  # fmt: skip
    for units in (None, 20.0):
        resources = equivalent(units) if units else {"arch": "GPU", "count": 3}
        req = job(resources=resources, policy=policy, workload=workload)
        result = decided(match(req, snapshot(*fleet)))
        names = set(req.weight_map())
        assert names == set(POLICIES.get(policy, names))
        if policy == "balanced":
            assert ("west" in names) is (workload == "training")
        for c in (result.chosen, *result.runners_up):
            assert set(c.scores) == names
            assert all(0.0 <= v <= 100.0 for v in c.scores.values()), c.scores
            assert 0.0 <= c.score <= 100.0


def test_ties_break_by_job_id_deterministically():
    """On identical sites each job id always picks the same site, different job ids spread over several."""
    sites = [S(f"s{i}", (P(model="Ascend-910B", price=4, total=256),)) for i in range(6)]
    picks = {}
    for n in range(40):
        req = job(f"job-{n}", resources=equivalent(64), workload="training", policy="cheapest")
        snap = snapshot(*sites)
        picks[n] = decided(match(req, snap)).chosen.site
        assert decided(match(req, snap)).chosen.site == picks[n]
        assert decided(match(req, snapshot(*sites))).chosen.site == picks[n]
    assert len(set(picks.values())) > 1


def test_tie_break_does_not_depend_on_the_order_sites_were_learned():
    """A decision replays on another replica (or after a restart) that learned the same sites in another order."""
    sites = [S(f"s{i}", (P(model="Ascend-910B", price=4, total=256),)) for i in range(6)]
    forward, backward = snapshot(*sites), snapshot(*reversed(sites))
    for n in range(20):
        req = job(f"job-{n}", resources=equivalent(64), workload="training", policy="cheapest")
        assert decided(match(req, backward)).chosen.site == decided(match(req, forward)).chosen.site, req.job_id


@pytest.mark.parametrize(("latency", "fits"), [(30.0, True), (30.01, False)])
def test_exactly_at_the_latency_cap_passes(latency, fits):
    """A site whose latency equals the cap fits; a hair above does not, with the latency reason."""
    snap = snapshot(S("a", (P(model="Ascend-910B"),), latency={"shanghai": latency}))
    result = match(job(resources=equivalent(4), max_latency_ms=30, policy="nearest"), snap)
    if fits:
        assert decided(result).chosen.latency_ms == 30.0
    else:
        assert result == NoFit((("latency from shanghai above 30 ms", 1),))


# --------------------------------------------------------------------------- known ranking defects, pinned


def test_cheapest_is_not_blinded_by_a_free_pool_elsewhere():
    """An offline pool priced 0 CNY/h must not flatten every price score: cheapest still picks 5 over 9 CNY/h."""
    snap = snapshot(S("free", (P(price=0.0),), status="offline"), S("a", (P(price=5.0),)), S("b", (P(price=9.0),)))
    picks = {decided(match(job(f"job-{n}", policy="cheapest"), snap)).chosen.site for n in range(20)}
    assert picks == {"a"}


def test_cheapest_beats_the_tie_break_jitter_on_small_price_differences():
    """A site 0.2% dearer is never chosen under cheapest, even when an unusable pool makes all price scores small."""
    snap = snapshot(S("tiny", (P(price=1.0),), status="offline"), S("a", (P(price=1000.0),)),
                    S("b", (P(price=1002.0),)))  # fmt: skip
    picks = {decided(match(job(f"job-{n}", policy="cheapest"), snap)).chosen.site for n in range(20)}
    assert picks == {"a"}


def test_cheapest_whole_node_gang_looks_past_the_first_chunk():
    """With whole nodes a dearer-per-device pool with smaller nodes can cost less; cheapest finds it past CHUNK rows."""
    sites = [S(f"s{i:04d}", (P(price=10.0, per_node=8),)) for i in range(CHUNK + 8)]
    sites.append(S("narrow", (P(price=10.5, per_node=4),)))  # 12 devices x 10.5 = 126 < 16 x 10 = 160
    req = job(resources={"arch": "GPU", "count": 12, "whole_nodes": True}, policy="cheapest")
    result = decided(match(req, snapshot(*sites)))
    assert (result.chosen.site, result.chosen.cost_per_hour) == ("narrow", pytest.approx(126.0))


def test_fastest_equivalent_with_whole_nodes_finds_the_most_compute():
    """Whole-node rounding can make a slower model deliver more; fastest must not skip it on an unrounded bound."""
    snap = snapshot(
        S("a100", (P(model="A100-80G", per_node=16, total=64),)),  # 10 -> 16 devices: 1.6x asked
        S("ascend", (P(model="Ascend-910B", per_node=40, total=80),)),
    )  # 20 -> 40 devices: 2.0x asked
    req = job(resources=equivalent(10, whole_nodes=True), workload="training", policy="fastest")
    result = decided(match(req, snap))
    assert (result.chosen.site, result.chosen.devices) == ("ascend", 40)
    assert result.chosen.est_hours < 1 / 1.6


def test_fastest_does_not_favour_a_model_rated_unsuited_for_the_workload():
    """A chip the catalog rates 0 for training must not out-score a rated one under fastest for a training job."""
    snap = snapshot(S("infer", (P(model="Infer-Only"),)), S("ascend", (P(model="Ascend-910B"),)),
                    S("h800-full", (P(model="H800", total=4),)))  # fmt: skip
    req = job(resources={"archs": ["GPU", "ASIC"], "count": 8, "models": ["Infer-Only", "Ascend-910B", "H800"]},
              workload="training", policy="fastest")  # fmt: skip
    assert decided(match(req, snap)).chosen.site == "ascend"


# --------------------------------------------------------------------------- limit and exhaustive


def test_small_limit_still_gives_a_feasible_decision_and_exhaustive_counts_exactly():
    """With limit=1 a mixed policy still decides on a feasible pool; exhaustive=True counts every feasible site."""
    fleet = [S(f"ok{i}", (P(price=10 + i),), latency={"shanghai": 5 + i}) for i in range(7)]
    fleet += [S(f"full{i}", (P(total=4),)) for i in range(3)]
    fleet += [S(f"off{i}", status="offline") for i in range(2)]
    fleet += [S("two-pools", (P(price=30), P(model="H800", price=40)))]
    snap = snapshot(*fleet)
    req = job(resources={"arch": "GPU", "count": 8}, workload="training")
    quick = decided(match(req, snap, limit=1))
    assert quick.chosen.site.startswith("ok") or quick.chosen.site == "two-pools"
    assert quick.feasible_sites == 0  # counted only when asked
    full = decided(match(req, snap, exhaustive=True))
    assert full.feasible_sites == 8
    assert decided(match(req, snap, exhaustive=True, limit=1)).feasible_sites == 8


# --------------------------------------------------------------------------- properties on random fleets

MODELS = sorted(ARCH)
STACK_TAGS = ("cuda-11.8", "cuda-12.0", "cuda-12.1", "cuda-12.4", "cuda-12.10", "cann-7.0", "cann-8.0", "cann-8.1",
              "dtk-24.04", "neuware-3.10")  # fmt: skip
INTERCONNECTS = ("nvlink", "hccs", "pcie", "roce", "infiniband")
PLACES = [(c.hub, c.id) for c in GEO.clusters.values()]
ORIGINS = ("shanghai", "beijing", "chengdu", "guiyang")
OPS = (">=", "<", "==", "!=", "<=", ">")
halves = st.integers(1, 80).map(lambda n: n / 2)
LATENCY = LatencyModel()


@st.composite
def random_pools(draw: st.DrawFn) -> P:
    model = draw(st.sampled_from(MODELS))
    total = draw(st.integers(0, 96))
    return P(model=model, price=draw(halves), total=total, memory_gb=draw(st.sampled_from((32, 64, 80, 96))),
             external=draw(st.integers(0, total // 2)), allocated=draw(st.integers(0, 32)),
             per_node=draw(st.sampled_from((1, 2, 4, 8, 16))), interconnect=draw(st.sampled_from(INTERCONNECTS)),
             stacks=tuple(draw(st.lists(st.sampled_from(STACK_TAGS), max_size=3, unique=True))))  # fmt: skip


@st.composite
def random_fleets(draw: st.DrawFn) -> list[S]:
    sites = []
    for i in range(draw(st.sampled_from(range(1, 41)))):  # uniform: most fleets are not tiny
        hub, cluster = draw(st.sampled_from(PLACES))
        measured = draw(st.booleans())
        latency = {o: float(draw(st.integers(0, 80))) for o in ORIGINS} if measured else {}
        energy = {"pue": draw(st.sampled_from((1.1, 1.2, 1.4, 1.6))),
                  "green_share": draw(st.sampled_from((0, 0.3, 0.8))),
                  "tariff_cny_per_kwh": draw(st.sampled_from((0.3, 0.5, 0.7)))}  # fmt: skip
        site_pools = tuple(draw(st.lists(random_pools(), min_size=1, max_size=4, unique_by=lambda p: p.model)))
        status = draw(st.sampled_from(["online"] * 8 + ["offline", "stale"]))
        sites.append(S(f"site-{i}", site_pools, hub, cluster, status, latency, energy))
    return sites


def _version(text: str) -> tuple[int, ...]:
    parts = [int(p) for p in text.split(".")]
    while parts and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def _holds(have: str, op: str, bound: str) -> bool:
    a, b = _version(have), _version(bound)
    return {">=": a >= b, "<": a < b, "==": a == b, "!=": a != b, "<=": a <= b, ">": a > b}[op]


software_options = st.lists(
    st.tuples(st.sampled_from(("cuda", "cann", "dtk")),
              st.lists(st.tuples(st.sampled_from(OPS), st.sampled_from(("8.0", "12.1", "12.10", "12", "24.04"))),
                       max_size=2)),
    max_size=2,
)  # fmt: skip


def sometimes(draw: st.DrawFn, strategy: st.SearchStrategy[Any], otherwise: Any, one_in: int = 3) -> Any:
    """Draw from `strategy` about once in `one_in` examples, else `otherwise`: most requests should fit somewhere."""
    return draw(strategy) if draw(st.integers(1, one_in)) == 1 else otherwise


@st.composite
def random_specs(draw: st.DrawFn) -> dict[str, Any]:
    resources: dict[str, Any] = {}
    archs = sometimes(draw, st.lists(st.sampled_from(("GPU", "ASIC", "CPU")), min_size=1, max_size=2, unique=True),
                      [], 2)  # fmt: skip
    if draw(st.booleans()):
        resources["count"] = draw(st.integers(1, 64))
        archs = archs or [draw(st.sampled_from(("GPU", "ASIC")))]
    else:
        resources["equivalent"] = {
            "units": draw(st.sampled_from((0.5, 1, 3, 8, 20.5, 64))),
            "reference": draw(st.sampled_from(("A100-80G", "H800", "Ascend-910B"))),
        }
    if archs:
        resources["archs"] = archs
    resources["models"] = sometimes(draw, st.lists(st.sampled_from(MODELS), min_size=1, max_size=3, unique=True), [])
    resources["min_memory_gb"] = sometimes(draw, st.sampled_from((64, 80)), 0)
    resources["interconnect"] = sometimes(draw, st.lists(st.sampled_from(INTERCONNECTS), min_size=1, max_size=3,
                                                         unique=True), [])  # fmt: skip
    resources["whole_nodes"] = sometimes(draw, st.just(True), False)
    hubs = st.lists(st.sampled_from(sorted(GEO.hubs)), max_size=5, unique=True)
    provinces = st.lists(st.sampled_from(sorted({c.province for c in GEO.clusters.values()})), max_size=5, unique=True)
    software = [{"stack": stack, "versions": ",".join(op + v for op, v in clauses), "image": f"img-{i}"}
                for i, (stack, clauses) in enumerate(sometimes(draw, software_options, []))]  # fmt: skip
    residency = {
        "allow_hubs": draw(hubs),
        "deny_hubs": sometimes(draw, hubs, []),
        "allow_provinces": sometimes(draw, provinces, []),
        "deny_provinces": sometimes(draw, provinces, []),
    }
    spec: dict[str, Any] = {
        "resources": resources, "origin": draw(st.sampled_from(ORIGINS)), "duration_hours": 2,
        "workload": draw(st.sampled_from(("training", "inference", "hpc", "batch", "general"))),
        "software": software,
        "residency": sometimes(draw, st.just(residency), {}),
        "domestic_only": sometimes(draw, st.just(True), False, 5),
        "max_latency_ms": sometimes(draw, st.integers(10, 80).map(float), None),
        "max_price_cny_per_hour": sometimes(draw, st.integers(10, 80).map(lambda n: n / 2), None),
        "policy": draw(st.sampled_from(("balanced", "cheapest", "fastest", "nearest", "greenest"))),
        "weights": sometimes(draw, st.dictionaries(st.sampled_from(("price", "latency", "speed", "green", "packing",
                                                                    "west")), st.sampled_from((0, 0.5, 1, 5))), {}),
    }  # fmt: skip
    return spec


def perf_of(model: str, workload: str) -> float:
    """Catalog performance for a workload class (NaN for a model the catalog does not know)."""
    d = CATALOG.get(model)
    if d is None:
        return math.nan
    if workload in ("training", "hpc"):
        return d.perf_training
    if workload in ("inference", "rendering", "batch"):
        return d.perf_inference
    return (d.perf_training + d.perf_inference) / 2


def latency_of(site: S, origin: str) -> float:
    if origin in site.latency:
        return site.latency[origin]
    cluster = GEO.clusters[site.cluster]
    return LATENCY.estimate_ms(GEO.place(origin), (cluster.lat, cluster.lon))  # type: ignore[arg-type]


def devices_for(spec: dict[str, Any], pool: P) -> int | None:
    """Devices the pool must give (after whole-node rounding), or None if the model cannot serve the request."""
    resources, workload = spec["resources"], spec["workload"]
    if "count" in resources:
        need = resources["count"]
    else:
        perf = perf_of(pool.model, workload)
        if not perf > 0:
            return None
        ref = perf_of(resources["equivalent"]["reference"], workload)
        need = max(1, math.ceil(resources["equivalent"]["units"] * (ref if ref > 0 else 1.0) / perf - 1e-9))
    if resources["whole_nodes"]:
        need = -(-need // pool.per_node) * pool.per_node
    return need


def admitted_by(spec: dict[str, Any], pool: P) -> int | None:
    """Index of the first software option some tag of the pool satisfies (0 when the job names none)."""
    if not spec["software"]:
        return 0
    for i, option in enumerate(spec["software"]):
        clauses = [c for c in option["versions"].split(",") if c]
        for tag in pool.stacks:
            name, _, version = tag.partition("-")
            if name == option["stack"] and all(
                _holds(version, c[:2] if c[1] == "=" else c[0], c[2:] if c[1] == "=" else c[1:]) for c in clauses
            ):
                return i
    return None


def feasible(spec: dict[str, Any], site: S, pool: P) -> bool:
    """Brute force: every hard constraint of the spec, checked on one pool without the matcher's machinery."""
    resources, residency = spec["resources"], spec["residency"]
    cluster = GEO.clusters[site.cluster]
    devices = devices_for(spec, pool)
    if devices is None or site.status != "online":
        return False
    units = resources["equivalent"]["units"] if "equivalent" in resources else None
    unit_price = pool.price * devices / units if units is not None else pool.price
    provinces = lambda key: {p.lower() for p in residency.get(key, ())}  # noqa: E731
    return (
        (not resources.get("archs") or ARCH[pool.model] in resources["archs"])
        and (not resources["models"] or pool.model in resources["models"])
        and (not spec["domestic_only"] or (pool.model in CATALOG and CATALOG[pool.model].domestic))
        and admitted_by(spec, pool) is not None
        and (not resources["interconnect"] or pool.interconnect in resources["interconnect"])
        and pool.memory_gb >= resources["min_memory_gb"]
        and (not residency.get("allow_hubs") or site.hub in residency["allow_hubs"])
        and site.hub not in residency.get("deny_hubs", ())
        and (not residency.get("allow_provinces") or cluster.province.lower() in provinces("allow_provinces"))
        and cluster.province.lower() not in provinces("deny_provinces")
        and (spec["max_price_cny_per_hour"] is None or unit_price <= spec["max_price_cny_per_hour"])
        and (spec["max_latency_ms"] is None or latency_of(site, spec["origin"]) <= spec["max_latency_ms"])
        and pool.total - pool.external - pool.allocated >= devices
    )


def speed_key(spec: dict[str, Any], pool: P) -> float:
    """What `fastest` maximises: catalog perf for a device count; delivered over asked compute (capped at 2x)."""
    resources, perf = spec["resources"], perf_of(pool.model, spec["workload"])
    if "count" in resources:
        return perf
    ref = perf_of(resources["equivalent"]["reference"], spec["workload"])
    return min(2.0, devices_for(spec, pool) * perf / (resources["equivalent"]["units"] * (ref if ref > 0 else 1.0)))  # type: ignore[operator]


# derandomize: the suite gives the same verdict on every run; the defects found so far have their own tests above
@settings(
    max_examples=200, deadline=None, database=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(fleet=random_fleets(), spec=random_specs(), job_id=st.text("abcdef0123456789-", min_size=1, max_size=12))
def test_random_fleets_decisions_hold_every_constraint_and_policy(fleet, spec, job_id):
    """On random fleets and requests: decisions satisfy every hard constraint (brute force), NoFit iff nothing fits,
    a single-score policy's choice is optimal among feasible pools, exhaustive counts exactly, and decisions replay."""
    req = Request.of(job_id, JobSpec.model_validate(spec))
    snap = snapshot(*fleet)
    result = match(req, snap)
    # (d) the same input gives the same decision, on the same or a rebuilt snapshot
    assert match(req, snap) == result
    assert match(req, snapshot(*fleet)) == result
    options = [(s, p) for s in fleet for p in s.pools if feasible(spec, s, p)]
    # (c) NoFit iff brute force finds nothing
    if not options:
        assert isinstance(result, NoFit), result
        assert sum(n for _, n in result.reasons) == len(fleet)
        assert isinstance(match(req, snap, limit=1), NoFit)
        return
    assert isinstance(result, Decision), (result, options[:3])
    # (a) every candidate satisfies every hard constraint, with the devices and prices brute force expects
    by_id = {s.id: s for s in fleet}
    candidates = [result.chosen, *result.runners_up]
    assert len({c.site for c in candidates}) == len(candidates)
    for c in candidates:
        site = by_id[c.site]
        pool = next(p for p in site.pools if p.model == c.model)
        assert feasible(spec, site, pool), (c, site, pool)
        assert c.devices == devices_for(spec, pool)
        assert c.cost_per_hour == pytest.approx(pool.price * c.devices)
        if spec["software"]:
            option = spec["software"][admitted_by(spec, pool)]  # type: ignore[index]
            assert c.stack in pool.stacks and c.image == option["image"], (c, pool, spec["software"])
    # the chosen one is optimal under a single-score policy (brute force over every feasible pool)
    weights = req.weight_map()
    only = next(iter(weights)) if len(weights) == 1 else None
    chosen_site, chosen_pool = (
        by_id[result.chosen.site],
        next(p for p in by_id[result.chosen.site].pools if p.model == result.chosen.model),
    )
    if only == "price":  # (b) nothing that passes the filters is cheaper per hour
        cheapest = min(p.price * devices_for(spec, p) for _, p in options)  # type: ignore[operator]
        assert result.chosen.cost_per_hour <= cheapest * (1 + 1e-9), (result.chosen, cheapest)
    elif only == "latency":
        nearest = min(latency_of(s, spec["origin"]) for s, _ in options)
        assert latency_of(chosen_site, spec["origin"]) <= nearest + 1e-3
    elif only == "green":
        greenest = max(green_score(s.energy) for s, _ in options)
        assert green_score(chosen_site.energy) >= greenest - 1e-3
    elif only == "speed" and all(p.model in CATALOG for _, p in options):
        fastest = max(speed_key(spec, p) for _, p in options)
        assert speed_key(spec, chosen_pool) >= fastest - 1e-9, (result.chosen, fastest)
    # exhaustive counts feasible sites exactly; a tiny limit still decides on a feasible pool
    assert decided(match(req, snap, exhaustive=True)).feasible_sites == len({s.id for s, _ in options})
    quick = decided(match(req, snap, limit=1))
    quick_site = by_id[quick.chosen.site]
    assert feasible(spec, quick_site, next(p for p in quick_site.pools if p.model == quick.chosen.model))
