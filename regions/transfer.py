"""Moving data between hubs: the sustained rate a bulk copy gets and what sending it costs.

The east-west trade-off (东数西算) is compute that is cheap in the west against data that sits in the
east: moving 40 TB from Shanghai to Qingyang takes hours and costs egress. The seed (`transfer.toml`)
holds an effective rate in Gbps for every pair of hubs and within each hub, and an egress price per GB
per hub (the sending hub's); both are estimates, and sites may publish measured rates that win over
them. Pure and cached, like the geography.
"""

from __future__ import annotations

import functools
import itertools
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import seeds
from common.errors import InvalidInput
from regions.geo import Geography, load_geography
from regions.latency import great_circle_km

MAX_GBPS = 10_000.0  # a rate above this is a typo (one 400G wave is 400)
MAX_EGRESS_CNY_PER_GB = 100.0
SECONDS_PER_HOUR = 3600.0


def transfer_hours(size_gb: float, gbps: float) -> float:
    """Hours to move `size_gb` (decimal GB, 8 Gb each) at `gbps`."""
    return size_gb * 8.0 / gbps / SECONDS_PER_HOUR


@dataclass(frozen=True, eq=False)
class TransferModel:
    """Rates between hubs (Gbps, symmetric, with each hub's own rate within it) and egress per GB per hub."""

    within_gbps: Mapping[str, float]
    link_gbps: Mapping[frozenset[str], float]
    egress: Mapping[str, float]

    @property
    def slowest_gbps(self) -> float:
        """The lowest seeded rate: what a copy from or to an unknown place is assumed to get."""
        return min(*self.within_gbps.values(), *self.link_gbps.values())

    def gbps(self, source_hub: str, dest_hub: str) -> float:
        """The seeded rate from one hub to another (or within one); the slowest rate for an unknown hub."""
        if source_hub == dest_hub and source_hub in self.within_gbps:
            return self.within_gbps[source_hub]
        return self.link_gbps.get(frozenset((source_hub, dest_hub)), self.slowest_gbps)

    def egress_cny_per_gb(self, hub: str) -> float:
        """What sending one GB out of `hub` costs; the dearest hub's price for an unknown one."""
        found = self.egress.get(hub)
        return found if found is not None else max(self.egress.values())

    def with_egress(self, overrides: Mapping[str, float]) -> TransferModel:
        """The same rates with some hubs' egress prices replaced (configuration); unknown hubs are an error."""
        if not overrides:
            return self
        for hub, price in overrides.items():
            if hub not in self.egress:
                raise InvalidInput(f"unknown hub {hub!r} in the egress prices; one of {', '.join(self.egress)}",
                                   "egress_cny_per_gb")  # fmt: skip
            if not 0.0 <= price <= MAX_EGRESS_CNY_PER_GB:
                raise InvalidInput(f"egress price for {hub} must be within 0..{MAX_EGRESS_CNY_PER_GB:g} CNY/GB",
                                   "egress_cny_per_gb")  # fmt: skip
        return TransferModel(self.within_gbps, self.link_gbps, MappingProxyType({**self.egress, **overrides}))


def hub_of_place(geo: Geography, name: str) -> str | None:
    """The hub a place belongs to: a hub itself, a cluster's hub, or the hub whose provinces hold a city;
    None for a city outside every hub (and for an unknown name)."""
    if name in geo.hubs:
        return name
    if name in geo.cities:  # cities first, as for origins ("chongqing" is a city and a cluster)
        province = geo.cities[name].province.lower()
        return next((h.id for h in geo.hubs.values() if province in (p.lower() for p in h.provinces)), None)
    if name in geo.clusters:
        return geo.clusters[name].hub
    return None


def nearest_hub(geo: Geography, name: str) -> str | None:
    """The hub of the cluster nearest to a place (the hub its data leaves through); None for an unknown name."""
    if (hub := hub_of_place(geo, name)) is not None:
        return hub
    where = geo.place(name)
    if where is None:
        return None
    nearest = min(geo.clusters.values(), key=lambda c: great_circle_km(where[0], where[1], c.lat, c.lon))
    return nearest.hub


def _positive(what: str, value: Any, most: float) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < float(value) <= most:
        raise ValueError(f"{what}: {value!r} is not a number within (0, {most:g}]")
    return float(value)


def build_transfer(doc: Mapping[str, Any], geo: Geography) -> TransferModel:
    """Validate a parsed `transfer.toml`: every hub once, every pair of hubs once, rates and prices in range."""
    within: dict[str, float] = {}
    egress: dict[str, float] = {}
    for rec in doc.get("hub", []):
        hub = rec.get("id")
        if not isinstance(hub, str) or hub not in geo.hubs:
            raise ValueError(f"transfer: unknown hub {hub!r}")
        if hub in within:
            raise ValueError(f"transfer: hub {hub!r} is defined twice")
        within[hub] = _positive(f"transfer: {hub} within_gbps", rec.get("within_gbps"), MAX_GBPS)
        price = rec.get("egress_cny_per_gb")
        if not isinstance(price, int | float) or isinstance(price, bool) or not 0 <= price <= MAX_EGRESS_CNY_PER_GB:
            raise ValueError(f"transfer: {hub} egress_cny_per_gb {price!r} is not within 0..{MAX_EGRESS_CNY_PER_GB:g}")
        egress[hub] = float(price)
    if missing := set(geo.hubs) - set(within):
        raise ValueError(f"transfer: no rate within hubs {', '.join(sorted(missing))}")
    links: dict[frozenset[str], float] = {}
    for rec in doc.get("link", []):
        pair = rec.get("hubs", [])
        known = isinstance(pair, list) and all(isinstance(h, str) and h in geo.hubs for h in pair)
        if not known or len(pair) != 2 or len(set(pair)) != 2:
            raise ValueError(f"transfer: a link names two different known hubs, not {pair!r}")
        key = frozenset(pair)
        if key in links:
            raise ValueError(f"transfer: the link {'-'.join(pair)} is defined twice")
        links[key] = _positive(f"transfer: {'-'.join(pair)} gbps", rec.get("gbps"), MAX_GBPS)
    absent = [f"{a}-{b}" for a, b in itertools.combinations(sorted(geo.hubs), 2) if frozenset((a, b)) not in links]
    if absent:
        raise ValueError(f"transfer: no rate between {', '.join(absent)}")
    return TransferModel(MappingProxyType(within), MappingProxyType(links), MappingProxyType(egress))


@functools.cache
def load_transfer() -> TransferModel:
    """The shipped transfer model, parsed once per process."""
    with seeds.path("transfer.toml").open("rb") as fh:
        return build_transfer(tomllib.load(fh), load_geography())
