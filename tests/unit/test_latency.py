"""Latency model: haversine distances, calibrated round-trip estimates, overrides and origin resolution."""

from __future__ import annotations

import pytest

from regions import LatencyModel, great_circle_km, load_geography

BEIJING = (39.90, 116.41)
SHANGHAI = (31.23, 121.47)
GUANGZHOU = (23.13, 113.26)


@pytest.mark.parametrize(
    ("a", "b", "km"),
    [(BEIJING, SHANGHAI, 1068.0), (BEIJING, GUANGZHOU, 1888.0), (SHANGHAI, GUANGZHOU, 1213.0)],
)
def test_great_circle_matches_known_distances(a, b, km):
    """Haversine distances between major cities are within 2% of published values."""
    assert great_circle_km(*a, *b) == pytest.approx(km, rel=0.02)
    assert great_circle_km(*a, *b) == pytest.approx(great_circle_km(*b, *a))


def test_great_circle_of_a_point_with_itself_is_zero():
    """Zero distance for identical points (no NaN from rounding)."""
    assert great_circle_km(*BEIJING, *BEIJING) == 0.0


@pytest.mark.parametrize(
    ("origin", "cluster", "low", "high"),
    [
        ("beijing", "zhangjiakou", 1.0, 5.0),
        ("shanghai", "yangtze-demo", 1.0, 3.0),
        ("shanghai", "guian", 15.0, 35.0),
        ("guangzhou", "shaoguan", 1.0, 5.0),
        ("chengdu", "tianfu", 1.0, 3.0),
        ("chongqing", "chongqing", 1.0, 3.0),
    ],
)
def test_rtt_estimates_fall_in_expected_ranges(origin, cluster, low, high):
    """Modelled round trips match intuition and the published 1/5/20 ms targets."""
    rtt = LatencyModel().rtt_ms(origin, cluster, load_geography())
    assert rtt is not None and low <= rtt <= high


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("zhangjiakou", "yangtze-demo"),
        ("yangtze-demo", "shaoguan"),
        ("tianfu", "guian"),
        ("zhongwei", "qingyang"),
    ],
)
def test_neighbouring_hubs_are_within_20_ms(a, b):
    """Hub-to-hub round trips between neighbouring clusters stay within the 20 ms target."""
    geo = load_geography()
    assert LatencyModel().estimate_ms(geo.place(a), geo.place(b)) <= 20.0  # type: ignore[arg-type]


def test_same_point_costs_only_the_base():
    """Zero distance costs exactly base_ms."""
    assert LatencyModel(base_ms=1.5).estimate_ms(BEIJING, BEIJING) == 1.5


def test_measured_value_overrides_the_model():
    """A site's measured round trip for the origin wins over the estimate."""
    geo = load_geography()
    assert LatencyModel().rtt_ms("shanghai", "guian", geo, {"shanghai": 42.0, "beijing": 1.0}) == 42.0
    assert LatencyModel().rtt_ms("shanghai", "guian", geo, {"beijing": 1.0}) != 1.0


@pytest.mark.parametrize(("origin", "cluster"), [("atlantis", "guian"), ("shanghai", "no-such-cluster")])
def test_unknown_names_give_none(origin, cluster):
    """Unknown origin or cluster yields None rather than a guess."""
    assert LatencyModel().rtt_ms(origin, cluster, load_geography()) is None


def test_place_prefers_city_then_cluster_then_hub():
    """place() resolves a city id before a cluster id, and a hub via its first cluster."""
    geo = load_geography()
    city, cluster = geo.cities["chongqing"], geo.clusters["chongqing"]
    assert (city.lat, city.lon) != (cluster.lat, cluster.lon)
    assert geo.place("chongqing") == (city.lat, city.lon)
    assert geo.place("guian") == (geo.clusters["guian"].lat, geo.clusters["guian"].lon)
    first = geo.clusters[geo.hubs["yangtze"].clusters[0]]
    assert geo.place("yangtze") == (first.lat, first.lon)
    assert geo.place("atlantis") is None


@pytest.mark.parametrize(("name", "known"), [("beijing", True), ("wuhu", True), ("gansu", True), ("mars", False)])
def test_is_origin_accepts_cities_clusters_and_hubs(name, known):
    """Any city, cluster or hub id is a valid job origin."""
    assert load_geography().is_origin(name) is known


def test_rtt_to_a_cluster_uses_cluster_coordinates_even_when_a_city_shares_the_id():
    """The chongqing cluster is measured at the cluster, not at the city of the same name."""
    geo = load_geography()
    model = LatencyModel()
    c, chengdu = geo.clusters["chongqing"], geo.cities["chengdu"]
    expected = model.estimate_ms((chengdu.lat, chengdu.lon), (c.lat, c.lon))
    assert model.rtt_ms("chengdu", "chongqing", geo) == pytest.approx(expected)


def test_hub_of_unknown_cluster_raises_key_error():
    """hub_of names the unknown cluster."""
    with pytest.raises(KeyError, match="atlantis"):
        load_geography().hub_of("atlantis")
