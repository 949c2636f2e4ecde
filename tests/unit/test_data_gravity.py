"""Data gravity (东数西算), pure: the transfer model and its seed, where a dataset counts as already there, the
hours and CNY to move it to each pool, data that may not be copied, residency over data, and how matches and
quotes weigh the move."""

from __future__ import annotations

import copy
import tomllib
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

import seeds
from broker.matching import Candidate, Decision, NoFit, Request, match
from broker.matching.data import DataPlan
from broker.matching.quote import quote
from broker.matching.request import DataSet
from broker.matching.snapshot import Snapshot
from common.config import parse_prices
from common.errors import InvalidInput
from regions import TransferModel, hub_of_place, load_transfer, nearest_hub, transfer_hours
from regions.transfer import MAX_GBPS, build_transfer
from tests.unit.test_matching import GEO, P, S, record, request

T = load_transfer()
MODEL = "A100-80G"
TB40 = 40_000.0

# Two sites by the data in Shanghai (长三角), two cheap ones in the west; 8 devices for 10 hours.
NEAR = S("sh-near", (P(price=20),), hub="yangtze", cluster="yangtze-demo", latency={})
WUHU = S("wuhu-1", (P(price=21),), hub="yangtze", cluster="wuhu", latency={})
WEST = S("qy-west", (P(price=10),), hub="gansu", cluster="qingyang", latency={})
NX = S("zw-west", (P(price=11),), hub="ningxia", cluster="zhongwei", latency={})
SITES = (NEAR, WUHU, WEST, NX)
HUB = {s.id: s.hub for s in SITES}


# --------------------------------------------------------------------------- helpers


def snap_of(*sites: S, bandwidth: dict[str, dict[str, float]] | None = None,
            transfer: TransferModel | None = None) -> Snapshot:  # fmt: skip
    """A snapshot of `sites` (all of SITES by default); `bandwidth` gives a site's measured rates."""
    snap = Snapshot(GEO, transfer=transfer)
    for site in sites or SITES:
        rec = record(site)
        measured = (bandwidth or {}).get(site.id)
        if measured:
            rec = replace(rec, meta={**(rec.meta or {}), "bandwidth_gbps": measured})
        snap.apply(rec)
    return snap


def job(*datasets: DataSet, **overrides: Any) -> Request:
    """8 A100-class GPUs for 10 hours from Shanghai, training, reading `datasets`."""
    fields: dict[str, Any] = {"count": 8, "duration_hours": 10.0, "workload": "training", "datasets": datasets}
    return request(**(fields | overrides))


def corpus(size_gb: float = TB40, location: str = "shanghai", copyable: bool = True) -> DataSet:
    return DataSet("corpus", size_gb, location, copyable)


def moving(req: Request, snap: Snapshot, site: str) -> tuple[float, float, bool]:
    """(hours, CNY, whether any data moves) to bring the request's data to `site`'s pool."""
    plan = DataPlan(req, snap)
    table = snap.tables[MODEL]
    rows = plan.rows(table, np.array([table.index[site]], np.int32))
    return float(rows.hours[0]), float(rows.cost[0]), bool(rows.moves[0])


def seeded(size_gb: float, source_hub: str, site: str) -> tuple[float, float, bool]:
    """What the seed says moving `size_gb` from `source_hub` to `site` takes."""
    return (size_gb * 8 / T.gbps(source_hub, HUB[site]) / 3600, size_gb * T.egress_cny_per_gb(source_hub), True)


def decided(result: Decision | NoFit) -> Decision:
    assert isinstance(result, Decision), f"expected a decision, got {result}"
    return result


def everyone(result: Decision | NoFit) -> dict[str, Candidate]:
    chosen = decided(result)
    return {c.site: c for c in (chosen.chosen, *chosen.runners_up)}


# --------------------------------------------------------------------------- the transfer model and its seed


def test_transfer_hours_are_decimal_gigabytes_over_the_rate():
    """40 TB at 10 Gbps is 32,000 s, about 8.9 h (1 TB = 1,000 GB, 1 GB = 8 Gb); it works on arrays too."""
    assert transfer_hours(TB40, 10.0) * 3600 == pytest.approx(32_000.0)
    assert round(transfer_hours(TB40, 10.0), 1) == 8.9
    assert transfer_hours(200.0, 20.0) == pytest.approx(200 * 8 / 20 / 3600)


def test_the_shipped_model_has_every_hub_and_pair_and_is_symmetric():
    """Every hub has its own rate and egress price, every pair of hubs a rate either way; a copy within a hub
    is never slower than one leaving it, and unknown hubs get the slowest rate and the dearest price."""
    assert set(T.within_gbps) == set(T.egress) == set(GEO.hubs)
    for a in GEO.hubs:
        assert T.gbps(a, a) == T.within_gbps[a]
        for b in GEO.hubs:
            assert 0 < T.gbps(a, b) == T.gbps(b, a) <= MAX_GBPS
            assert T.gbps(a, a) >= T.gbps(a, b)
    assert T.gbps("atlantis", "gansu") == T.gbps("gansu", "") == T.slowest_gbps == min(T.link_gbps.values())
    assert T.egress_cny_per_gb("atlantis") == max(T.egress.values())


def _seed() -> dict[str, Any]:
    with seeds.path("transfer.toml").open("rb") as fh:
        return tomllib.load(fh)


def _hub(doc: dict[str, Any], hub: str) -> dict[str, Any]:
    return next(rec for rec in doc["hub"] if rec["id"] == hub)


def _link(doc: dict[str, Any], a: str, b: str) -> dict[str, Any]:
    return next(rec for rec in doc["link"] if set(rec["hubs"]) == {a, b})


BAD_SEEDS: list[Any] = [
    pytest.param(lambda d: _hub(d, "gansu").update(id="atlantis"), "transfer: unknown hub 'atlantis'",
                 id="unknown-hub"),
    pytest.param(lambda d: d["hub"].append(dict(_hub(d, "yangtze"))), "transfer: hub 'yangtze' is defined twice",
                 id="duplicate-hub"),
    pytest.param(lambda d: d["hub"].remove(_hub(d, "ningxia")), "transfer: no rate within hubs ningxia",
                 id="hub-missing"),
    pytest.param(lambda d: _hub(d, "yangtze").update(within_gbps=0), r"yangtze within_gbps: 0 is not a number within "
                 r"\(0, 10000\]", id="zero-rate"),
    pytest.param(lambda d: _hub(d, "yangtze").update(within_gbps=True), "yangtze within_gbps: True is not a number",
                 id="boolean-rate"),
    pytest.param(lambda d: _link(d, "yangtze", "gansu").update(gbps=20_000), r"yangtze-gansu gbps: 20000 is not a "
                 r"number within \(0, 10000\]", id="rate-above-range"),
    pytest.param(lambda d: _link(d, "yangtze", "gansu").update(gbps=-5), "yangtze-gansu gbps: -5 is not",
                 id="negative-rate"),
    pytest.param(lambda d: _link(d, "yangtze", "gansu").update(gbps="fast"), "yangtze-gansu gbps: 'fast' is not",
                 id="rate-not-a-number"),
    pytest.param(lambda d: d["link"].remove(_link(d, "gansu", "ningxia")), "transfer: no rate between gansu-ningxia$",
                 id="missing-link"),
    pytest.param(lambda d: d["link"].append(dict(_link(d, "yangtze", "gansu"))),
                 "transfer: the link yangtze-gansu is defined twice", id="duplicate-link"),
    pytest.param(lambda d: _link(d, "yangtze", "gansu").update(hubs=["gansu", "gansu"]),
                 r"a link names two different known hubs, not \['gansu', 'gansu'\]", id="link-to-itself"),
    pytest.param(lambda d: _link(d, "yangtze", "gansu").update(hubs=["gansu", "atlantis"]),
                 "a link names two different known hubs", id="link-to-unknown-hub"),
    pytest.param(lambda d: _link(d, "yangtze", "gansu").update(hubs=7), "a link names two different known hubs, "
                 "not 7", id="link-hubs-not-a-list"),
    pytest.param(lambda d: _hub(d, "gansu").update(egress_cny_per_gb=-0.1),
                 r"transfer: gansu egress_cny_per_gb -0.1 is not within 0..100", id="negative-egress"),
    pytest.param(lambda d: _hub(d, "gansu").update(egress_cny_per_gb=101), "gansu egress_cny_per_gb 101 is not",
                 id="egress-above-range"),
    pytest.param(lambda d: _hub(d, "gansu").update(egress_cny_per_gb=True), "gansu egress_cny_per_gb True is not",
                 id="boolean-egress"),
]  # fmt: skip


@pytest.mark.parametrize(("change", "message"), BAD_SEEDS)
def test_a_bad_transfer_seed_is_refused_with_a_message_naming_what_is_wrong(
    change: Callable[[dict[str, Any]], None], message: str
) -> None:
    """build_transfer refuses unknown and duplicate hubs, missing rates and out-of-range rates and prices."""
    doc = copy.deepcopy(_seed())
    build_transfer(doc, GEO)  # the control: the shipped seed is valid
    change(doc)
    with pytest.raises(ValueError, match=message):
        build_transfer(doc, GEO)


def test_egress_overrides_replace_only_the_named_hubs():
    """with_egress swaps the named hubs' prices and keeps everything else; no overrides is the same model."""
    cheaper = T.with_egress({"gansu": 0.1, "yangtze": 0.2})
    assert (cheaper.egress_cny_per_gb("gansu"), cheaper.egress_cny_per_gb("yangtze")) == (0.1, 0.2)
    assert {h: p for h, p in cheaper.egress.items() if h not in ("gansu", "yangtze")} == {
        h: p for h, p in T.egress.items() if h not in ("gansu", "yangtze")
    }
    assert cheaper.link_gbps == T.link_gbps and cheaper.within_gbps == T.within_gbps
    assert T.egress_cny_per_gb("gansu") != 0.1, "the shipped model is left as it was"
    assert T.with_egress({}) is T


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"atlantis": 0.1}, "unknown hub 'atlantis' in the egress prices; one of jingjinji, yangtze"),
     ({"gansu": -1.0}, "egress price for gansu must be within 0..100 CNY/GB"),
     ({"gansu": 1000.0}, "egress price for gansu must be within 0..100 CNY/GB"),
     ({"gansu": float("nan")}, "egress price for gansu")],
)  # fmt: skip
def test_a_bad_egress_override_is_invalid_input_naming_the_field(overrides: dict[str, float], message: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        T.with_egress(overrides)
    assert caught.value.field == "egress_cny_per_gb"
    assert message in caught.value.message


def test_the_egress_setting_reaches_the_cost_of_a_move():
    """SUANWANG_EGRESS_CNY_PER_GB's pairs, applied to the model, price what moving data out of that hub costs."""
    prices = parse_prices("yangtze=0.2, gansu=0.1", "SUANWANG_EGRESS_CNY_PER_GB")
    assert prices == (("yangtze", 0.2), ("gansu", 0.1))
    snap = snap_of(transfer=T.with_egress(dict(prices)))
    assert moving(job(corpus()), snap, WEST.id)[1] == pytest.approx(TB40 * 0.2)
    with pytest.raises(InvalidInput) as caught:
        parse_prices("yangtze:0.2", "SUANWANG_EGRESS_CNY_PER_GB")
    assert caught.value.field == "SUANWANG_EGRESS_CNY_PER_GB"


@pytest.mark.parametrize(
    ("place", "hub", "nearest"),
    [("shanghai", "yangtze", "yangtze"), ("hangzhou", "yangtze", "yangtze"), ("lanzhou", "gansu", "gansu"),
     ("yangtze", "yangtze", "yangtze"), ("qingyang", "gansu", "gansu"), ("wuhu", "yangtze", "yangtze"),
     ("chongqing", "chengyu", "chengyu"), ("wuhan", None, "yangtze"), ("xian", None, "gansu"),
     ("atlantis", None, None)],
)  # fmt: skip
def test_the_hub_a_place_belongs_to_and_the_hub_its_data_leaves_through(place: str, hub: str | None,
                                                                        nearest: str | None) -> None:  # fmt: skip
    """A hub city's hub (Shanghai is in 长三角), a cluster's, a hub itself; a city outside every hub belongs
    to none but leaves through the hub of its nearest cluster; an unknown name has neither."""
    assert hub_of_place(GEO, place) == hub
    assert nearest_hub(GEO, place) == nearest


# --------------------------------------------------------------------------- where the data is, what moving it takes

LOCAL = None  # the data is already there

PLACES = [
    pytest.param("shanghai", {NEAR.id: LOCAL, WUHU.id: LOCAL, WEST.id: "yangtze", NX.id: "yangtze"},
                 id="hub-city-is-local-to-the-whole-hub"),
    pytest.param("yangtze", {NEAR.id: LOCAL, WUHU.id: LOCAL, WEST.id: "yangtze", NX.id: "yangtze"}, id="hub"),
    pytest.param("wuhu", {NEAR.id: "yangtze", WUHU.id: LOCAL, WEST.id: "yangtze", NX.id: "yangtze"},
                 id="cluster-is-local-to-its-sites-only"),
    pytest.param(f"site:{WUHU.id}", {NEAR.id: "yangtze", WUHU.id: LOCAL, WEST.id: "yangtze", NX.id: "yangtze"},
                 id="site-is-local-to-itself-only"),
    pytest.param("lanzhou", {NEAR.id: "gansu", WUHU.id: "gansu", WEST.id: LOCAL, NX.id: "gansu"},
                 id="western-hub-city"),
    pytest.param("wuhan", {NEAR.id: "yangtze", WUHU.id: "yangtze", WEST.id: "yangtze", NX.id: "yangtze"},
                 id="city-outside-every-hub-is-nowhere-yet"),
]  # fmt: skip


@pytest.mark.parametrize(("location", "expected"), PLACES)
def test_data_is_local_where_it_is_and_moves_at_the_seeded_rate_elsewhere(
    location: str, expected: dict[str, str | None]
) -> None:
    """Local pools take 0 h and ¥0; elsewhere the hours are size*8/rate/3600 over the seeded rate between the
    source's hub and the site's, and the cost is size times the sending hub's egress price."""
    snap, req = snap_of(), job(corpus(location=location))
    plan = DataPlan(req, snap)
    table = snap.tables[MODEL]
    for site, source in expected.items():
        want = (0.0, 0.0, False) if source is LOCAL else seeded(TB40, source, site)
        got = moving(req, snap, site)
        assert got == pytest.approx(want), site
        assert plan.moved_gb(table, table.index[site]) == (0.0 if source is LOCAL else TB40)


def test_datasets_at_one_place_go_one_after_another_and_places_in_parallel():
    """Two halves in Shanghai take as long as the whole; data at two places takes the longer of the two, and
    both are paid for."""
    snap = snap_of()
    halves = job(DataSet("a", TB40 / 2, "shanghai"), DataSet("b", TB40 / 2, "shanghai"))
    assert moving(halves, snap, WEST.id) == pytest.approx(seeded(TB40, "yangtze", WEST.id))
    both = job(corpus(), DataSet("labels", 4000.0, "qingyang"))
    assert DataPlan(both, snap).copyable_gb == TB40 + 4000
    east, west = seeded(TB40, "yangtze", NX.id), seeded(4000.0, "gansu", NX.id)
    assert moving(both, snap, NX.id) == pytest.approx((max(east[0], west[0]), east[1] + west[1], True))
    assert moving(both, snap, WEST.id) == pytest.approx(seeded(TB40, "yangtze", WEST.id))
    assert moving(both, snap, NEAR.id) == pytest.approx(seeded(4000.0, "gansu", NEAR.id))


def test_a_rate_the_site_measured_wins_over_the_seed():
    """A site's measured rate from the data's hub replaces the seeded one for that site only; the egress stays."""
    seed = seeded(TB40, "yangtze", WEST.id)
    snap = snap_of(bandwidth={WEST.id: {"yangtze": 25.0}})
    hours, cost, moves = moving(job(corpus()), snap, WEST.id)
    assert hours == pytest.approx(TB40 * 8 / 25.0 / 3600) and hours != pytest.approx(seed[0])
    assert (cost, moves) == (pytest.approx(seed[1]), True)
    assert moving(job(corpus()), snap, NX.id) == pytest.approx(seeded(TB40, "yangtze", NX.id))


def test_a_rate_measured_from_the_data_s_cluster_wins_over_one_from_its_hub():
    """Data at a cluster moves at the rate measured from that cluster; data at a city of the hub, at the hub's."""
    snap = snap_of(bandwidth={WEST.id: {"yangtze": 25.0, "wuhu": 50.0}})
    assert moving(job(corpus(location="wuhu")), snap, WEST.id)[0] == pytest.approx(TB40 * 8 / 50.0 / 3600)
    assert moving(job(corpus(location=f"site:{WUHU.id}")), snap, WEST.id)[0] == pytest.approx(TB40 * 8 / 50 / 3600)
    assert moving(job(corpus()), snap, WEST.id)[0] == pytest.approx(TB40 * 8 / 25.0 / 3600)


def test_a_rate_measured_from_elsewhere_or_withdrawn_leaves_the_seed():
    """A rate from another hub says nothing about this data; a site that stops publishing its rate falls back."""
    req = job(corpus())
    assert moving(req, snap_of(bandwidth={WEST.id: {"jingjinji": 100.0}}), WEST.id) == pytest.approx(
        seeded(TB40, "yangtze", WEST.id)
    )
    snap = snap_of(bandwidth={WEST.id: {"yangtze": 100.0}})
    assert moving(req, snap, WEST.id)[0] == pytest.approx(TB40 * 8 / 100.0 / 3600)
    snap.apply(record(WEST, meta_version=2))
    assert moving(req, snap, WEST.id) == pytest.approx(seeded(TB40, "yangtze", WEST.id))


# --------------------------------------------------------------------------- data that may not be copied, residency


def test_data_that_may_not_be_copied_keeps_the_job_where_it_is():
    """A non-copyable dataset in Shanghai allows only the Yangtze sites, though the west is cheaper by far."""
    req, snap = job(corpus(200.0, copyable=False), policy="cheapest"), snap_of()
    found = everyone(match(req, snap, exhaustive=True))
    assert set(found) == {NEAR.id, WUHU.id}
    assert decided(match(req, snap)).chosen.site == NEAR.id
    assert all(c.transfer_hours == 0 and c.transfer_cost == 0 for c in found.values())
    at_site = everyone(match(job(corpus(copyable=False, location=f"site:{WUHU.id}")), snap_of(), exhaustive=True))
    assert set(at_site) == {WUHU.id}


def test_a_job_whose_fixed_data_has_no_room_says_the_dataset_may_not_leave():
    """When the sites by the data are full, the explanation names the dataset and where it is held."""
    full = [replace(s, pools=(P(price=s.pools[0].price, allocated=64),)) for s in (NEAR, WUHU)]
    result = match(job(corpus(copyable=False)), snap_of(*full, WEST, NX))
    assert isinstance(result, NoFit)
    assert result.reasons == (("data corpus may not leave shanghai", 2), ("fewer than 8 devices free", 2))


def test_residency_that_excludes_the_data_s_hub_wins_over_data_that_may_not_be_copied():
    """Non-copyable data in Shanghai and a job allowed only in the west fits nowhere, and says both why."""
    req = job(corpus(copyable=False), allow_hubs=frozenset({"gansu", "ningxia"}))
    result = match(req, snap_of())
    assert isinstance(result, NoFit)
    assert result.reasons == (("data corpus may not leave shanghai", 2), ("outside the allowed hubs and provinces", 2))
    assert quote(req, snap_of())["data_gravity"]["text"] == "Nothing fits now, near the data or elsewhere"


def test_residency_sends_copyable_data_out_of_an_excluded_hub_however_dear_the_move():
    """With the data's hub denied, the job never runs there: the data moves west, 40 TB and all."""
    req = job(corpus(), policy="cheapest", deny_hubs=frozenset({"yangtze"}))
    found = everyone(match(req, snap_of(), exhaustive=True))
    assert set(found) == {WEST.id, NX.id}
    assert found[WEST.id].transfer_cost == pytest.approx(TB40 * T.egress_cny_per_gb("yangtze"))


# --------------------------------------------------------------------------- matching weighs the move


@pytest.mark.parametrize("policy", ["cheapest", "balanced"])
@pytest.mark.parametrize("exhaustive", [False, True])
@pytest.mark.parametrize(("size_gb", "winner"), [(TB40, NEAR.id), (200.0, WEST.id)])
def test_the_total_cost_decides_between_running_near_the_data_and_moving_it(
    policy: str, exhaustive: bool, size_gb: float, winner: str
) -> None:
    """The west runs the job for ¥800 against ¥1,600 near the data: worth a 200 GB move, not a 40 TB one."""
    result = match(job(corpus(size_gb), policy=policy), snap_of(), exhaustive=exhaustive)
    assert decided(result).chosen.site == winner


def test_a_candidate_carries_the_transfer_the_finish_and_the_total():
    """Each candidate has its transfer hours and cost, the run's cost, the finish (transfer, then the run) and the
    total; the price score compares totals."""
    found = everyone(match(job(corpus(), policy="cheapest"), snap_of(), exhaustive=True))
    hours, cost, _ = seeded(TB40, "yangtze", WEST.id)
    west, near = found[WEST.id], found[NEAR.id]
    assert (west.transfer_hours, west.transfer_cost) == (pytest.approx(hours), pytest.approx(cost))
    assert (west.est_hours, west.compute_cost) == (10.0, pytest.approx(800.0))
    assert west.finish_hours == pytest.approx(10.0 + hours)
    assert west.total_cost == pytest.approx(800.0 + cost)
    assert (near.transfer_hours, near.transfer_cost, near.total_cost, near.finish_hours) == (0.0, 0.0, 1600.0, 10.0)
    assert west.scores["price"] == pytest.approx(100.0 * 1600.0 / (800.0 + cost))
    offer = west.as_dict()
    assert offer["transfer_hours"] == round(hours, 3) and offer["transfer_cost_cny"] == round(cost, 2)
    assert offer["finish_hours"] == round(10.0 + hours, 3) and offer["total_cost_cny"] == round(800.0 + cost, 2)
    assert offer["compute_cost_cny"] == 800.0


def test_the_speed_score_and_the_finish_include_the_transfer():
    """For the fastest policy a site that must wait hours for the data scores by the run's share of the finish."""
    found = everyone(match(job(corpus(), policy="fastest"), snap_of(), exhaustive=True))
    hours = seeded(TB40, "yangtze", WEST.id)[0]
    assert found[NEAR.id].scores["speed"] == pytest.approx(100.0)
    assert found[WEST.id].scores["speed"] == pytest.approx(100.0 * 10.0 / (10.0 + hours))
    assert decided(match(job(corpus(), policy="fastest"), snap_of())).chosen.hub == "yangtze"
    measured = everyone(match(job(corpus(), policy="fastest"), snap_of(bandwidth={WEST.id: {"yangtze": 400.0}}),
                              exhaustive=True))  # fmt: skip
    assert measured[WEST.id].scores["speed"] == pytest.approx(100.0 * 10.0 / (10.0 + TB40 * 8 / 400 / 3600))


def test_a_job_without_data_moves_nothing():
    """No datasets: no data plan, and every candidate's transfer is nil."""
    found = everyone(match(job(), snap_of(), exhaustive=True))
    assert all(c.transfer_hours == 0 and c.transfer_cost == 0 for c in found.values())
    assert DataPlan.of(job(), snap_of()) is None


# --------------------------------------------------------------------------- quotes: the trade-off in words


def _hours(h: float) -> str:
    return f"{max(h * 60, 1):.0f} min" if h < 1 else f"{h:.1f} h" if h < 10 else f"{h:,.0f} h"


def test_a_quote_weighs_moving_40_tb_west_against_running_near_it():
    """Near: the Shanghai site at ¥1,600; moved: Qingyang at ¥800 plus the move; near is cheaper and sooner."""
    hours, cost, _ = seeded(TB40, "yangtze", WEST.id)
    assert hours < 10, "the text below writes the transfer with one decimal"
    gravity = quote(job(corpus()), snap_of())["data_gravity"]
    assert gravity["data_gb"] == TB40
    assert gravity["near"]["site"] == NEAR.id and gravity["near"]["transfer_hours"] == 0
    assert gravity["moved"]["site"] == WEST.id
    assert gravity["moved"]["transfer_hours"] == pytest.approx(hours, abs=1e-3)
    assert gravity["moved"]["total_cost_cny"] == pytest.approx(800 + cost)
    assert gravity["places"] == {"near": "上海/Shanghai", "moved": "庆阳/Qingyang"}
    assert (gravity["cheaper"], gravity["sooner"]) == ("near", "near")
    assert gravity["text"] == (f"Run in 上海/Shanghai now at ¥1,600 (finish in 10 h), or move the 40 TB to "
                               f"庆阳/Qingyang (about {hours:.1f} h of transfer, ¥{cost:,.0f}) and finish in "
                               f"{_hours(10 + hours)} at ¥{800 + cost:,.0f} in all")  # fmt: skip


def test_a_small_dataset_flips_the_quote_to_moving_it():
    """200 GB costs little to move: moving is cheaper, though running near the data still finishes sooner."""
    hours, cost, _ = seeded(200.0, "yangtze", WEST.id)
    body = quote(job(corpus(200.0)), snap_of())
    gravity = body["data_gravity"]
    assert body["candidates"][0]["site"] == WEST.id
    assert (gravity["cheaper"], gravity["sooner"]) == ("moved", "near")
    assert f"move the 200 GB to 庆阳/Qingyang (about {_hours(hours)} of transfer, ¥{cost:,.0f})" in gravity["text"]
    assert gravity["text"].endswith(f"at ¥{800 + cost:,.0f} in all")


def test_a_quote_for_data_that_may_not_be_copied_has_only_the_near_option():
    """Nothing moves: no moved option, and the sentence says why; letting the data be copied is a what-if."""
    for datasets in ((corpus(200.0, copyable=False),),
                     (corpus(200.0, copyable=False), DataSet("extra", 50.0, "shanghai"))):  # fmt: skip
        body = quote(job(*datasets, policy="cheapest"), snap_of())
        gravity = body["data_gravity"]
        assert gravity["moved"] is None and gravity["places"]["moved"] is None
        assert gravity["near"]["site"] == NEAR.id
        assert "cheaper" not in gravity and "sooner" not in gravity
        assert gravity["text"] == "Run in 上海/Shanghai now at ¥1,600 (finish in 10 h) (the data may not be copied)"
        copied = next(w for w in body["what_if"] if w["change"] == "data may be copied")
        assert copied["best"]["site"] == WEST.id and copied["cheaper_pct"] > 0


def test_a_quote_where_nothing_fits_by_the_data_offers_the_move():
    """The data's hub is full: the only option moves the data, and the sentence starts by saying so."""
    full = [replace(s, pools=(P(price=s.pools[0].price, allocated=64),)) for s in (NEAR, WUHU)]
    gravity = quote(job(corpus(999.9)), snap_of(*full, WEST, NX))["data_gravity"]
    assert gravity["near"] is None and gravity["moved"]["site"] == WEST.id
    assert gravity["text"].startswith("Nothing fits where the data is: move the 1 TB to 庆阳/Qingyang (about ")
    assert "data_gravity" not in quote(job(), snap_of())
