"""Round-trip latency estimates between an origin and a cluster.

Sites rarely publish measurements for every origin, so the broker needs a model that is good enough to
rank sites and apply a job's max_latency_ms. The defaults are calibrated against the published targets
of the national compute network (news reports on the "1-5-20 ms latency circles"): within a city 1 ms,
within a province 5 ms, between hub nodes 20 ms. With a 1.5 route factor and 200 km/ms in fibre, a
round trip costs 1.5 ms per 100 km plus 1 ms of switching: Beijing-Zhangjiakou ~3 ms, a 250 km provincial
span ~5 ms, Beijing-Shanghai ~17 ms; very long diagonals (Zhangjiakou-Shaoguan) exceed 20 ms, which
matches reality for routes that are not direct backbone links.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from regions.geo import Geography

EARTH_RADIUS_KM = 6371.0088  # IUGG mean radius


def great_circle_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Haversine distance; numerically stable for the short hops (same city) that matter most."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    h = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(h)))


@dataclass(frozen=True)
class LatencyModel:
    fibre_factor: float = 1.5  # fibre routes are longer than the great circle
    km_per_ms: float = 200.0  # light in fibre, one way
    base_ms: float = 1.0  # switching and last mile, per round trip

    def estimate_ms(self, a: tuple[float, float], b: tuple[float, float]) -> float:
        """Round trip between two (lat, lon) points."""
        km = great_circle_km(a[0], a[1], b[0], b[1])
        return 2 * km * self.fibre_factor / self.km_per_ms + self.base_ms

    def rtt_ms(
        self,
        origin: str,
        cluster: str,
        geo: Geography,
        measured: Mapping[str, float] | None = None,
    ) -> float | None:
        """Round trip from origin to a cluster, preferring the site's measurement for that origin.

        Returns None for an unknown origin or cluster so callers can decide whether that is an error
        (a job's origin) or just "no latency constraint can be checked".
        """
        if measured is not None and origin in measured:
            return float(measured[origin])
        here = geo.place(origin)
        # Not geo.place(cluster): a cluster id may also be a city id ("chongqing").
        there = geo.clusters.get(cluster)
        if here is None or there is None:
            return None
        return self.estimate_ms(here, (there.lat, there.lon))
