"""Why a job waits: the filter list the scan chooses by is the list `explain` counts by, reservation and all."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import pytest

from broker.matching import FILTERS, Decision, NoFit, Plan, Request, explain, match
from broker.matching.request import DataSet, RequestChanges
from broker.matching.snapshot import Snapshot
from broker.model.records import SiteRecord
from broker.model.stacks import parse_requirement
from regions import load_geography

GEO = load_geography()
RESERVED = "pool reserved for a job that has waited longer"


@dataclass(frozen=True)
class P:
    """One device pool of a site."""

    model: str = "A100-80G"
    price: float = 10.0
    total: int = 64
    external: int = 0
    allocated: int = 0
    arch: str = "GPU"


@dataclass(frozen=True)
class S:
    """One site: its pools, hub, status and the latency from shanghai it measured."""

    id: str = "a"
    pools: tuple[P, ...] = (P(),)
    hub: str = "guizhou"
    cluster: str = "guian"
    status: str = "online"
    latency_ms: float = 10.0


def snapshot(*sites: S) -> Snapshot:
    snap = Snapshot(GEO)
    for s in sites:
        pools = [{"arch": p.arch, "model": p.model, "memory_gb": 80, "per_node": 8, "interconnect": "nvlink",
                  "stacks": ["cuda-12.4"], "price_cny_per_hour": p.price} for p in s.pools]  # fmt: skip
        capacity: dict[str, int] = {}
        for p in s.pools:
            capacity |= {f"t:{p.model}": p.total, f"x:{p.model}": p.external, f"a:{p.model}": p.allocated}
        meta = {"pools": pools, "energy": {}, "latency_ms": {"shanghai": s.latency_ms}}
        snap.apply(SiteRecord(s.id, s.hub, s.cluster, s.status, 1, 1, meta, capacity))
    return snap


def request(**overrides: Any) -> Request:
    """One GPU device from shanghai with no caps, with `overrides` applied."""
    fields_: dict[str, Any] = {"job_id": "job-1", "archs": ("GPU",), "models": (), "count": 1, "units": None,
                               "reference": "", "min_memory_gb": 0.0, "origin": "shanghai", "max_latency_ms": None,
                               "max_price": None}  # fmt: skip
    return Request(**(fields_ | overrides))


def held(snap: Snapshot, site: str = "a", model: str = "A100-80G") -> tuple[str, int]:
    """The (model, row) of a site's pool, as a backfill reservation names it."""
    return model, snap.tables[model].index[site]


# --------------------------------------------------------------------------- the reservation


def test_a_reserved_only_fitting_pool_is_named_not_no_sites_known():
    """When the one pool that fits is held for a blocked gang, the job is told so, not that no sites are known."""
    snap = snapshot(S("a"))
    result = match(request(), snap, exclude=held(snap))
    assert isinstance(result, NoFit)
    assert result.reasons == ((RESERVED, 1),)
    assert result.message == f"1 site: {RESERVED}"


def test_reservation_is_counted_with_the_other_reasons():
    """A reserved pool counts as its own reason next to the sites ruled out for something else."""
    snap = snapshot(S("a"), S("small", (P(total=4),)), S("dear", (P(price=50),)))
    result = match(request(count=8, max_price=20.0), snap, exclude=held(snap))
    assert isinstance(result, NoFit)
    assert result.reasons == (("fewer than 8 devices free", 1), (RESERVED, 1), ("price above 20 CNY/h", 1))


def test_reservation_holds_back_one_pool_only():
    """The held pool is passed over; another site, or the same site's other model, still takes the job."""
    snap = snapshot(S("a", (P(price=1),)), S("b", (P(price=5),)))
    result = match(request(), snap, exclude=held(snap))
    assert isinstance(result, Decision) and result.chosen.site == "b"
    snap = snapshot(S("a", (P(price=1), P(model="H800", price=5))))
    result = match(request(), snap, exclude=held(snap))
    assert isinstance(result, Decision) and (result.chosen.site, result.chosen.model) == ("a", "H800")


def test_a_reason_that_cannot_wait_out_the_reservation_comes_first():
    """A held pool that is also too small is explained by its size: the reservation is not why it waits."""
    snap = snapshot(S("a", (P(total=4),)))
    result = match(request(count=8), snap, exclude=held(snap))
    assert isinstance(result, NoFit) and result.reasons == (("fewer than 8 devices free", 1),)


# --------------------------------------------------------------------------- every filter, explained

# filter name -> (sites, request overrides, plan options) in which that filter alone rules site "a" out
RULED_OUT: dict[str, tuple[tuple[S, ...], dict[str, Any], dict[str, Any]]] = {
    "offline": ((S(status="offline"),), {}, {}),
    "model": ((S(),), {"models": ("H800",)}, {}),
    "domestic": ((S(),), {"domestic_only": True}, {}),
    "perf": ((S(pools=(P(model="Mystery-X"),)),), {"count": None, "units": 2.0, "reference": "A100-80G"}, {}),
    "stack": ((S(),), {"software": (parse_requirement("cann", ">=8.0"),)}, {}),
    "interconnect": ((S(),), {"interconnect": ("hccs",)}, {}),
    "memory": ((S(),), {"min_memory_gb": 96.0}, {}),
    "residency": ((S(),), {"allow_hubs": frozenset({"yangtze"})}, {}),
    "data": ((S(),), {"datasets": (DataSet("corpus", 100.0, "shanghai", copyable=False),)}, {}),
    "price": ((S(),), {"max_price": 5.0}, {}),
    "latency": ((S(),), {"max_latency_ms": 5.0}, {}),
    "capacity": ((S(pools=(P(total=16, allocated=12),)),), {"count": 8}, {}),
    "when_empty": ((S(pools=(P(total=16, external=12),)),), {"count": 8}, {"when_empty": True}),
    "reserved": ((S(),), {}, {"exclude": ("A100-80G", 0)}),
    "avoided": ((S(),), {}, {"avoid": frozenset({"a"})}),
}  # fmt: skip


def test_every_filter_has_a_case_and_a_label():
    """Each filter in the list has a distinct name, a case below, and a non-empty label for any request."""
    names = [f.name for f in FILTERS]
    assert len(set(names)) == len(names)
    assert set(names) == set(RULED_OUT)
    for f in FILTERS:
        for overrides in ({}, RULED_OUT[f.name][1]):
            label = f.label(request(**overrides))
            assert isinstance(label, str) and label.strip()


@pytest.mark.parametrize("name", [f.name for f in FILTERS])
def test_explain_names_the_filter_that_rules_a_site_out(name):
    """When one filter alone rules the only site out, `explain` counts that site under the filter's label."""
    sites, overrides, options = RULED_OUT[name]
    req, snap = request(**overrides), snapshot(*sites)
    label = next(f for f in FILTERS if f.name == name).label(req)
    assert explain(Plan(req, snap, **options)) == NoFit(((label, 1),))
    if name != "offline":  # and without the constraint the site takes the job
        assert isinstance(match(request(), snap), Decision)


@pytest.mark.parametrize("name", [f.name for f in FILTERS if f.name != "avoided"])
def test_match_gives_the_same_reason_as_explain(name):
    """`match` refuses with exactly what `explain` says for the same plan (a site to avoid is never a refusal)."""
    sites, overrides, options = RULED_OUT[name]
    req, snap = request(**overrides), snapshot(*sites)
    assert match(req, snap, **options) == explain(Plan(req, snap, **options))


def test_filters_are_counted_in_list_order():
    """A pool failing several filters is counted under the first of them in the list."""
    snap = snapshot(S(pools=(P(price=50, total=4),), latency_ms=40.0))
    result = match(request(count=8, max_price=20.0, max_latency_ms=30.0), snap, exclude=held(snap))
    assert isinstance(result, NoFit) and result.reasons == (("price above 20 CNY/h", 1),)


# --------------------------------------------------------------------------- sites to avoid


def test_a_site_to_avoid_is_passed_over_when_another_fits():
    """The site that just gave the job back is not chosen while another site can take it."""
    snap = snapshot(S("a", (P(price=1),)), S("b", (P(price=9),)))
    result = match(request(avoid_sites=frozenset({"a"})), snap)
    assert isinstance(result, Decision) and result.chosen.site == "b"


def test_a_site_to_avoid_is_chosen_when_nothing_else_fits():
    """With no other site that fits, the avoided site takes the job rather than leave it waiting."""
    snap = snapshot(S("a"), S("b", (P(total=0),)))
    result = match(request(avoid_sites=frozenset({"a"})), snap)
    assert isinstance(result, Decision) and result.chosen.site == "a"


def test_avoiding_a_site_is_never_the_reason_a_job_waits():
    """When nothing fits even with the avoided site allowed, it is counted under its own reason, not as avoided."""
    snap = snapshot(S("a", (P(total=4),)), S("b", (P(price=50),)))
    result = match(request(count=8, max_price=20.0, avoid_sites=frozenset({"a", "gone"})), snap)
    assert isinstance(result, NoFit)
    assert result.reasons == (("fewer than 8 devices free", 1), ("price above 20 CNY/h", 1))


# --------------------------------------------------------------------------- as if the broker's work were gone


def test_when_empty_counts_the_broker_s_own_allocations_as_free():
    """A pool full of the broker's own jobs fits when matched as if empty, with free = total - outside use."""
    snap = snapshot(S(pools=(P(total=16, external=4, allocated=12),)))
    assert match(request(count=8), snap) == NoFit((("fewer than 8 devices free", 1),))
    result = match(request(count=8), snap, when_empty=True)
    assert isinstance(result, Decision) and result.chosen.free == 12


def test_when_empty_still_refuses_a_pool_too_small_for_the_job():
    """Outside use the broker cannot end rules a pool out even when matched as if empty, and says so."""
    snap = snapshot(S(pools=(P(total=16, external=12),)))
    result = match(request(count=8), snap, when_empty=True)
    assert result == NoFit((("fewer than 8 devices even without the broker's own jobs", 1),))


# --------------------------------------------------------------------------- requests


def test_every_field_but_the_job_id_can_be_relaxed():
    """`Request.relaxed` accepts each field of a Request except its id, and changes only what it is given."""
    assert set(RequestChanges.__annotations__) == {f.name for f in fields(Request)} - {"job_id"}
    req = request(max_price=5.0)
    assert req.relaxed(max_price=None) == request()


@pytest.mark.parametrize(("count", "units"), [(None, None), (2, 2.0)])
def test_a_request_asks_for_devices_or_compute(count, units):
    """A request with neither a device count nor equivalent units, or with both, is refused."""
    with pytest.raises(ValueError, match="either a device count or equivalent units"):
        request(count=count, units=units)
