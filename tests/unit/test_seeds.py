"""Seed data: the shipped hubs, cities, device catalog and demo fleet are complete, consistent and sourced."""

from __future__ import annotations

import re
import tomllib
from collections import Counter

import pytest

import seeds
from regions import load_devices, load_fleet, load_geography
from regions.catalog import POOL_KEYS, build_devices, build_fleet
from regions.geo import build_geography

HUB_CLUSTERS = {
    "jingjinji": {"zhangjiakou"},
    "yangtze": {"yangtze-demo", "wuhu"},
    "guangdong": {"shaoguan"},
    "chengyu": {"tianfu", "chongqing"},
    "neimenggu": {"horinger"},
    "guizhou": {"guian"},
    "gansu": {"qingyang"},
    "ningxia": {"zhongwei"},
}
WESTERN = {"neimenggu", "guizhou", "gansu", "ningxia"}
EASTERN = {"jingjinji", "yangtze", "guangdong"}
CITIES = (
    "beijing shanghai guangzhou shenzhen hangzhou chengdu chongqing wuhan xian tianjin nanjing suzhou hefei "
    "changsha zhengzhou jinan qingdao shenyang harbin kunming guiyang lanzhou yinchuan hohhot urumqi lhasa"
).split()

# (model, arch) for every chip family DOMAIN.md names.
FAMILIES = [
    ("A100-40G", "GPU"),
    ("A100-80G", "GPU"),
    ("H100", "GPU"),
    ("H800", "GPU"),
    ("A800", "GPU"),
    ("H200", "GPU"),
    ("B200", "GPU"),
    ("GB200", "GPU"),
    ("L20", "GPU"),
    ("RTX-4090", "GPU"),
    ("T4", "GPU"),
    ("Ascend-910B", "ASIC"),
    ("Ascend-310P", "ASIC"),
    ("Hygon-DCU-Z100", "GPU"),
    ("Hygon-DCU-K100", "GPU"),
    ("MLU370-X8", "ASIC"),
    ("MLU590", "ASIC"),
    ("Kunlun-R200", "ASIC"),
    ("Kunlun-P800", "ASIC"),
    ("Hanguang-800", "ASIC"),
    ("Enflame-T20", "ASIC"),
    ("Enflame-i20", "ASIC"),
    ("Iluvatar-MR-V100", "GPU"),
    ("Iluvatar-BI-V150", "GPU"),
    ("MTT-S4000", "GPU"),
    ("Sophgo-SC7", "ASIC"),
    ("Biren-BR104", "GPU"),
    ("Horizon-Journey-5", "ASIC"),
    ("TPU-v5e", "ASIC"),
    ("Xeon-8480", "CPU"),
    ("EPYC-9654", "CPU"),
    ("Kunpeng-920", "CPU"),
    ("Hygon-C86-7390", "CPU"),
    ("Phytium-S2500", "CPU"),
    ("Loongson-3C5000", "CPU"),
    ("Xilinx-Alveo-U250", "FPGA"),
    ("Intel-Agilex-7", "FPGA"),
]


def _raw(name: str) -> dict:
    with seeds.path(name).open("rb") as fh:
        return tomllib.load(fh)


def _source_ids() -> set[str]:
    ids = set()
    for line in seeds.path("SOURCES.md").read_text(encoding="utf-8").splitlines():
        m = re.match(r"^\|\s*`?([a-z0-9][a-z0-9-]*)`?\s*\|", line)
        if m and m.group(1) != "id":
            ids.add(m.group(1))
    return ids


def test_hubs_and_clusters_have_the_exact_ids_and_membership():
    """The 8 hubs and 10 clusters use the agreed ids and each cluster sits in its hub."""
    geo = load_geography()
    assert {h: set(hub.clusters) for h, hub in geo.hubs.items()} == HUB_CLUSTERS
    assert len(geo.clusters) == 10
    assert all(geo.hub_of(c).id == h for h, cs in HUB_CLUSTERS.items() for c in cs)


def test_hub_sides_and_demand_flags():
    """Western supply hubs are side west and not demand hubs; chengyu is a western demand hub."""
    hubs = load_geography().hubs
    assert {h for h, hub in hubs.items() if hub.side == "east"} == EASTERN
    assert all(hubs[h].side == "west" and not hubs[h].demand_hub for h in WESTERN)
    assert hubs["chengyu"].side == "west" and hubs["chengyu"].demand_hub


def test_required_cities_present():
    """Every origin city the brief requires is defined."""
    assert set(CITIES) <= set(load_geography().cities)


@pytest.mark.parametrize(("model", "arch"), FAMILIES)
def test_chip_family_in_catalog_with_arch(model: str, arch: str):
    """Each chip family named in DOMAIN.md is in the catalog with the right architecture."""
    device = load_devices()[model]
    assert device.arch == arch
    assert device.memory_gb >= 0 and device.per_node >= 1 and device.price_cny_per_hour > 0


def test_catalog_reference_and_availability():
    """A100-80G is the perf reference and the TPU is marked unavailable in China."""
    devices = load_devices()
    assert devices["A100-80G"].perf_training == devices["A100-80G"].perf_inference == 1.0
    assert devices["TPU-v5e"].available_in_china is False
    assert devices["Ascend-910B"].domestic and not devices["A800"].domestic
    assert 0.6 <= devices["Ascend-910B"].perf_inference <= 0.7


def test_fleet_size_and_spread():
    """At least 48 sites, every hub at least 4 and every cluster at least 2."""
    fleet = load_fleet()
    assert len(fleet) >= 48
    per_hub = Counter(s.hub for s in fleet)
    per_cluster = Counter(s.cluster for s in fleet)
    assert all(per_hub[h] >= 4 for h in HUB_CLUSTERS)
    assert all(per_cluster[c] >= 2 for cs in HUB_CLUSTERS.values() for c in cs)


def test_fleet_pools_are_complete_and_consistent():
    """Every pool has exactly the capacity-message keys, a catalog model and external use within total."""
    geo, devices = load_geography(), load_devices()
    for site in load_fleet():
        assert geo.clusters[site.cluster].hub == site.hub
        assert any(p["arch"] == "CPU" for p in site.pools), site.id
        for pool in site.pools:
            assert tuple(pool) == POOL_KEYS
            assert pool["model"] in devices
            assert devices[str(pool["model"])].available_in_china
            assert 0 <= pool["in_use_external"] <= pool["total"]  # type: ignore[operator]
    assert any(p["arch"] == "FPGA" for s in load_fleet() for p in s.pools)


def test_fleet_pools_validate_as_capacity_messages():
    """Pools can be sent as-is in a suanwang.capacity/1 message."""
    from common import protocol
    from common.validation import parse

    for seq, site in enumerate(load_fleet()):
        msg = {
            "schema": protocol.CAPACITY_SCHEMA,
            "site": site.id,
            "hub": site.hub,
            "cluster": site.cluster,
            "seq": seq,
            "pools": site.capacity_pools(),
            "energy": dict(site.energy),
        }
        parse(protocol.Capacity, msg)


def _price_per_a100(hubs: set[str]) -> float:
    """Capacity-weighted CNY per A100-equivalent hour over GPU/ASIC pools that can train."""
    devices = load_devices()
    cost = perf = 0.0
    for site in load_fleet():
        if site.hub not in hubs:
            continue
        for pool in site.capacity_pools():
            device = devices[str(pool["model"])]
            total, price = pool["total"], pool["price_cny_per_hour"]
            assert isinstance(total, int) and isinstance(price, float)
            if device.arch in ("GPU", "ASIC") and device.perf_training > 0:
                cost += price * total
                perf += device.perf_training * total
    return cost / perf


def test_west_is_cheaper_and_greener_than_east():
    """Western hubs sell an A100-equivalent hour for less and run on greener power than eastern hubs."""
    hubs = load_geography().hubs
    assert _price_per_a100(WESTERN) < _price_per_a100(EASTERN)
    west_green = sum(hubs[h].green_share for h in WESTERN) / len(WESTERN)
    east_green = sum(hubs[h].green_share for h in EASTERN) / len(EASTERN)
    assert west_green > east_green
    assert max(hubs[h].tariff_cny_per_kwh for h in WESTERN) < min(hubs[h].tariff_cny_per_kwh for h in EASTERN)


@pytest.mark.parametrize(
    ("file", "table"),
    [
        ("hubs.toml", "hub"),
        ("hubs.toml", "cluster"),
        ("cities.toml", "city"),
        ("devices.toml", "device"),
        ("fleet.toml", "site"),
        ("transfer.toml", "hub"),
        ("transfer.toml", "link"),
    ],
)
def test_every_record_cites_defined_sources(file: str, table: str):
    """Every seed record names at least one source id, and every id is defined in SOURCES.md."""
    known = _source_ids()
    records = _raw(file)[table]
    assert records
    for rec in records:
        cited = [rec["source"]] if "source" in rec else list(rec.get("sources", []))
        assert cited, f"{file}: {rec.get('id', rec.get('model'))} has no source"
        assert set(cited) <= known, f"{file}: {rec.get('id', rec.get('model'))} cites {set(cited) - known}"


def _hubs_doc() -> dict:
    return {
        "hub": [
            {
                "id": "h",
                "name_zh": "枢纽",
                "name_en": "H",
                "side": "west",
                "provinces": ["P"],
                "tariff_cny_per_kwh": 0.3,
                "pue": 1.2,
                "green_share": 0.5,
            }
        ],
        "cluster": [
            {
                "id": "c",
                "hub": "h",
                "name_zh": "集群",
                "name_en": "C",
                "province": "P",
                "lat": 30.0,
                "lon": 110.0,
            }
        ],
    }


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("cluster", "hub"), "nope", "unknown hub"),
        (("cluster", "lat"), 110.0, "bounding box"),
        (("hub", "side"), "north", "side must be"),
        (("cluster", "id"), None, "missing field"),
    ],
)
def test_geography_validation_rejects_bad_seeds(path: tuple[str, str], value: object, message: str):
    """Inconsistent hub/cluster seeds raise ValueError naming the problem."""
    doc = _hubs_doc()
    if value is None:
        del doc[path[0]][0][path[1]]
    else:
        doc[path[0]][0][path[1]] = value
    with pytest.raises(ValueError, match=message):
        build_geography(doc, {"city": []})


def test_hub_without_cluster_is_rejected():
    """A hub with no cluster cannot be placed, so loading fails."""
    doc = _hubs_doc()
    doc["cluster"] = []
    with pytest.raises(ValueError, match="has no cluster"):
        build_geography(doc, {"city": []})


@pytest.mark.parametrize(
    ("site", "message"),
    [
        ({"hub": "guizhou", "cluster": "zhongwei"}, "belongs to"),
        ({"pools": [{"model": "No-Such-Chip", "total": 8}]}, "not in the device catalog"),
        ({"pools": [{"model": "Ascend-910B", "total": 8, "in_use_external": 9}]}, "exceeds total"),
        ({"pools": [{"model": "Ascend-910B", "total": 8, "color": "red"}]}, "unknown keys"),
        ({"id": "Bad Id"}, "does not match"),
    ],
)
def test_fleet_validation_rejects_bad_sites(site: dict, message: str):
    """Fleet entries with a wrong cluster, unknown model or over-used pool raise ValueError."""
    rec = {
        "id": "guian-99",
        "hub": "guizhou",
        "cluster": "guian",
        "pools": [{"model": "Ascend-910B", "total": 8}],
    }
    rec.update(site)
    with pytest.raises(ValueError, match=message):
        build_fleet({"site": [rec]}, load_devices(), load_geography())


def test_fleet_defaults_come_from_catalog_and_hub():
    """Omitted pool fields and energy take the catalog's and the hub's values."""
    rec = {
        "id": "guian-99",
        "hub": "guizhou",
        "cluster": "guian",
        "pools": [{"model": "Ascend-910B", "total": 16}],
    }
    (site,) = build_fleet({"site": [rec]}, load_devices(), load_geography())
    pool = site.pools[0]
    assert pool["stacks"] == ["cann-8.0"] and pool["interconnect"] == "hccs" and pool["in_use_external"] == 0
    assert pool["price_cny_per_hour"] == load_devices()["Ascend-910B"].price_cny_per_hour
    assert site.energy["pue"] == load_geography().hubs["guizhou"].pue


def test_device_validation_rejects_bad_model_names():
    """A model name outside the wire-format regex is refused at load time."""
    with pytest.raises(ValueError, match="does not match"):
        build_devices({"device": [{"model": "A100 80G", "arch": "GPU"}]})
