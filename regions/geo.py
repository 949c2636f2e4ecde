"""Where things are: the 8 national hubs, their 10 clusters and the cities jobs come from.

The broker needs coordinates for every name a user may give as a job's origin (a city, or a cluster or
hub when the data already sits there), so all three live in one Geography with one resolver. The seed
files are validated on load because a typo in a hub id would otherwise surface much later as a site
that silently never matches.
"""

from __future__ import annotations

import functools
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import seeds

# Generous bounding box of China (incl. Hong Kong/Macao): catches swapped lat/lon and sign errors.
LAT_RANGE = (18.0, 54.0)
LON_RANGE = (73.0, 135.5)
SIDES = ("east", "west")


@dataclass(frozen=True)
class Hub:
    id: str
    name_zh: str
    name_en: str
    side: str
    provinces: tuple[str, ...]
    clusters: tuple[str, ...]
    tariff_cny_per_kwh: float
    pue: float
    green_share: float
    demand_hub: bool


@dataclass(frozen=True)
class Cluster:
    id: str
    hub: str
    name_zh: str
    name_en: str
    lat: float
    lon: float
    province: str


@dataclass(frozen=True)
class City:
    id: str
    name_zh: str
    name_en: str
    lat: float
    lon: float
    province: str


@dataclass(frozen=True, eq=False)
class Geography:
    """Read-only view of hubs, clusters and cities; eq=False keeps it hashable by identity."""

    hubs: Mapping[str, Hub]
    clusters: Mapping[str, Cluster]
    cities: Mapping[str, City]

    def place(self, name: str) -> tuple[float, float] | None:
        """Coordinates of an origin name.

        Cities win over clusters because users mostly name where they are ("chongqing" the city, not
        the Liangjiang cluster); a hub stands for its first cluster since hubs have no single location.
        """
        if (city := self.cities.get(name)) is not None:
            return (city.lat, city.lon)
        if (cluster := self.clusters.get(name)) is not None:
            return (cluster.lat, cluster.lon)
        if (hub := self.hubs.get(name)) is not None:
            first = self.clusters[hub.clusters[0]]
            return (first.lat, first.lon)
        return None

    def is_origin(self, name: str) -> bool:
        return name in self.cities or name in self.clusters or name in self.hubs

    def hub_of(self, cluster_id: str) -> Hub:
        """The hub a cluster belongs to; KeyError names the cluster so a bad site message is traceable."""
        try:
            return self.hubs[self.clusters[cluster_id].hub]
        except KeyError:
            raise KeyError(f"unknown cluster {cluster_id!r}") from None


def _check_coords(kind: str, ident: str, lat: float, lon: float) -> None:
    if not (LAT_RANGE[0] <= lat <= LAT_RANGE[1] and LON_RANGE[0] <= lon <= LON_RANGE[1]):
        raise ValueError(f"{kind} {ident!r}: coordinates ({lat}, {lon}) are outside China's bounding box")


def _unique(kind: str, records: list[dict[str, Any]]) -> None:
    seen: set[str] = set()
    for rec in records:
        if rec["id"] in seen:
            raise ValueError(f"{kind} {rec['id']!r} is defined twice")
        seen.add(rec["id"])


def build_geography(hubs_doc: Mapping[str, Any], cities_doc: Mapping[str, Any]) -> Geography:
    """Validate parsed seed documents; kept apart from file I/O so tests can feed bad data."""
    try:
        hub_recs: list[dict[str, Any]] = list(hubs_doc.get("hub", []))
        cluster_recs: list[dict[str, Any]] = list(hubs_doc.get("cluster", []))
        city_recs: list[dict[str, Any]] = list(cities_doc.get("city", []))
        for kind, recs in (("hub", hub_recs), ("cluster", cluster_recs), ("city", city_recs)):
            _unique(kind, recs)

        hub_ids = {h["id"] for h in hub_recs}
        members: dict[str, list[str]] = {h: [] for h in hub_ids}
        clusters: dict[str, Cluster] = {}
        for rec in cluster_recs:
            if rec["hub"] not in hub_ids:
                raise ValueError(f"cluster {rec['id']!r} names unknown hub {rec['hub']!r}")
            _check_coords("cluster", rec["id"], rec["lat"], rec["lon"])
            members[rec["hub"]].append(rec["id"])
            clusters[rec["id"]] = Cluster(
                id=rec["id"],
                hub=rec["hub"],
                name_zh=rec["name_zh"],
                name_en=rec["name_en"],
                lat=float(rec["lat"]),
                lon=float(rec["lon"]),
                province=rec["province"],
            )

        hubs: dict[str, Hub] = {}
        for rec in hub_recs:
            if not members[rec["id"]]:
                raise ValueError(f"hub {rec['id']!r} has no cluster")
            if rec["side"] not in SIDES:
                raise ValueError(f"hub {rec['id']!r}: side must be one of {SIDES}, not {rec['side']!r}")
            if not 0.0 <= rec["green_share"] <= 1.0:
                raise ValueError(f"hub {rec['id']!r}: green_share {rec['green_share']} is not within 0..1")
            if not 1.0 <= rec["pue"] <= 3.0:
                raise ValueError(f"hub {rec['id']!r}: pue {rec['pue']} is not within 1..3")
            hubs[rec["id"]] = Hub(
                id=rec["id"],
                name_zh=rec["name_zh"],
                name_en=rec["name_en"],
                side=rec["side"],
                provinces=tuple(rec["provinces"]),
                clusters=tuple(members[rec["id"]]),
                tariff_cny_per_kwh=float(rec["tariff_cny_per_kwh"]),
                pue=float(rec["pue"]),
                green_share=float(rec["green_share"]),
                demand_hub=bool(rec.get("demand_hub", False)),
            )

        cities: dict[str, City] = {}
        for rec in city_recs:
            _check_coords("city", rec["id"], rec["lat"], rec["lon"])
            cities[rec["id"]] = City(
                id=rec["id"],
                name_zh=rec["name_zh"],
                name_en=rec["name_en"],
                lat=float(rec["lat"]),
                lon=float(rec["lon"]),
                province=rec["province"],
            )
    except KeyError as exc:
        raise ValueError(f"seed record is missing field {exc.args[0]!r}") from None
    return Geography(MappingProxyType(hubs), MappingProxyType(clusters), MappingProxyType(cities))


def _read(name: str) -> dict[str, Any]:
    with seeds.path(name).open("rb") as fh:
        return tomllib.load(fh)


@functools.cache
def load_geography() -> Geography:
    """The shipped geography, parsed once per process (it is immutable and read on every match)."""
    return build_geography(_read("hubs.toml"), _read("cities.toml"))
