"""The matcher's in-memory view of every pool, kept fresh from Redis by the scheduler.

Pools are rows in numeric columns (numpy), one table per architecture, so a decision filters and
scores whole columns at once instead of looping over sites in Python. Rows are updated in place when
a site changes; a row is never removed (a vanished pool keeps its row with total 0), so row numbers
stay valid for the life of the process.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from broker.store import SiteRecord
from regions import Geography, LatencyModel


@dataclass
class SiteInfo:
    id: str
    code: int
    hub: str
    cluster: str
    status: str
    meta_version: int
    energy: Mapping[str, float] = field(default_factory=dict)


class PoolTable:
    """Numeric columns for the pools of one architecture."""

    def __init__(self, arch: str, n_origins: int, capacity: int = 64) -> None:
        self.arch = arch
        self.size = 0
        self.keys: list[tuple[str, str]] = []  # row -> (site, model)
        self.index: dict[tuple[str, str], int] = {}
        self.site_rows: dict[str, list[int]] = {}
        self.site_code = np.zeros(capacity, np.int32)
        self.model_code = np.zeros(capacity, np.int32)
        self.memory_gb = np.zeros(capacity, np.float32)
        self.price = np.zeros(capacity, np.float64)
        self.total = np.zeros(capacity, np.int64)
        self.external = np.zeros(capacity, np.int64)
        self.allocated = np.zeros(capacity, np.int64)
        self.per_node = np.ones(capacity, np.int32)
        self.online = np.zeros(capacity, np.bool_)
        self.latency = np.zeros((capacity, n_origins), np.float32)
        self.info: list[dict[str, Any]] = []  # row -> interconnect, stacks (read when explaining)

    def _grow(self) -> None:
        for name in ("site_code", "model_code", "memory_gb", "price", "total", "external", "allocated",
                     "per_node", "online", "latency"):  # fmt: skip
            column = getattr(self, name)
            bigger = np.zeros((column.shape[0] * 2, *column.shape[1:]), column.dtype)
            bigger[: column.shape[0]] = column
            setattr(self, name, bigger)

    def row(self, site: str, model: str) -> int:
        key = (site, model)
        found = self.index.get(key)
        if found is not None:
            return found
        if self.size == self.total.shape[0]:
            self._grow()
        row = self.size
        self.size += 1
        self.keys.append(key)
        self.index[key] = row
        self.site_rows.setdefault(site, []).append(row)
        self.info.append({})
        return row

    def free(self) -> np.ndarray:
        n = self.size
        return self.total[:n] - self.external[:n] - self.allocated[:n]


class Snapshot:
    """Every site and pool the matcher may choose from, with precomputed latency from every origin."""

    def __init__(self, geography: Geography, latency: LatencyModel | None = None) -> None:
        self.geography = geography
        self.latency_model = latency or LatencyModel()
        origins = [*geography.cities, *geography.clusters, *geography.hubs]
        self.origins: dict[str, int] = {}
        for name in origins:
            self.origins.setdefault(name, len(self.origins))
        self.tables: dict[str, PoolTable] = {}
        self.sites: dict[str, SiteInfo] = {}
        self.site_names: list[str] = []
        self.models: dict[str, int] = {}
        self.model_names: list[str] = []
        self.version = 0  # highest site change version applied

    def table(self, arch: str) -> PoolTable:
        table = self.tables.get(arch)
        if table is None:
            table = self.tables[arch] = PoolTable(arch, len(self.origins))
        return table

    def model_code(self, model: str) -> int:
        code = self.models.get(model)
        if code is None:
            code = self.models[model] = len(self.model_names)
            self.model_names.append(model)
        return code

    def meta_versions(self) -> dict[str, int]:
        return {s.id: s.meta_version for s in self.sites.values()}

    def _latency_row(self, cluster: str, hub: str, measured: Mapping[str, float]) -> np.ndarray:
        geo = self.geography
        where = geo.place(cluster) if cluster else None
        if where is None:
            where = geo.place(hub)
        row = np.full(len(self.origins), np.inf, np.float32)
        for origin, i in self.origins.items():
            if origin in measured:
                row[i] = measured[origin]
            elif where is not None:
                start = geo.place(origin)
                if start is not None:
                    row[i] = self.latency_model.estimate_ms(start, where)
        return row

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
        online = record.status == "online"
        if record.meta is not None:
            info.hub, info.cluster, info.meta_version = record.hub, record.cluster, record.meta_version
            info.energy = record.meta.get("energy", {})
            latency = self._latency_row(record.cluster, record.hub, record.meta.get("latency_ms", {}))
            for pool in record.meta.get("pools", []):
                table = self.table(pool["arch"])
                row = table.row(record.id, pool["model"])
                table.site_code[row] = info.code
                table.model_code[row] = self.model_code(pool["model"])
                table.memory_gb[row] = pool["memory_gb"]
                table.price[row] = pool["price_cny_per_hour"]
                table.per_node[row] = pool["per_node"]
                table.latency[row] = latency
                table.info[row] = {"interconnect": pool["interconnect"], "stacks": pool["stacks"]}
        for table in self.tables.values():
            for row in table.site_rows.get(record.id, ()):
                model = table.keys[row][1]
                table.total[row] = record.capacity.get(f"t:{model}", 0)
                table.external[row] = record.capacity.get(f"x:{model}", 0)
                table.allocated[row] = record.capacity.get(f"a:{model}", 0)
                table.online[row] = online
