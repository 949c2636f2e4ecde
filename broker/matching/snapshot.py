"""The matcher's in-memory view of every pool, kept fresh from Redis by the scheduler.

One table per device model (so a job that names models touches only those), numeric columns in numpy
arrays, rows updated in place when a site changes and never removed (a vanished pool keeps its row
with total 0), so row numbers stay valid for the life of the process. Latency is a cluster x origin
matrix (sites in one cluster share the model's estimate); a site's measured values override it per row.
Each table keeps its rows ordered by price, so a decision can visit the cheapest pools first and stop
early instead of scoring every site.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from broker.model.records import SiteRecord
from broker.model.reliability import Reliability, reliability_score, site_score
from broker.model.stacks import split_tag
from regions import Device, Geography, LatencyModel, TransferModel, load_devices, load_transfer

UNKNOWN_PLACE = "?"
AGE_EVERY_MS = 60_000  # how often (Redis time) the view decays the reliability of sites with a bad record


@dataclass
class SiteInfo:
    id: str
    code: int
    hub: str
    cluster: str
    status: str
    meta_version: int
    energy: Mapping[str, float] = field(default_factory=dict)
    reliability: float = 100.0  # the score (broker.model.reliability) as of the view's last read or aging
    bandwidth_gbps: Mapping[str, float] = field(default_factory=dict)  # measured rate into the site, per hub/cluster


def green_score(energy: Mapping[str, float]) -> float:
    """0-100 from green-power share (half), PUE (30%) and tariff (20%): what `greenest` ranks by."""
    share = float(energy.get("green_share", 0.3))
    pue_term = min(max((1.8 - float(energy.get("pue", 1.4))) / 0.8, 0.0), 1.0)
    tariff_term = min(max((0.8 - float(energy.get("tariff_cny_per_kwh", 0.5))) / 0.6, 0.0), 1.0)
    return 100.0 * (0.5 * share + 0.3 * pue_term + 0.2 * tariff_term)


class PoolTable:
    """Numeric columns for the pools of one device model."""

    COLUMNS = ("site_code", "site_hash", "cluster", "memory_gb", "price", "total", "external", "allocated", "per_node",
               "online", "green", "stackset", "interconnect", "measured", "reliability")  # fmt: skip

    def __init__(self, model: str, arch: str, device: Device | None, capacity: int = 16) -> None:
        self.model, self.arch, self.device = model, arch, device
        self.perf = {
            "training": device.perf_training if device else float("nan"),
            "inference": device.perf_inference if device else float("nan"),
        }
        self.domestic = bool(device and device.domestic)
        self.size = 0
        self.keys: list[str] = []  # row -> site
        self.index: dict[str, int] = {}  # site -> row
        self.site_code = np.zeros(capacity, np.int32)
        self.site_hash = np.zeros(capacity, np.uint64)  # crc32 of the site id: tie-breaks that replay anywhere
        self.cluster = np.zeros(capacity, np.int32)
        self.memory_gb = np.zeros(capacity, np.float32)
        self.price = np.zeros(capacity, np.float64)
        self.total = np.zeros(capacity, np.int64)
        self.external = np.zeros(capacity, np.int64)
        self.allocated = np.zeros(capacity, np.int64)
        self.per_node = np.ones(capacity, np.int64)  # int64: a huge request times a node size must not overflow
        self.online = np.zeros(capacity, np.bool_)
        self.green = np.zeros(capacity, np.float32)
        self.stackset = np.zeros(capacity, np.int32)
        self.interconnect = np.zeros(capacity, np.int32)
        self.measured = np.zeros(capacity, np.bool_)
        # the site's reliability score: a score like green, but read afresh by kept batch groups (it moves with
        # every outcome at a site with a bad record), so it does not bump `gen`
        self.reliability = np.full(capacity, 100.0, np.float64)
        self.reliability_version = 0  # bumps when a row's reliability score changes
        self.measured_ms: dict[int, Mapping[str, float]] = {}
        self._by_price: np.ndarray | None = None
        self._by_cluster: tuple[np.ndarray, dict[int, np.ndarray]] | None = None
        # bumps whenever anything but the counts changes (a row added, a price, a place, a pool's facts, a
        # site going on or off line): what was prepared from this table's rows is stale once it moves
        self.gen = 0

    def _grow(self) -> None:
        for name in self.COLUMNS:
            column = getattr(self, name)
            bigger = np.zeros(column.shape[0] * 2, column.dtype)
            bigger[: column.shape[0]] = column
            setattr(self, name, bigger)

    def row(self, site: str) -> int:
        found = self.index.get(site)
        if found is not None:
            return found
        if self.size == self.total.shape[0]:
            self._grow()
        row = self.size
        self.size += 1
        self.keys.append(site)
        self.index[site] = row
        self.reliability[row] = 100.0
        self.site_hash[row] = zlib.crc32(site.encode())
        self._by_price = self._by_cluster = None
        self.gen += 1
        return row

    def set_price(self, row: int, price: float) -> None:
        if self.price[row] != price:
            self.price[row] = price
            self._by_price = self._by_cluster = None
            self.gen += 1

    def set_reliability(self, row: int, score: float) -> None:
        if self.reliability[row] != score:
            self.reliability[row] = score
            self.reliability_version += 1

    def set_place(self, row: int, cluster: int, measured: bool) -> None:
        if self.cluster[row] != cluster or self.measured[row] != measured:
            self.cluster[row], self.measured[row] = cluster, measured
            self._by_cluster = None
            self.gen += 1

    @property
    def by_cluster(self) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        """Rows with measured latency, and the other rows per cluster, each cheapest first (cached)."""
        if self._by_cluster is None:
            rows = self.by_price
            measured = self.measured[rows]
            rest = rows[~measured]
            clusters = self.cluster[rest]
            self._by_cluster = (rows[measured], {int(c): rest[clusters == c] for c in np.unique(clusters)})
        return self._by_cluster

    @property
    def by_price(self) -> np.ndarray:
        """Row numbers, cheapest first (kept until a price or a new row changes it)."""
        if self._by_price is None:
            self._by_price = np.argsort(self.price[: self.size], kind="stable").astype(np.int32)
        return self._by_price

    def free(self, rows: np.ndarray | slice | None = None) -> np.ndarray:
        rows = slice(0, self.size) if rows is None else rows
        return self.total[rows] - self.external[rows] - self.allocated[rows]

    def perf_for(self, workload: str) -> float:
        """Relative performance (A100-80G = 1) for a workload class; NaN when the model is not in the catalog."""
        if workload == "training" or workload == "hpc":
            return self.perf["training"]
        if workload in ("inference", "rendering", "batch"):
            return self.perf["inference"]
        return (self.perf["training"] + self.perf["inference"]) / 2


class Snapshot:
    """Every site and pool the matcher may choose from."""

    def __init__(self, geography: Geography, latency: LatencyModel | None = None,
                 devices: Mapping[str, Device] | None = None,
                 transfer: TransferModel | None = None) -> None:  # fmt: skip
        self.geography = geography
        self.devices = load_devices() if devices is None else devices
        self.transfer = load_transfer() if transfer is None else transfer
        # hub or cluster id -> site code -> the rate (Gbps) the site measured from there
        self.bandwidth: dict[str, dict[int, float]] = {}
        latency = latency or LatencyModel()
        self.origins: dict[str, int] = {}
        for name in (*geography.cities, *geography.clusters, *geography.hubs):
            self.origins.setdefault(name, len(self.origins))
        self.cluster_names = [*geography.clusters, UNKNOWN_PLACE]
        self.clusters = {name: i for i, name in enumerate(self.cluster_names)}
        self.cluster_hub = [geography.clusters[c].hub for c in geography.clusters] + [""]
        self.cluster_province = [geography.clusters[c].province for c in geography.clusters] + [""]
        self.cluster_west = np.array(
            [geography.hubs[h].side == "west" if h else False for h in self.cluster_hub], np.bool_
        )
        # round trip from each origin to each cluster; the unknown place is infinitely far
        self.cluster_latency = np.full((len(self.cluster_names), len(self.origins)), np.inf, np.float32)
        for c, name in enumerate(self.cluster_names[:-1]):
            where = (geography.clusters[name].lat, geography.clusters[name].lon)
            for origin, o in self.origins.items():
                start = geography.place(origin)
                if start is not None:
                    self.cluster_latency[c, o] = latency.estimate_ms(start, where)
        self.tables: dict[str, PoolTable] = {}  # model -> table
        self.arch_models: dict[str, list[str]] = {}
        self.sites: dict[str, SiteInfo] = {}
        self.site_names: list[str] = []
        self.stacksets: list[tuple[tuple[str, str], ...]] = []  # id -> ((name, version), ...)
        self._stackset_ids: dict[tuple[str, ...], int] = {}
        self.interconnects: list[str] = []
        self._interconnect_ids: dict[str, int] = {}
        self.version = 0  # highest site change version applied
        # the reliability records of sites scoring below 100, as last read, which `age_reliability` decays
        self.unreliable: dict[str, Reliability] = {}
        self.reliability_aged = 0  # Redis time (ms) of the last aging
        self.structure = 0  # bumps when tables, stack sets or interconnects are added

    # -------------------------------------------------------------------------------- lookups

    def table(self, model: str, arch: str) -> PoolTable:
        table = self.tables.get(model)
        if table is None:
            table = self.tables[model] = PoolTable(model, arch, self.devices.get(model))
            self.arch_models.setdefault(arch, []).append(model)
            self.structure += 1
        return table

    def stackset_id(self, tags: tuple[str, ...]) -> int:
        found = self._stackset_ids.get(tags)
        if found is None:
            found = self._stackset_ids[tags] = len(self.stacksets)
            self.stacksets.append(tuple(split_tag(t) for t in tags))
            self.structure += 1
        return found

    def interconnect_id(self, name: str) -> int:
        found = self._interconnect_ids.get(name)
        if found is None:
            found = self._interconnect_ids[name] = len(self.interconnects)
            self.interconnects.append(name)
            self.structure += 1
        return found

    def meta_versions(self, sites: Iterable[str] | None = None) -> dict[str, int]:
        """The pool metadata version held per site (of `sites` only, when given: a refresh asks about the
        sites that changed, not about all of them)."""
        if sites is None:
            return {s.id: s.meta_version for s in self.sites.values()}
        known = self.sites
        return {site: info.meta_version for site in sites if (info := known.get(site)) is not None}

    def latency(self, table: PoolTable, rows: np.ndarray, origin: str) -> np.ndarray:
        """Round trip from `origin` to each row's site: the cluster model, or what the site measured."""
        o = self.origins.get(origin)
        if o is None:
            return np.full(rows.shape[0], np.inf, np.float32)
        values = self.cluster_latency[table.cluster[rows], o]
        if table.measured_ms:
            for i in np.flatnonzero(table.measured[rows]):
                measured = table.measured_ms[int(rows[i])].get(origin)
                if measured is not None:
                    values[i] = measured
        return values

    # -------------------------------------------------------------------------------- updates

    def age_reliability(self, now_ms: int) -> int:
        """Decay the reliability of sites with a bad record to `now_ms` (Redis time), at most once every
        `AGE_EVERY_MS`: a site that gets no work, so has no new event, still recovers in the view as it does
        in Redis. Only sites scoring below 100 are visited. Returns how many scores changed."""
        if now_ms - self.reliability_aged < AGE_EVERY_MS:
            return 0
        self.reliability_aged = now_ms
        changed = 0
        for site, record in list(self.unreliable.items()):
            info = self.sites[site]
            score = site_score(record, now_ms)
            if score >= 100.0:
                del self.unreliable[site]
            if score == info.reliability:
                continue
            info.reliability = score
            changed += 1
            for table in self.tables.values():
                row = table.index.get(site)
                if row is not None:
                    table.set_reliability(row, score)
        return changed

    def apply(self, record: SiteRecord) -> None:
        """Bring one site up to date from its Redis record."""
        info = self.sites.get(record.id)
        if info is None:
            if record.meta is None:
                return  # status seen before any capacity: nothing to offer yet
            info = SiteInfo(record.id, len(self.site_names), record.hub, record.cluster, record.status, -1)
            self.sites[record.id] = info
            self.site_names.append(record.id)
        info.status = record.status
        if record.reliability is not None:
            info.reliability = reliability_score(record.reliability)
            if info.reliability < 100.0:
                self.unreliable[record.id] = record.reliability
            else:
                self.unreliable.pop(record.id, None)
        if record.meta is not None:
            self._apply_meta(info, record)
        online = record.status == "online"
        for table in self.tables.values():
            row = table.index.get(record.id)
            if row is None:
                continue
            model = table.model
            table.total[row], table.external[row], table.allocated[row] = record.counts(model)
            table.set_reliability(row, info.reliability)
            if table.online[row] != online:
                table.online[row] = online
                table.gen += 1

    def _apply_meta(self, info: SiteInfo, record: SiteRecord) -> None:
        meta: dict[str, Any] = record.meta or {}
        moved = info.hub != record.hub
        info.hub, info.cluster, info.meta_version = record.hub, record.cluster, record.meta_version
        info.energy = meta.get("energy", {})
        bandwidth: Mapping[str, float] = meta.get("bandwidth_gbps") or {}
        if bandwidth or info.bandwidth_gbps:
            for key in info.bandwidth_gbps:
                self.bandwidth.get(key, {}).pop(info.code, None)
            for key, gbps in bandwidth.items():
                self.bandwidth.setdefault(key, {})[info.code] = float(gbps)
            info.bandwidth_gbps = bandwidth
        cluster = record.cluster or next(iter(self.geography.hubs[record.hub].clusters), UNKNOWN_PLACE) \
            if record.hub in self.geography.hubs else UNKNOWN_PLACE  # fmt: skip
        cluster_code = self.clusters.get(cluster, self.clusters[UNKNOWN_PLACE])
        green = green_score(info.energy)
        measured: Mapping[str, float] = meta.get("latency_ms") or {}
        for pool in meta.get("pools", []):
            table = self.table(pool["model"], pool["arch"])
            row = table.row(record.id)
            facts = (int(table.site_code[row]), float(table.memory_gb[row]), int(table.per_node[row]),
                     float(table.green[row]), int(table.stackset[row]), int(table.interconnect[row]),
                     table.measured_ms.get(row))  # fmt: skip
            table.site_code[row] = info.code
            table.set_place(row, cluster_code, bool(measured))
            table.memory_gb[row] = pool["memory_gb"]
            table.set_price(row, pool["price_cny_per_hour"])
            table.per_node[row] = pool["per_node"]
            table.green[row] = green
            table.set_reliability(row, info.reliability)
            table.stackset[row] = self.stackset_id(tuple(pool.get("stacks", ())))
            table.interconnect[row] = self.interconnect_id(pool.get("interconnect", "none"))
            if measured:
                table.measured_ms[row] = measured
            else:
                table.measured_ms.pop(row, None)
            if moved or facts != (int(table.site_code[row]), float(table.memory_gb[row]), int(table.per_node[row]),
                                  float(table.green[row]), int(table.stackset[row]), int(table.interconnect[row]),
                                  table.measured_ms.get(row)):  # fmt: skip
                table.gen += 1  # what groups prepared from this row no longer holds
