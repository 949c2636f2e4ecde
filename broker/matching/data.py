"""Data gravity: the hours and CNY it takes to bring a job's data to each pool, and where data that may not
be copied keeps the job. Pure, like the rest of the matcher.

Where data counts as already there (nothing to move):
- data at a site (`site:<id>`) is there only at that site;
- data at a cluster is there at every site of the cluster;
- data at a hub, or at a city of a hub's provinces (Shanghai: 长三角), is there at every site of the hub;
- data at a city outside every hub (Wuhan, Xi'an) is nowhere yet: it leaves through the hub of its
  nearest cluster.

Anywhere else the data is moved: over the seeded rate between the source's hub and the site's (within
one hub: the hub's own rate), or the rate the site measured from the source's cluster or hub, which wins;
the sending hub's egress price per GB. Datasets at the same place go one after the other over one link;
datasets at different places travel at once, so a pool's transfer time is the longest place's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from broker.matching.request import DataSet, Request
from broker.matching.snapshot import UNKNOWN_PLACE, PoolTable, Snapshot
from regions import hub_of_place, nearest_hub, transfer_hours

SITE_PREFIX = "site:"


@dataclass
class _Source:
    """The datasets at one place: what must be moved from it (GB), where it is already there."""

    location: str
    hub: str  # the hub its data leaves through ("" when unknown)
    local: np.ndarray  # per cluster: the data is there at every site of the cluster
    site: int  # the site code it is at (-1: not at a site)
    gbps: np.ndarray  # per cluster: the seeded rate from here
    egress: float  # CNY per GB sent from here
    size_gb: float  # copyable GB at this place
    measured_codes: np.ndarray  # sites that measured their rate from here, sorted
    measured_gbps: np.ndarray


@dataclass(frozen=True)
class DataRows:
    """Per row of a chunk: hours and CNY to bring the data there, and whether any data moves."""

    hours: np.ndarray
    cost: np.ndarray
    moves: np.ndarray


class DataPlan:
    """A request's datasets resolved against a snapshot: what moving them costs per cluster and per site,
    and which pools data that may not be copied allows."""

    def __init__(self, req: Request, snap: Snapshot) -> None:
        self.snap = snap
        n = len(snap.cluster_names)
        self.sources: list[_Source] = []
        by_place: dict[str, _Source] = {}
        # (per cluster ok, site code ok or -1) for each dataset that may not be copied
        self.restrictions: list[tuple[np.ndarray, int]] = []
        for data in req.datasets:
            source = by_place.get(data.location)
            if source is None:
                source = by_place[data.location] = self._source(data.location, n)
                self.sources.append(source)
            if data.copyable:
                source.size_gb += data.size_gb
            else:
                self.restrictions.append((source.local, source.site))
        self.sources = [s for s in self.sources if s.size_gb > 0]
        self.copyable_gb = sum(s.size_gb for s in self.sources)
        codes = [s.measured_codes for s in self.sources] + [np.array([s.site], np.int32) for s in self.sources
                                                             if s.site >= 0]  # fmt: skip
        # sites whose transfer differs from their cluster's: they hold data, or measured their rate
        self.special = np.unique(np.concatenate(codes)) if codes else np.zeros(0, np.int32)
        clusters = np.arange(n, dtype=np.int32)
        every = self._rows(clusters, np.full(n, -1, np.int32))
        self.cluster_hours, self.cluster_cost = every.hours, every.cost
        self.restricted = bool(self.restrictions)

    @classmethod
    def of(cls, req: Request, snap: Snapshot) -> DataPlan | None:
        return cls(req, snap) if req.datasets else None

    def _source(self, location: str, n: int) -> _Source:
        snap, geo, transfer = self.snap, self.snap.geography, self.snap.transfer
        local = np.zeros(n, np.bool_)
        site = -1
        keys: list[str] = []
        if location.startswith(SITE_PREFIX):
            info = snap.sites.get(location[len(SITE_PREFIX) :])
            hub = info.hub if info is not None and info.hub in geo.hubs else ""
            if info is not None:
                site = info.code
                cluster = info.cluster if info.cluster in geo.clusters else (geo.hubs[hub].clusters[0] if hub else "")
                keys = [k for k in (cluster, hub) if k]
        else:
            home = hub_of_place(geo, location)
            if home is not None and location not in geo.cities and location in geo.clusters:
                local[snap.clusters[location]] = True
                keys = [location, home]
            elif home is not None:
                local[:] = [h == home for h in snap.cluster_hub]
                keys = [home]
            hub = home or nearest_hub(geo, location) or ""
            keys = keys or ([hub] if hub else [])
        gbps = np.array([transfer.gbps(hub, h) if hub and h else transfer.slowest_gbps for h in snap.cluster_hub],
                        np.float64)  # fmt: skip
        measured: dict[int, float] = {}
        for key in reversed(keys):  # the most specific key (the cluster) wins
            measured.update(snap.bandwidth.get(key, {}))
        measured.pop(site, None)
        codes = np.array(sorted(measured), np.int32)
        return _Source(location, hub, local, site, gbps, transfer.egress_cny_per_gb(hub) if hub else
                       max(transfer.egress.values()), 0.0, codes,
                       np.array([measured[c] for c in codes.tolist()], np.float64))  # fmt: skip

    def _rows(self, clusters: np.ndarray, codes: np.ndarray) -> DataRows:
        hours = np.zeros(clusters.shape[0])
        cost = np.zeros(clusters.shape[0])
        moves = np.zeros(clusters.shape[0], np.bool_)
        for s in self.sources:
            here = s.local[clusters]
            if s.site >= 0:
                here = here | (codes == s.site)
            gbps = s.gbps[clusters]
            if s.measured_codes.size:
                at = np.minimum(np.searchsorted(s.measured_codes, codes), s.measured_codes.size - 1)
                gbps = np.where(s.measured_codes[at] == codes, s.measured_gbps[at], gbps)
            hours = np.maximum(hours, np.where(here, 0.0, transfer_hours(s.size_gb, gbps)))
            cost += np.where(here, 0.0, s.size_gb * s.egress)
            moves |= ~here
        return DataRows(hours, cost, moves)

    def rows(self, table: PoolTable, rows: np.ndarray) -> DataRows:
        """Transfer hours, cost and whether data moves, for `rows` of `table`."""
        return self._rows(table.cluster[rows], table.site_code[rows])

    def moved_gb(self, table: PoolTable, row: int) -> float:
        """GB that would move to one pool (data already there stays)."""
        cluster, code = int(table.cluster[row]), int(table.site_code[row])
        return sum(s.size_gb for s in self.sources if not (s.local[cluster] or code == s.site))

    def allowed(self, table: PoolTable, rows: np.ndarray) -> np.ndarray:
        """Rows where every dataset that may not be copied already is."""
        ok = np.ones(rows.shape[0], np.bool_)
        clusters, codes = table.cluster[rows], table.site_code[rows]
        for local, site in self.restrictions:
            ok &= local[clusters] | (codes == site) if site >= 0 else local[clusters]
        return ok

    def special_rows(self, table: PoolTable, rows: np.ndarray) -> np.ndarray:
        """Which of `rows` belong to sites whose transfer is not their cluster's."""
        if not self.special.size:
            return np.zeros(rows.shape[0], np.bool_)
        return np.isin(table.site_code[rows], self.special)


def place_name(snap: Snapshot, location: str) -> str:
    """A place as a user reads it: 上海/Shanghai, 庆阳/Qingyang, 长三角/Yangtze River Delta, or the site id."""
    geo = snap.geography
    if location.startswith(SITE_PREFIX):
        return location[len(SITE_PREFIX) :]
    if (city := geo.cities.get(location)) is not None:
        return f"{city.name_zh}/{city.name_en}"
    if (cluster := geo.clusters.get(location)) is not None:
        return f"{cluster.name_zh.removesuffix('数据中心集群')}/{cluster.name_en}"
    if (hub := geo.hubs.get(location)) is not None:
        return f"{hub.name_zh.removesuffix('枢纽')}/{hub.name_en}"
    return location


def site_place(snap: Snapshot, site: str) -> str:
    """Where a site is, by its cluster's name (its hub's when the cluster is unknown)."""
    info = snap.sites.get(site)
    if info is None:
        return site
    if info.cluster in snap.geography.clusters:
        return place_name(snap, info.cluster)
    if info.hub in snap.geography.hubs:
        return place_name(snap, info.hub)
    return site if info.cluster in ("", UNKNOWN_PLACE) else info.cluster


def datasets_gb(datasets: tuple[DataSet, ...]) -> float:
    return sum(d.size_gb for d in datasets if d.copyable)
