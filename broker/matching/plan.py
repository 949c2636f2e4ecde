"""Everything about one request that does not depend on the pool: lookup arrays, the reference, weights."""

from __future__ import annotations

import copy
import math
import zlib

import numpy as np

from broker.matching.data import DataPlan
from broker.matching.request import Request
from broker.matching.snapshot import PoolTable, Snapshot


class Plan:
    """A request prepared against a snapshot, and what this match holds back or pretends.

    `avoid` names sites to pass over, `exclude` (model, row) one pool reserved for a blocked gang, and
    `when_empty` counts capacity as if the broker's own work were gone (where a blocked gang should wait).
    """

    def __init__(self, req: Request, snap: Snapshot, *, avoid: frozenset[str] = frozenset(),
                 exclude: tuple[str, int] | None = None, when_empty: bool = False) -> None:  # fmt: skip
        self.req, self.snap = req, snap
        self.weights = req.weight_map()
        self.weight_sum = sum(self.weights.values())
        self.seed = zlib.crc32(req.job_id.encode())
        self.origin_known = req.origin in snap.origins
        # stack set id -> index of the first requirement it satisfies, or -1
        self.stack_ok = np.array(
            [next((i for i, r in enumerate(req.software) if any(r.admits(f"{n}-{v}" if v else n) for n, v in ss)), -1)
             for ss in snap.stacksets] if req.software else [0] * len(snap.stacksets), np.int32,
        ).reshape(-1)  # fmt: skip
        self.ic_ok = np.array([not req.interconnect or ic.lower() in req.interconnect for ic in snap.interconnects],
                              np.bool_).reshape(-1)  # fmt: skip
        self.place_ok = np.array([self._place_ok(c) for c in range(len(snap.cluster_names))], np.bool_)
        self.avoid = np.array(sorted(snap.sites[s].code for s in avoid if s in snap.sites), np.int32)
        self.exclude = exclude
        self.when_empty = when_empty
        self.reference_perf = self._reference_perf()
        # the compute asked, in devices of performance 1 for the workload; None for a device count
        self.compute = req.units * self.reference_perf if req.units is not None else None
        # the job's datasets: what moving them to each pool takes, and where those that may not move keep it
        self.data = DataPlan.of(req, snap)

    def without_avoid(self) -> Plan:
        """The same plan with no site passed over (when nothing else fits, an avoided site will do)."""
        plain = copy.copy(self)
        plain.avoid = np.zeros(0, np.int32)
        return plain

    def _place_ok(self, cluster: int) -> bool:
        req, snap = self.req, self.snap
        hub, province = snap.cluster_hub[cluster], snap.cluster_province[cluster].lower()
        if (req.allow_hubs and hub not in req.allow_hubs) or hub in req.deny_hubs:
            return False
        return not ((req.allow_provinces and province not in req.allow_provinces) or province in req.deny_provinces)

    def candidate_tables(self) -> list[PoolTable]:
        """The tables of the job's architectures (every architecture when it names none)."""
        archs = self.req.archs or tuple(self.snap.arch_models)
        return [self.snap.tables[m] for a in archs for m in self.snap.arch_models.get(a, ())]

    def _reference_perf(self) -> float:
        """Performance of the model equivalent units are counted in (the API refuses unknown references)."""
        device = self.snap.devices.get(self.req.reference)
        perf = PoolTable(device.model, device.arch, device, 1).perf_for(self.req.workload) if device else 1.0
        return perf if perf > 0 else 1.0

    def need(self, table: PoolTable) -> int:
        """Devices of this model the job needs (before rounding up to whole nodes).

        For equivalent compute the table must have a catalog performance for the workload (the perf filter)."""
        if self.req.count is not None:
            return self.req.count
        if self.compute is None:
            raise ValueError(f"request {self.req.job_id} asks for neither devices nor compute")
        return max(1, math.ceil(self.compute / table.perf_for(self.req.workload) - 1e-9))

    def price_floor(self, table: PoolTable) -> float:
        """The lowest cost per hour this table could offer (its cheapest row, before any filter)."""
        return float(table.price[table.by_price[0]]) * self.need(table) if table.size else math.inf

    def est_hours(self, table: PoolTable, devices: np.ndarray) -> np.ndarray:
        """The run's estimated hours on `devices` of the table's model: the scan's `_candidate` arithmetic."""
        req, snap = self.req, self.snap
        perf = self.speed_perf(table)
        if req.units is not None and perf > 0:
            est = req.duration_hours * req.units * self.reference_perf / (devices * perf)
        elif req.models and perf > 0 and req.models[0] in snap.tables:
            first = snap.tables[req.models[0]].perf_for(req.workload)
            est = np.full(devices.shape[0], req.duration_hours * first / perf)
        else:
            est = np.full(devices.shape[0], req.duration_hours)
        return np.where(np.isnan(est), req.duration_hours, est)

    def speed_perf(self, table: PoolTable) -> float:
        """Catalog performance for the job's workload: NaN when the model is unknown, 0 when rated unsuited."""
        return table.perf_for(self.req.workload) if table.device is not None else float("nan")
