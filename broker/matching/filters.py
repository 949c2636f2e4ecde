"""The filters a pool must pass, in one ordered list: the scan applies it to choose, `explain` to say why not.

Each filter has a name, a label the user reads when it is the one that rules a site out, and a
vectorised test over a chunk of rows of one table. Static constraints come first (the ones waiting
cannot change), then capacity, then what holds a pool back only for this match: a reservation for a
blocked gang, a site that just gave the job back. A filter is active only when the request or the
match gives it something to check; an inactive filter passes every row and costs nothing.

Table filters are decided by the device model alone, once per table. Late filters need the latency,
which is looked up only for chunks where some row passed every other filter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from broker.matching.plan import Plan
from broker.matching.request import Request
from broker.matching.snapshot import PoolTable


class Chunk:
    """Rows of one table under test, with the per-row facts filters and scores read.

    `free` is what this match counts as free (all but outside use when it pretends the broker's work
    gone); the latency is looked up on first use."""

    __slots__ = ("_latency", "_origin", "_snap", "cost", "devices", "free", "price", "rows", "table", "unit_price")

    def __init__(self, plan: Plan, table: PoolTable, rows: np.ndarray, devices: np.ndarray, free: np.ndarray,
                 price: np.ndarray, cost: np.ndarray, unit_price: np.ndarray,
                 latency: np.ndarray | None = None) -> None:  # fmt: skip
        self._snap, self._origin = plan.snap, plan.req.origin
        self.table, self.rows, self.devices, self.free = table, rows, devices, free
        self.price, self.cost, self.unit_price = price, cost, unit_price
        self._latency = latency

    @classmethod
    def of(cls, plan: Plan, table: PoolTable, rows: np.ndarray, need: int) -> Chunk:
        """`rows` of `table` for a job that needs `need` devices of its model (rounded up to whole nodes)."""
        req = plan.req
        if req.whole_nodes:
            per_node = table.per_node[rows]
            devices = -(-need // per_node) * per_node
        else:
            devices = np.full(rows.shape[0], need)
        free = table.total[rows] - table.external[rows] if plan.when_empty else table.free(rows)
        price = table.price[rows]
        cost = price * devices
        unit_price = cost / req.units if req.units is not None else price
        return cls(plan, table, rows, devices, free, price, cost, unit_price)

    @property
    def latency(self) -> np.ndarray:
        """Round trip from the job's origin to each row's site, in ms."""
        if self._latency is None:
            self._latency = self._snap.latency(self.table, self.rows, self._origin)
        return self._latency

    def take(self, idx: np.ndarray) -> Chunk:
        """The rows at positions `idx` only."""
        chunk = Chunk.__new__(Chunk)
        chunk._snap, chunk._origin, chunk.table = self._snap, self._origin, self.table
        chunk.rows, chunk.devices, chunk.free = self.rows[idx], self.devices[idx], self.free[idx]
        chunk.price, chunk.cost, chunk.unit_price = self.price[idx], self.cost[idx], self.unit_price[idx]
        chunk._latency = None if self._latency is None else self._latency[idx]
        return chunk


def _always(plan: Plan) -> bool:
    return True


@dataclass(frozen=True, slots=True)
class TableFilter:
    """A filter the device model decides: every row of a table passes or none does."""

    name: str
    label: Callable[[Request], str]
    keep: Callable[[Plan, PoolTable], bool]
    active: Callable[[Plan], bool] = _always
    late: ClassVar[bool] = False

    def mask(self, plan: Plan, chunk: Chunk) -> bool:
        return self.keep(plan, chunk.table)


@dataclass(frozen=True, slots=True)
class RowFilter:
    """A filter decided row by row."""

    name: str
    label: Callable[[Request], str]
    keep: Callable[[Plan, Chunk], np.ndarray]
    active: Callable[[Plan], bool] = _always
    late: bool = False  # needs the latency

    def mask(self, plan: Plan, chunk: Chunk) -> np.ndarray:
        return self.keep(plan, chunk)


Filter = TableFilter | RowFilter


def _capacity(req: Request) -> str:
    return f"fewer than {req.count} devices free" if req.count is not None else "too few devices free"


def _capacity_when_empty(req: Request) -> str:
    devices = f"fewer than {req.count} devices" if req.count is not None else "too few devices"
    return f"{devices} even without the broker's own jobs"


def _reserved(plan: Plan, c: Chunk) -> np.ndarray:
    held = plan.exclude
    return c.rows != held[1] if held is not None and held[0] == c.table.model else np.ones(c.rows.shape[0], np.bool_)


def _within_price(plan: Plan, c: Chunk) -> np.ndarray:
    cap = plan.req.max_price
    return c.unit_price <= cap if cap is not None else np.ones(c.rows.shape[0], np.bool_)


def _within_latency(plan: Plan, c: Chunk) -> np.ndarray:
    cap = plan.req.max_latency_ms
    return c.latency <= cap if cap is not None else np.ones(c.rows.shape[0], np.bool_)


def _residency_limited(plan: Plan) -> bool:
    req = plan.req
    return bool(req.allow_hubs or req.deny_hubs or req.allow_provinces or req.deny_provinces)


def _data_label(req: Request) -> str:
    if req.data_moves is not None:  # a quote's comparison of moving the data with leaving it
        return "the data would stay where it is" if req.data_moves else "the data would have to move"
    fixed = [f"{d.name} may not leave {d.location}" for d in req.datasets if not d.copyable]
    return "data " + "; ".join(fixed) if fixed else "data that may not be copied is elsewhere"


def _data_ok(plan: Plan, c: Chunk) -> np.ndarray:
    data, moves = plan.data, plan.req.data_moves
    if data is None:
        return np.ones(c.rows.shape[0], np.bool_)
    ok = data.allowed(c.table, c.rows) if data.restricted else np.ones(c.rows.shape[0], np.bool_)
    if moves is not None:
        ok &= data.rows(c.table, c.rows).moves == moves
    return ok


def _data_limited(plan: Plan) -> bool:
    return plan.data is not None and (plan.data.restricted or plan.req.data_moves is not None)


# (name, label from the request, what passes, whether this plan gives it anything to check), in order
FILTERS: tuple[Filter, ...] = (
    RowFilter("offline", lambda req: "site offline", lambda plan, c: c.table.online[c.rows]),
    TableFilter("model", lambda req: f"no {', '.join(req.models)} pool",
                lambda plan, t: t.model in plan.req.models, lambda plan: bool(plan.req.models)),
    TableFilter("domestic", lambda req: "no domestic (信创) pool",
                lambda plan, t: t.domestic, lambda plan: plan.req.domestic_only),
    TableFilter("perf", lambda req: f"no pool with a catalog {req.workload} performance for equivalent compute",
                lambda plan, t: t.perf_for(plan.req.workload) > 0, lambda plan: plan.req.units is not None),
    RowFilter("stack", lambda req: "no pool with " + " or ".join(r.text for r in req.software),
              lambda plan, c: plan.stack_ok[c.table.stackset[c.rows]] >= 0, lambda plan: bool(plan.req.software)),
    RowFilter("interconnect", lambda req: "no pool with " + " or ".join(req.interconnect) + " interconnect",
              lambda plan, c: plan.ic_ok[c.table.interconnect[c.rows]], lambda plan: bool(plan.req.interconnect)),
    RowFilter("memory", lambda req: f"no pool with >= {req.min_memory_gb:g} GB",
              lambda plan, c: c.table.memory_gb[c.rows] >= plan.req.min_memory_gb,
              lambda plan: plan.req.min_memory_gb > 0),
    RowFilter("residency", lambda req: "outside the allowed hubs and provinces",
              lambda plan, c: plan.place_ok[c.table.cluster[c.rows]], _residency_limited),
    RowFilter("data", _data_label, _data_ok, _data_limited),
    RowFilter("price", lambda req: f"price above {req.max_price:g} CNY/h" if req.max_price is not None else "price",
              _within_price, lambda plan: plan.req.max_price is not None),
    RowFilter("latency", lambda req: f"latency from {req.origin} above {req.max_latency_ms:g} ms"
              if req.max_latency_ms is not None else "latency",
              _within_latency, lambda plan: plan.req.max_latency_ms is not None, late=True),
    RowFilter("capacity", _capacity, lambda plan, c: c.free >= c.devices, lambda plan: not plan.when_empty),
    RowFilter("when_empty", _capacity_when_empty, lambda plan, c: c.free >= c.devices, lambda plan: plan.when_empty),
    RowFilter("reserved", lambda req: "pool reserved for a job that has waited longer", _reserved,
              lambda plan: plan.exclude is not None),
    RowFilter("avoided", lambda req: "site gave this job back just now",
              lambda plan, c: ~np.isin(c.table.site_code[c.rows], plan.avoid), lambda plan: plan.avoid.size > 0),
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Active:
    """The filters of the list that can rule a pool out in one plan, split by when the scan tests them."""

    tables: tuple[TableFilter, ...]
    rows: tuple[RowFilter, ...]
    late: tuple[RowFilter, ...]

    @classmethod
    def of(cls, plan: Plan) -> Active:
        on = [f for f in FILTERS if f.active(plan)]
        return cls(tuple(f for f in on if isinstance(f, TableFilter)),
                   tuple(f for f in on if isinstance(f, RowFilter) and not f.late),
                   tuple(f for f in on if isinstance(f, RowFilter) and f.late))  # fmt: skip

    def admits(self, plan: Plan, table: PoolTable) -> bool:
        """Whether the table filters let the table's pools be considered at all."""
        return all(f.keep(plan, table) for f in self.tables)

    def sift(self, plan: Plan, chunk: Chunk) -> np.ndarray:
        """Positions in `chunk` of the rows that pass every row filter (of an admitted table)."""
        ok = np.ones(chunk.rows.shape[0], np.bool_)
        for f in self.rows:
            ok &= f.keep(plan, chunk)
        if self.late:
            if not ok.any():
                return np.zeros(0, np.intp)  # spare the latency lookup
            for f in self.late:
                ok &= f.keep(plan, chunk)
        return np.flatnonzero(ok)
