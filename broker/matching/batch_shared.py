"""What the groups of one batch share: the snapshot, the log of takes, plans, admitted tables, segments.

Plans' lookups, admitted tables and nearest-first segments depend only on the snapshot's structure and
its price and place orders, so they are kept from one batch to the next (`_Lasting`) and checked against
what would make them stale.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import weakref
import zlib
from collections import OrderedDict
from typing import Any

import numpy as np

from broker.matching.filters import Active
from broker.matching.plan import Plan
from broker.matching.request import CHUNK, Decision, Request
from broker.matching.scan import _Scan
from broker.matching.snapshot import PoolTable, Snapshot

# What a Plan's lookups are made of (the rest of a plan is the request itself, its seed and its exclusion).
_PLAN_SHAPE = ("policy", "workload", "weights", "software", "interconnect", "allow_hubs", "deny_hubs",
               "allow_provinces", "deny_provinces", "reference", "units")  # fmt: skip

# (bound, table, rows, rows in key order, which of the table's row orders: "price", "green", "measured", cluster)
Segment = tuple[float, PoolTable, np.ndarray, bool, Any]


class _Lasting:
    """What stays true of a snapshot from one batch to the next while its structure (tables, stack sets,
    interconnects) is unchanged: plans' lookups, admitted tables, nearest-first segments."""

    def __init__(self, structure: int) -> None:
        self.structure = structure
        self.plans: dict[tuple[Any, ...], Plan] = {}
        self.stack_ok: dict[tuple[Any, ...], np.ndarray] = {}
        self.weights: dict[tuple[Any, ...], dict[str, float]] = {}
        self.tables: dict[tuple[Any, ...], list[PoolTable]] = {}
        # (model, origin, latency ref) -> (the table's rows by cluster it was made from, segments)
        self.by_latency: dict[tuple[str, str, float], tuple[object, list[Segment]]] = {}
        # the groups of earlier batches, least recently used first, and the rows they hold prepared: a group
        # is used again while its tables' `gen` is unchanged, its free counts read afresh (`Group.rebind`)
        self.groups: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
        self.rows_held = 0


_LASTING: weakref.WeakKeyDictionary[Snapshot, _Lasting] = weakref.WeakKeyDictionary()


def forget(snap: Snapshot) -> None:
    """Drop what batches kept for `snap` (plans, tables, segments, groups): the next batch starts cold."""
    _LASTING.pop(snap, None)


def _lasting(snap: Snapshot) -> _Lasting:
    found = _LASTING.get(snap)
    if found is None or found.structure != snap.structure:
        found = _LASTING[snap] = _Lasting(snap.structure)
    return found


class Shared:
    """What the groups of one batch share: the snapshot, the log of takes, and what does not depend on a job."""

    def __init__(self, snap: Snapshot, limit: int, keep: int) -> None:
        self.snap, self.limit, self.keep = snap, limit, keep
        self.table_ids = {model: i for i, model in enumerate(snap.tables)}
        sizes = [t.size for t in snap.tables.values()]
        self.offset = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.takes = 0
        self.table_takes = [0] * len(sizes)
        self.stamp: np.ndarray | None = None  # per pool of every table: the number of its last take, or -1
        self.free: dict[int, int] = {}  # pool (offset + row) -> its free count after its last take
        self.lasting = lasting = _lasting(snap)
        # what every site's reasons in a NoFit read besides the group's free counts (see `Group._nofit`)
        self.facts = (len(snap.sites), tuple(t.gen for t in snap.tables.values()))
        self._plans, self._stack_ok, self._weights = lasting.plans, lasting.stack_ok, lasting.weights
        self._tables, self._by_latency = lasting.tables, lasting.by_latency
        self._by_green: dict[str, np.ndarray] = {}  # greens change without a new price order: per batch

    @property
    def rows_held(self) -> int:
        """Rows prepared by the groups, of this batch and of earlier ones kept for the next."""
        return self.lasting.rows_held

    @rows_held.setter
    def rows_held(self, value: int) -> None:
        self.lasting.rows_held = value

    def take(self, decision: Decision) -> None:
        """The scheduler's optimistic take, logged so every group sees it before its next job."""
        chosen = decision.chosen
        self.snap.tables[chosen.model].allocated[chosen.row] += chosen.devices
        if self.stamp is None:
            self.stamp = np.full(int(self.offset[-1]), -1, np.int32)
        tid = self.table_ids[chosen.model]
        table, row, g = self.snap.tables[chosen.model], chosen.row, int(self.offset[tid]) + chosen.row
        self.stamp[g] = self.takes
        self.free[g] = int(table.total[row] - table.external[row] - table.allocated[row])
        self.takes += 1
        self.table_takes[tid] += 1

    def weights(self, req: Request) -> dict[str, float]:
        key = (req.policy, req.workload, req.weights)
        found = self._weights.get(key)
        if found is None:
            found = self._weights[key] = req.weight_map()
        return found

    def plan(self, req: Request, exclude: tuple[str, int] | None = None) -> Plan:
        """`Plan(req, snap, exclude=exclude)` for a request with no site to avoid, its lookups built once.

        A plan is its request, the job's tie-break seed, the exclusion, whether the origin is known, and
        lookups made from the fields in `_PLAN_SHAPE`; plans that share those share the lookups. A job with
        datasets gets a plan of its own (what moving its data costs depends on the sites of the moment)."""
        if req.datasets:
            return Plan(req, self.snap, exclude=exclude)
        key = tuple(getattr(req, name) for name in _PLAN_SHAPE)
        template = self._plans.get(key)
        if template is None:
            stack_ok = self._stack_ok.get(req.software) if req.software else None
            if stack_ok is None:
                template = Plan(req, self.snap)
                self._stack_ok[req.software] = template.stack_ok
            else:  # the stack lookup is the costly part of a plan; equal software shares it
                template = Plan(dataclasses.replace(req, software=()), self.snap)
                template.stack_ok = stack_ok
            self._plans[key] = template
        plan = copy.copy(template)
        plan.req, plan.seed, plan.exclude = req, zlib.crc32(req.job_id.encode()), exclude
        plan.origin_known = req.origin in self.snap.origins
        return plan

    def tables(self, plan: Plan, active: Active) -> list[PoolTable]:
        """The tables of the job's architectures its table filters admit."""
        req = plan.req
        key = (req.archs, req.models, req.domestic_only, req.units is None, req.workload)
        found = self._tables.get(key)
        if found is None:
            found = self._tables[key] = [t for t in plan.candidate_tables() if active.admits(plan, t)]
        return found

    def segments(self, plan: Plan, scan: _Scan, tables: list[PoolTable]) -> list[Segment]:
        """The scan's `segments()`, each with the row order it walks; per-table parts shared by the batch."""
        order, whole = scan.order, plan.req.whole_nodes
        out: list[Segment] = []
        for table in tables:
            if table.size == 0:
                continue
            rows = table.by_price
            if order == "price":
                out.append((-plan.price_floor(table), table, rows, not whole, "price"))
            elif order == "speed":
                bound = 100.0 if whole else scan._speed(table, plan.need(table))
                out.append((bound, table, rows, not whole, "price"))
            elif order == "green":
                greenest = self._by_green.get(table.model)
                if greenest is None:
                    greenest = self._by_green[table.model] = rows[np.argsort(-table.green[rows], kind="stable")]
                out.append((float(table.green[greenest[0]]), table, greenest, True, "green"))
            elif order == "latency":
                near = self._latency_segments(table, plan.req.origin, scan.lat_ref)
                if scan.single or table.size > CHUNK:
                    out += near
                else:
                    out.append((max(s[0] for s in near), table, rows, False, "price"))
            else:
                out.append((100.0, table, rows, False, "price"))
        out.sort(key=lambda s: -s[0])
        return out

    def _latency_segments(self, table: PoolTable, origin: str, lat_ref: float) -> list[Segment]:
        """The scan's `_latency_segments`: rows with measured latency, then each cluster's, with bounds."""
        key = (table.model, origin, lat_ref)
        by_cluster = table.by_cluster  # a new object whenever a price or a place changed
        cached = self._by_latency.get(key)
        if cached is not None and cached[0] is by_cluster:
            return cached[1]
        o = self.snap.origins[origin]
        measured, per_cluster = by_cluster
        found: list[Segment] = [(100.0, table, measured, False, "measured")] if measured.size else []
        for c, rows in per_cluster.items():
            latency = float(self.snap.cluster_latency[c, o])
            bound = 100.0 * min(max(1.0 - latency / lat_ref, 0.0), 1.0) if math.isfinite(latency) else 0.0
            found.append((bound, table, rows, True, c))
        self._by_latency[key] = (by_cluster, found)
        return found
