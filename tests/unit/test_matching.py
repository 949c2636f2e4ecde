"""The pure matcher over snapshots built from plain tables: filters, scoring, tie-breaks and NoFit reasons."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.matching import RUNNERS_UP, Decision, NoFit, Request, match
from broker.matching.snapshot import Snapshot
from broker.model.job import JobSpec
from broker.model.records import SiteRecord
from regions import load_geography

GEO = load_geography()
# (hub, cluster) pairs from the real geography.
PLACES = [(cluster.hub, cluster.id) for cluster in GEO.clusters.values()]
ORIGINS = ("shanghai", "beijing", "chengdu")


# --------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class P:
    """One device pool of a site, as the test tables write it."""

    model: str = "A100-80G"
    price: float = 10.0
    total: int = 64
    arch: str = "GPU"
    memory_gb: float = 80
    external: int = 0
    allocated: int = 0


@dataclass(frozen=True)
class S:
    """One site: its pools, where it is, its status and the latencies it measured itself."""

    id: str
    pools: tuple[P, ...] = (P(),)
    hub: str = "guizhou"
    cluster: str = "guian"
    status: str = "online"
    latency: dict[str, float] = field(default_factory=lambda: {"shanghai": 10.0})


def record(site: S, meta_version: int = 1) -> SiteRecord:
    """The SiteRecord the store would load for `site`."""
    pools = [
        {"arch": p.arch, "model": p.model, "memory_gb": p.memory_gb, "per_node": 8, "interconnect": "nvlink",
         "stacks": ["cuda-12.4"], "price_cny_per_hour": p.price}
        for p in site.pools
    ]  # fmt: skip
    capacity: dict[str, int] = {}
    for p in site.pools:
        capacity |= {f"t:{p.model}": p.total, f"x:{p.model}": p.external, f"a:{p.model}": p.allocated}
    return SiteRecord(
        id=site.id, hub=site.hub, cluster=site.cluster, status=site.status, seen_ms=1_700_000_000_000,
        meta_version=meta_version,
        meta={"pools": pools, "energy": {"pue": 1.2, "green_share": 0.5, "tariff_cny_per_kwh": 0.4},
              "latency_ms": dict(site.latency)},
        capacity=capacity,
    )  # fmt: skip


def snapshot(*sites: S) -> Snapshot:
    snap = Snapshot(GEO)
    for site in sites:
        snap.apply(record(site))
    return snap


def request(job_id: str = "job-1", **overrides: object) -> Request:
    """A GPU request for one device from shanghai with no caps, with `overrides` applied."""
    fields: dict[str, object] = {
        "job_id": job_id, "arch": "GPU", "models": (), "count": 1, "min_memory_gb": 0.0, "origin": "shanghai",
        "max_latency_ms": None, "max_price": None,
    }  # fmt: skip
    fields |= overrides
    fields["archs"] = (fields.pop("arch"),)
    fields.setdefault("units", None)
    fields.setdefault("reference", "")
    return Request(**fields)  # type: ignore[arg-type]


def chosen_site(result: Decision | NoFit) -> str:
    assert isinstance(result, Decision), f"expected a decision, got {result}"
    return result.chosen.site


# --------------------------------------------------------------------------- filters and scoring, table-driven

CHOICES = [
    pytest.param([S("asic", (P(arch="ASIC", model="910B", price=1),)), S("gpu", (P(price=9),))], {}, "gpu",
                 id="arch-filter-gpu"),
    pytest.param([S("asic", (P(arch="ASIC", model="910B", price=9),)), S("gpu", (P(price=1),))], {"arch": "ASIC"},
                 "asic", id="arch-filter-asic"),
    pytest.param([S("a100", (P(model="A100-80G", price=5),)), S("h800", (P(model="H800", price=20),))],
                 {"models": ("H800",)}, "h800", id="model-list"),
    pytest.param([S("a100", (P(model="A100-80G", price=5),)), S("h800", (P(model="H800", price=20),)),
                  S("l40", (P(model="L40", price=1),))],
                 {"models": ("A100-80G", "H800")}, "a100", id="model-list-of-two-cheapest-of-them"),
    pytest.param([S("small", (P(memory_gb=40, price=1),)), S("big", (P(memory_gb=80, price=20),))],
                 {"min_memory_gb": 80.0}, "big", id="min-memory-exactly"),
    pytest.param([S("at-cap", (P(price=15.0),), latency={"shanghai": 25}), S("above", (P(price=15.01),))],
                 {"max_price": 15.0}, "at-cap", id="price-exactly-at-cap-passes"),
    pytest.param([S("at-cap", (P(price=5),), latency={"shanghai": 30.0}),
                  S("above", (P(price=1),), latency={"shanghai": 30.5})],
                 {"max_latency_ms": 30.0}, "at-cap", id="latency-exactly-at-cap-passes"),
    pytest.param([S("exact", (P(total=16, external=4, allocated=4, price=9),)),
                  S("short", (P(total=16, external=4, allocated=5, price=1),))],
                 {"count": 8}, "exact", id="free-exactly-count-passes"),
    pytest.param([S("offline", (P(price=1),), status="offline"), S("stale", (P(price=1),), status="stale"),
                  S("online", (P(price=20),))], {}, "online", id="offline-and-stale-never-chosen"),
    pytest.param([S("dear", (P(price=12),)), S("cheap", (P(price=11),)), S("dearer", (P(price=14),))], {}, "cheap",
                 id="cheapest-wins-at-equal-latency"),
    pytest.param([S("far", latency={"shanghai": 20}), S("near", latency={"shanghai": 5}),
                  S("farther", latency={"shanghai": 28})], {}, "near", id="nearest-wins-at-equal-price"),
    pytest.param([S("guian", cluster="guian", latency={}),
                  S("yangtze", hub="yangtze", cluster="yangtze-demo", latency={})],
                 {}, "yangtze", id="nearest-by-latency-model"),
    pytest.param([S("two", (P(model="A100-80G", price=20), P(model="H800", price=3)),),
                  S("one", (P(model="A100-80G", price=5),))],
                 {}, "two", id="best-pool-of-a-site-counts"),
    pytest.param([S("used", (P(total=16, allocated=10, price=1),)), S("free", (P(total=16, price=9),))],
                 {"count": 7}, "free", id="allocated-reduces-free"),
]  # fmt: skip


@pytest.mark.parametrize(("sites", "overrides", "expected"), CHOICES)
def test_match_chooses_the_expected_site(sites, overrides, expected):
    """Given a fleet table and a request, the matcher chooses the one site the filters and scores single out."""
    result = match(request(**overrides), snapshot(*sites))
    assert chosen_site(result) == expected


NO_FITS = [
    pytest.param([S("a", (P(price=15.01),))], {"max_price": 15.0}, (("price above 15 CNY/h", 1),),
                 id="just-above-price-cap"),
    pytest.param([S("a", latency={"shanghai": 30.5})], {"max_latency_ms": 30.0},
                 (("latency from shanghai above 30 ms", 1),), id="just-above-latency-cap"),
    pytest.param([S("a", (P(total=16, external=4, allocated=4),))], {"count": 9},
                 (("fewer than 9 devices free", 1),), id="one-more-than-free"),
    pytest.param([S("a", (P(total=16, allocated=10),))], {"count": 7}, (("fewer than 7 devices free", 1),),
                 id="allocated-reduces-free"),
    pytest.param([S(f"dear{i}", (P(price=20),)) for i in range(3)]
                 + [S(f"far{i}", (P(price=10),), latency={"shanghai": 40}) for i in range(2)],
                 {"max_price": 15.0, "max_latency_ms": 30.0},
                 (("price above 15 CNY/h", 3), ("latency from shanghai above 30 ms", 2)), id="price-and-latency"),
    pytest.param([S("asic", (P(arch="ASIC", model="910B"),)), S("dear", (P(price=20),))], {"max_price": 15.0},
                 (("no GPU pool", 1), ("price above 15 CNY/h", 1)), id="no-pool-of-the-arch-counted"),
    pytest.param([S("asic", (P(arch="ASIC", model="910B"),))], {}, (("no GPU pool", 1),), id="no-table-for-arch"),
    pytest.param([S("off", status="offline"), S("stale", status="stale"), S("l40", (P(model="L40"),))],
                 {"models": ("H800",)}, (("site offline", 2), ("no H800 pool", 1)), id="offline-then-model"),
    pytest.param([S("small", (P(memory_gb=40),))], {"min_memory_gb": 80.0}, (("no pool with >= 80 GB", 1),),
                 id="memory"),
    pytest.param([S("a")], {"origin": "atlantis"}, (("unknown origin atlantis", 1),), id="unknown-origin"),
    # A site whose best pool gets furthest is counted once, under that pool's reason.
    pytest.param([S("mixed", (P(model="A100-80G", price=20), P(model="H800", price=5, total=2)))],
                 {"max_price": 15.0, "count": 4}, (("fewer than 4 devices free", 1),), id="site-counted-once"),
]  # fmt: skip


@pytest.mark.parametrize(("sites", "overrides", "reasons"), NO_FITS)
def test_no_fit_names_the_filter_and_counts_sites(sites, overrides, reasons):
    """When nothing fits, each site is counted once under the first filter its best pool failed, most common first."""
    result = match(request(**overrides), snapshot(*sites))
    assert isinstance(result, NoFit)
    assert result.reasons == reasons
    assert sum(n for _, n in result.reasons) == len(sites)


def test_no_sites_known_is_an_empty_no_fit():
    """An empty snapshot gives NoFit with no reasons and says no sites are known yet."""
    result = match(request(), Snapshot(GEO))
    assert result == NoFit(())
    assert result.message == "no sites known yet"


def test_no_fit_message_lists_reasons_with_counts():
    """The NoFit message pluralises per reason and keeps the reasons' order."""
    message = NoFit((("price above 15 CNY/h", 3), ("site offline", 1))).message
    assert message == "3 sites: price above 15 CNY/h; 1 site: site offline"


def test_request_of_job_spec_copies_the_constraints():
    """Request.of carries every hard constraint of a JobSpec over unchanged."""
    spec = JobSpec.model_validate({
        "resources": {"arch": "GPU", "models": ["A100-80G", "H800"], "count": 16, "min_memory_gb": 80},
        "origin": "shanghai", "max_latency_ms": 30, "max_price_cny_per_hour": 15, "duration_hours": 6,
    })  # fmt: skip
    req = Request.of("j-7", spec)
    assert (req.job_id, req.archs, req.models, req.count, req.min_memory_gb) == (
        "j-7", ("GPU",), ("A100-80G", "H800"), 16, 80)  # fmt: skip
    assert (req.origin, req.max_latency_ms, req.max_price, req.duration_hours) == ("shanghai", 30, 15, 6)


def test_snapshot_update_in_place_frees_capacity():
    """Applying a newer record of a site replaces its counters, so released capacity becomes matchable."""
    full = S("a", (P(total=16, allocated=16),))
    snap = snapshot(full)
    assert isinstance(match(request(count=4), snap), NoFit)
    snap.apply(record(S("a", (P(total=16, allocated=12),))))
    result = match(request(count=4), snap)
    assert chosen_site(result) == "a"
    assert isinstance(result, Decision) and result.chosen.free == 4


def test_site_going_offline_in_snapshot_is_no_longer_chosen():
    """A later record with status offline removes the site from choice without removing its rows."""
    snap = snapshot(S("a", (P(price=1),)), S("b", (P(price=9),)))
    assert chosen_site(match(request(), snap)) == "a"
    snap.apply(record(S("a", (P(price=1),), status="offline")))
    assert chosen_site(match(request(), snap)) == "b"


# --------------------------------------------------------------------------- decisions


def test_decision_carries_the_chosen_pool_facts():
    """The chosen candidate reports site, hub, model, free devices, price and latency of the pool."""
    snap = snapshot(S("a", (P(model="H800", price=12.5, total=64, external=8, allocated=6),),
                      latency={"shanghai": 21.0}))  # fmt: skip
    result = match(request(count=4), snap)
    assert isinstance(result, Decision)
    c = result.chosen
    expected = ("a", "guizhou", "H800", "GPU", 50, 12.5, 21.0)
    assert (c.site, c.hub, c.model, c.arch, c.free, c.price, c.latency_ms) == expected
    # the balanced policy for general work
    assert set(c.scores) == {"price", "latency", "speed", "packing", "reliability"}
    assert all(0 <= v <= 100 for v in c.scores.values())
    assert result.runners_up == ()


def test_runners_up_are_distinct_other_sites_in_score_order():
    """Runners-up are at most RUNNERS_UP other sites, each once, none the chosen site, best score first."""
    sites = [S(f"s{i}", (P(model="A100-80G", price=10 + i), P(model="H800", price=11 + i)),
               latency={"shanghai": 5 + i}) for i in range(6)]  # fmt: skip
    result = match(request(), snapshot(*sites))
    assert isinstance(result, Decision)
    names = [result.chosen.site, *(c.site for c in result.runners_up)]
    assert len(result.runners_up) == RUNNERS_UP
    assert len(set(names)) == len(names)
    assert names == ["s0", "s1", "s2", "s3"]
    scores = [result.chosen.score, *(c.score for c in result.runners_up)]
    assert scores == sorted(scores, reverse=True)


def test_same_input_gives_the_same_decision():
    """Matching the same request against the same fleet twice, or against a rebuilt snapshot, decides the same."""
    sites = [S(f"s{i}", (P(price=10),)) for i in range(5)]
    snap = snapshot(*sites)
    first = match(request("job-42"), snap)
    assert match(request("job-42"), snap) == first
    assert match(request("job-42"), snapshot(*sites)) == first


def test_ties_between_identical_sites_break_by_job_id_and_are_stable():
    """On identical sites, different job ids spread over several sites, and each job id always picks the same one."""
    sites = [S(f"s{i}", (P(price=10),)) for i in range(6)]
    snap = snapshot(*sites)
    picks = {}
    for n in range(40):
        job = f"job-{n}"
        picks[job] = chosen_site(match(request(job), snap))
        assert chosen_site(match(request(job), snap)) == picks[job]
        assert chosen_site(match(request(job), snapshot(*sites))) == picks[job]
    assert len(set(picks.values())) > 1


def test_site_at_an_unknown_place_does_not_distort_the_ranking_of_the_others():
    """A site whose hub is not in the geography (no latency known) gets no NaN score and leaves nearest-wins intact."""
    sites = [S("near", latency={"shanghai": 5}), S("far", latency={"shanghai": 20}),
             S("lost", hub="atlantis", cluster="", latency={})]  # fmt: skip
    snap = snapshot(*sites)
    for n in range(20):
        result = match(request(f"job-{n}"), snap)
        assert chosen_site(result) == "near"
        assert isinstance(result, Decision)
        for c in (result.chosen, *result.runners_up):
            assert 0 <= c.score <= 100, c
            assert all(0 <= v <= 100 for v in c.scores.values()), c


# --------------------------------------------------------------------------- property: hard constraints always hold

MODELS = {"A100-80G": "GPU", "H800": "GPU", "L40": "GPU", "910B": "ASIC", "MLU370": "ASIC", "EPYC": "CPU"}
MEMORY = (16, 24, 40, 48, 64, 80, 96)
halves = st.integers(0, 80).map(lambda n: n / 2)  # exact in float32 and float64


@st.composite
def pools(draw: st.DrawFn) -> P:
    model = draw(st.sampled_from(sorted(MODELS)))
    total = draw(st.integers(0, 64))
    return P(model=model, arch=MODELS[model], memory_gb=draw(st.sampled_from(MEMORY)), price=draw(halves),
             total=total, external=draw(st.integers(0, total)), allocated=draw(st.integers(0, 64)))  # fmt: skip


@st.composite
def fleets(draw: st.DrawFn) -> list[S]:
    n = draw(st.integers(1, 30))
    sites = []
    for i in range(n):
        hub, cluster = draw(st.sampled_from(PLACES))
        site_pools = draw(st.lists(pools(), max_size=4, unique_by=lambda p: p.model))
        latency = {o: draw(st.integers(0, 80).map(float)) for o in ORIGINS}
        status = draw(st.sampled_from(["online", "online", "online", "offline", "stale"]))
        sites.append(S(f"site-{i}", tuple(site_pools), hub, cluster, status, latency))
    return sites


requests = st.builds(
    request,
    job_id=st.text("abcdef0123456789-", min_size=1, max_size=12),
    arch=st.sampled_from(["GPU", "ASIC", "CPU", "FPGA"]),
    models=st.lists(st.sampled_from(sorted(MODELS)), max_size=3, unique=True).map(tuple),
    count=st.integers(1, 64),
    min_memory_gb=st.sampled_from((0.0, *map(float, MEMORY))),
    origin=st.sampled_from(ORIGINS),
    max_latency_ms=st.none() | st.integers(1, 80).map(float),
    max_price=st.none() | halves,
)


def fits(req: Request, site: S, pool: P) -> bool:
    """Brute force: does this pool satisfy every hard constraint of the request?"""
    return (
        site.status == "online"
        and pool.arch in req.archs
        and (not req.models or pool.model in req.models)
        and pool.memory_gb >= req.min_memory_gb
        and (req.max_price is None or pool.price <= req.max_price)
        and (req.max_latency_ms is None or site.latency[req.origin] <= req.max_latency_ms)
        and pool.total - pool.external - pool.allocated >= req.count
    )


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(fleet=fleets(), req=requests)
def test_decisions_satisfy_every_hard_constraint(fleet, req):
    """A decision's pools satisfy every hard constraint; NoFit means brute force finds no fitting pool; both repeat."""
    snap = snapshot(*fleet)
    result = match(req, snap)
    assert match(req, snap) == result
    by_id = {s.id: s for s in fleet}
    if isinstance(result, Decision):
        candidates = [result.chosen, *result.runners_up]
        assert len({c.site for c in candidates}) == len(candidates)
        for c in candidates:
            site = by_id[c.site]
            pool = next(p for p in site.pools if p.model == c.model)
            assert fits(req, site, pool), (c, site, pool)
            assert c.free == pool.total - pool.external - pool.allocated
            assert c.price == pool.price
            assert c.latency_ms == site.latency[req.origin]
        assert all(result.chosen.score + 1e-2 >= c.score for c in result.runners_up)
    else:
        assert not any(fits(req, s, p) for s in fleet for p in s.pools)
        assert sum(n for _, n in result.reasons) == len(fleet)


def test_a_whole_node_request_far_beyond_any_pool_is_refused_not_overflowed():
    """Equivalent compute of ~860,000 units on whole nodes is more devices than int32 holds once rounded
    up to nodes: the answer is that nothing fits, not an overflow (a 500 from /v1/quote)."""
    from broker.matching import NoFit, Request, match
    from broker.matching.quote import quote
    from broker.model.job import JobSpec
    from suanwang.bench_matching import build_snapshot

    spec = JobSpec.model_validate({
        "workload": "inference", "origin": "ningxia", "duration_hours": 1,
        "resources": {"whole_nodes": True, "archs": ["GPU", "ASIC"], "equivalent": {"units": 856826.0359486906}},
    })  # fmt: skip
    snap = build_snapshot(50)
    assert isinstance(match(Request.of("huge", spec), snap), NoFit)
    assert quote(Request.of("huge", spec), snap)["candidates"] == []
