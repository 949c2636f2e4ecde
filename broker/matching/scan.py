"""The pure matcher: a job and a snapshot in, a decision (or the reasons there is none) out.

No I/O and no `await`. Reading top to bottom: pick the tables (device models) the job may use, then
visit their pools in the order of the policy's main score (cheapest, nearest, fastest or greenest
first), filtering and scoring a chunk of rows at a time. A single-score policy stops as soon as no
later row can beat the best; a mixed policy stops after `limit` feasible pools (as Nomad limits the
nodes it scores), so a decision costs about the same over 1,000 or 100,000 sites. Scores are bounded
0-100 and named; ties break by a seed from the job id, so the same input always gives the same decision.
When nothing fits, `explain` counts per reason the sites each filter ruled out.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from broker.matching.snapshot import PoolTable, Snapshot
from broker.model.job import JobSpec
from broker.model.stacks import Requirement, parse_requirement

RUNNERS_UP = 3
CHUNK = 512
LIMIT = 1024  # feasible pools a mixed policy scores before it decides
LATENCY_REF_MS = 100.0  # latency that scores 0 when the job sets no cap
TOLERANT = frozenset({"training", "batch", "rendering", "hpc"})
POLICIES: dict[str, dict[str, float]] = {
    "cheapest": {"price": 1.0},
    "fastest": {"speed": 1.0},
    "nearest": {"latency": 1.0},
    "greenest": {"green": 1.0},
}
# 东数西算: latency-tolerant work leans west when price and latency allow; sensitive work stays near.
BALANCED_TOLERANT = {"price": 0.45, "latency": 0.1, "speed": 0.15, "green": 0.1, "packing": 0.1, "west": 0.1}
BALANCED_SENSITIVE = {"price": 0.35, "latency": 0.45, "speed": 0.1, "packing": 0.1}


@dataclass(frozen=True, slots=True)
class Request:
    """What the matcher needs from a job."""

    job_id: str
    archs: tuple[str, ...]
    models: tuple[str, ...]
    count: int | None
    units: float | None
    reference: str
    min_memory_gb: float
    origin: str
    max_latency_ms: float | None
    max_price: float | None
    duration_hours: float = 1.0
    name: str = ""
    workload: str = "general"
    software: tuple[Requirement, ...] = ()
    interconnect: tuple[str, ...] = ()
    whole_nodes: bool = False
    allow_hubs: frozenset[str] = frozenset()
    deny_hubs: frozenset[str] = frozenset()
    allow_provinces: frozenset[str] = frozenset()
    deny_provinces: frozenset[str] = frozenset()
    domestic_only: bool = False
    policy: str = "balanced"
    weights: tuple[tuple[str, float], ...] = ()
    avoid_sites: frozenset[str] = frozenset()  # sites that just gave the job back: used only if nothing else fits

    @classmethod
    def of(cls, job_id: str, spec: JobSpec) -> Request:
        r, res = spec.resources, spec.residency
        return cls(
            job_id=job_id, archs=r.arch_set, models=r.models, count=r.count,
            units=r.equivalent.units if r.equivalent else None,
            reference=r.equivalent.reference if r.equivalent else (r.models[0] if r.models else ""),
            min_memory_gb=r.min_memory_gb, origin=spec.origin, max_latency_ms=spec.max_latency_ms,
            max_price=spec.max_price_cny_per_hour, duration_hours=spec.duration_hours, name=spec.name,
            workload=spec.workload,
            software=tuple(parse_requirement(s.stack, s.versions, s.image) for s in spec.software),
            interconnect=tuple(i.lower() for i in r.interconnect), whole_nodes=r.whole_nodes,
            allow_hubs=frozenset(res.allow_hubs), deny_hubs=frozenset(res.deny_hubs),
            allow_provinces=frozenset(p.lower() for p in res.allow_provinces),
            deny_provinces=frozenset(p.lower() for p in res.deny_provinces),
            domestic_only=spec.domestic_only, policy=spec.policy.value, weights=tuple(sorted(spec.weights.items())),
        )  # fmt: skip

    def relaxed(self, **changes: object) -> Request:
        return replace(self, **changes)  # type: ignore[arg-type]

    def weight_map(self) -> dict[str, float]:
        base = POLICIES.get(self.policy)
        if base is None:
            base = BALANCED_TOLERANT if self.workload in TOLERANT else BALANCED_SENSITIVE
        weights = {**base, **dict(self.weights)}
        return {k: v for k, v in weights.items() if v > 0} or {"price": 1.0}


@dataclass(frozen=True, slots=True)
class Candidate:
    site: str
    hub: str
    model: str
    arch: str
    row: int
    devices: int
    free: int
    price: float  # per device-hour
    cost_per_hour: float  # for all the job's devices
    unit_price: float  # per reference-device-hour (equivalent jobs) or per device-hour
    latency_ms: float
    est_hours: float
    score: float
    scores: dict[str, float]
    stack: str | None = None
    image: str | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "site": self.site, "hub": self.hub, "model": self.model, "arch": self.arch, "devices": self.devices,
            "free": self.free, "price_cny_per_hour": self.price, "cost_cny_per_hour": round(self.cost_per_hour, 4),
            "unit_price_cny_per_hour": round(self.unit_price, 4),
            "latency_ms": round(self.latency_ms, 2) if math.isfinite(self.latency_ms) else None,
            "est_hours": round(self.est_hours, 3), "score": round(self.score, 2),
            "scores": {k: round(v, 2) for k, v in self.scores.items()}, "stack": self.stack, "image": self.image,
        }  # fmt: skip


@dataclass(frozen=True, slots=True)
class Decision:
    chosen: Candidate
    runners_up: tuple[Candidate, ...]
    feasible_sites: int = 0  # counted only by an exhaustive match


@dataclass(frozen=True, slots=True)
class NoFit:
    """Why no site can take the job now: (reason, number of sites it rules out), most common first."""

    reasons: tuple[tuple[str, int], ...]

    @property
    def message(self) -> str:
        if not self.reasons:
            return "no sites known yet"
        return "; ".join(f"{n} site{'s' if n != 1 else ''}: {reason}" for reason, n in self.reasons)


# ------------------------------------------------------------------------------------------ per request


class _Plan:
    """Everything about a request that does not depend on the row: lookup arrays, references, weights."""

    def __init__(self, req: Request, snap: Snapshot) -> None:
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
        self.tables = [t for t in self._candidate_tables() if self._table_ok(t) is None]
        self.avoid = np.zeros(0, np.int32)  # site codes to pass over
        self.exclude: tuple[str, int] | None = None
        self.when_empty = False
        self.reference_perf = self._reference_perf()

    def _place_ok(self, cluster: int) -> bool:
        req, snap = self.req, self.snap
        hub, province = snap.cluster_hub[cluster], snap.cluster_province[cluster].lower()
        if (req.allow_hubs and hub not in req.allow_hubs) or hub in req.deny_hubs:
            return False
        return not ((req.allow_provinces and province not in req.allow_provinces) or province in req.deny_provinces)

    def _candidate_tables(self) -> list[PoolTable]:
        archs = self.req.archs or tuple(self.snap.arch_models)
        return [self.snap.tables[m] for a in archs for m in self.snap.arch_models.get(a, ())]

    def _table_ok(self, table: PoolTable) -> str | None:
        """The model-level reason a table is out, or None."""
        req = self.req
        if req.models and table.model not in req.models:
            return "model"
        if req.domestic_only and not table.domestic:
            return "domestic"
        if req.units is not None and not table.perf_for(req.workload) > 0:
            return "perf"
        return None

    def _reference_perf(self) -> float:
        """Performance of the model equivalent units are counted in (the API refuses unknown references)."""
        device = self.snap.devices.get(self.req.reference)
        perf = PoolTable(device.model, device.arch, device, 1).perf_for(self.req.workload) if device else 1.0
        return perf if perf > 0 else 1.0

    def need(self, table: PoolTable) -> int:
        """Devices of this model the job needs (before rounding up to whole nodes)."""
        if self.req.count is not None:
            return self.req.count
        perf = table.perf_for(self.req.workload)
        return max(1, math.ceil(self.req.units * self.reference_perf / perf - 1e-9))  # type: ignore[operator]

    def price_floor(self, table: PoolTable) -> float:
        """The lowest cost per hour this table could offer (its cheapest row, before any filter)."""
        return float(table.price[table.by_price[0]]) * self.need(table) if table.size else math.inf

    def speed_perf(self, table: PoolTable) -> float:
        """Catalog performance for the job's workload: NaN when the model is unknown, 0 when rated unsuited."""
        return table.perf_for(self.req.workload) if table.device is not None else float("nan")


# ------------------------------------------------------------------------------------------ the pipeline


def match(req: Request, snap: Snapshot, *, limit: int = LIMIT, exhaustive: bool = False,
          keep: int = RUNNERS_UP + 1, exclude: tuple[str, int] | None = None, when_empty: bool = False,
          _avoid: frozenset[str] = frozenset()) -> Decision | NoFit:  # fmt: skip
    """Choose the best pool for `req` in `snap`, or say why none fits.

    Sites in `req.avoid_sites` (the last site that gave the job back) are passed over when another fits.
    `exclude` (model, row) takes one pool out (one reserved for a blocked gang); `when_empty` asks where
    the job would go if every pool were empty of the broker's work (where a blocked gang should wait).
    """
    if req.avoid_sites:
        elsewhere = match(req.relaxed(avoid_sites=frozenset()), snap, limit=limit, exhaustive=exhaustive, keep=keep,
                          exclude=exclude, when_empty=when_empty, _avoid=req.avoid_sites)  # fmt: skip
        if isinstance(elsewhere, Decision):
            return elsewhere
        req = req.relaxed(avoid_sites=frozenset())
    plan = _Plan(req, snap)
    plan.avoid = np.array(sorted(snap.sites[s].code for s in _avoid if s in snap.sites), np.int32)
    plan.exclude, plan.when_empty = exclude, when_empty
    if not plan.tables or not plan.origin_known:
        return explain(req, snap, plan)
    scan = _Scan(plan, keep=max(keep, RUNNERS_UP + 1), exhaustive=exhaustive)
    scan.run(limit)
    if not scan.found:
        return explain(req, snap, plan)
    ranked = scan.ranked(keep)
    return Decision(ranked[0], tuple(ranked[1:]), scan.feasible_sites() if exhaustive else 0)


class _Scan:
    """Visits pools in the policy's order, keeps the feasible ones, and scores them together at the end.

    Price scores are relative to the cheapest feasible offer found (100 for it, 50 for twice its cost), so
    they need every kept row: rows are gathered per chunk and scored once, when the scan stops.
    """

    def __init__(self, plan: _Plan, keep: int, exhaustive: bool) -> None:
        self.plan = plan
        self.keep = keep
        self.exhaustive = exhaustive
        self.parts: list[
            tuple[PoolTable, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]
        ] = []  # (table, rows, devices, free, price, cost, unit_price, latency)
        self.scored = 0
        weights = plan.weights
        self.single = next(iter(weights)) if len(weights) == 1 else None
        self.order = self.single or max(weights, key=lambda k: weights[k])
        self.best_key = -math.inf  # best value of a one-score policy's score (price: minus the cost)
        perfs = [p for t in plan.tables if (p := plan.speed_perf(t)) > 0]
        self.best_perf = max(perfs) if perfs else float("nan")
        self.lat_ref = plan.req.max_latency_ms or LATENCY_REF_MS

    @property
    def found(self) -> bool:
        return bool(self.parts)

    # ------------------------------------------------------------------------------------ visiting order

    def segments(self) -> list[tuple[float, PoolTable, np.ndarray, bool]]:
        """(best possible value of the ordering key, table, rows, whether rows are in key order), best first."""
        plan, order, whole = self.plan, self.order, self.plan.req.whole_nodes
        out: list[tuple[float, PoolTable, np.ndarray, bool]] = []
        for table in plan.tables:
            if table.size == 0:
                continue
            rows = table.by_price
            if order == "price":  # key: minus the cost; whole nodes round per row, so rows are not in cost order
                out.append((-plan.price_floor(table), table, rows, not whole))
            elif order == "speed":  # whole nodes can deliver more than asked: no bound
                out.append((100.0 if whole else self._speed(table, plan.need(table)), table, rows, not whole))
            elif order == "green":
                rows = rows[np.argsort(-table.green[rows], kind="stable")]
                out.append((float(table.green[rows[0]]), table, rows, True))
            elif order == "latency":
                if self.single or table.size > CHUNK:
                    out += self._latency_segments(table)
                else:
                    out.append((max(s[0] for s in self._latency_segments(table)), table, rows, False))
            else:  # packing and west give no useful order
                out.append((100.0, table, rows, False))
        out.sort(key=lambda s: -s[0])
        return out

    def _latency_segments(self, table: PoolTable) -> list[tuple[float, PoolTable, np.ndarray, bool]]:
        """Rows grouped by cluster, nearest cluster first; rows with measured latency go first."""
        o = self.plan.snap.origins[self.plan.req.origin]
        measured, per_cluster = table.by_cluster
        groups = [(100.0, table, measured, False)] if measured.size else []
        for c, rows in per_cluster.items():
            groups.append((self._latency_score(float(self.plan.snap.cluster_latency[c, o])), table, rows, True))
        return groups

    def run(self, limit: int) -> None:
        for bound, table, rows, in_order in self.segments():
            if self.single and self.parts and bound < self.best_key - 1e-9 and not self.exhaustive:
                continue  # nothing in this segment can beat what we have
            for start in range(0, rows.shape[0], CHUNK):
                hit = self._chunk(table, rows[start : start + CHUNK])
                if hit and self.single and in_order and not self.exhaustive:
                    break  # rows are in order of the key: later rows only tie or lose
                if self.scored >= limit and not self.exhaustive and not self.single:
                    return

    # ------------------------------------------------------------------------------------ filtering

    def _chunk(self, table: PoolTable, rows: np.ndarray) -> bool:
        plan, req = self.plan, self.plan.req
        need = plan.need(table)
        per_node = table.per_node[rows]
        devices = -(-need // per_node) * per_node if req.whole_nodes else np.full(rows.shape[0], need)
        free = table.free(rows)
        if plan.when_empty:
            free = table.total[rows] - table.external[rows]
        price = table.price[rows]
        cost = price * devices
        unit_price = cost / req.units if req.units is not None else price
        ok = table.online[rows] & (free >= devices) & plan.place_ok[table.cluster[rows]]
        if plan.avoid.size:
            ok &= ~np.isin(table.site_code[rows], plan.avoid)
        if plan.exclude is not None and plan.exclude[0] == table.model:
            ok &= rows != plan.exclude[1]
        ok &= plan.ic_ok[table.interconnect[rows]] & (plan.stack_ok[table.stackset[rows]] >= 0)
        if req.min_memory_gb > 0:
            ok &= table.memory_gb[rows] >= req.min_memory_gb
        if req.max_price is not None:
            ok &= unit_price <= req.max_price
        if not ok.any():
            return False
        latency = plan.snap.latency(table, rows, req.origin)
        if req.max_latency_ms is not None:
            ok &= latency <= req.max_latency_ms
        idx = np.flatnonzero(ok)
        if idx.size == 0:
            return False
        self.scored += idx.size
        part = (table, rows[idx], devices[idx], free[idx], price[idx], cost[idx], unit_price[idx], latency[idx])
        self.parts.append(part)
        if self.single:
            self.best_key = max(self.best_key, float(np.max(self._key(part))))
        return True

    def _key(self, part: tuple[Any, ...]) -> np.ndarray:
        """The single score a one-score policy ranks by (price: minus the cost, so higher is better)."""
        table, rows, devices, free, _price, cost, _unit, latency = part
        if self.single == "price":
            return -cost
        return self._scores(table, rows, devices, free, cost, latency, 1.0)[self.single]  # type: ignore[index]

    # ------------------------------------------------------------------------------------ scoring

    def _latency_score(self, latency_ms: float) -> float:
        return 100.0 * min(max(1.0 - latency_ms / self.lat_ref, 0.0), 1.0) if math.isfinite(latency_ms) else 0.0

    def _speed(self, table: PoolTable, devices: int) -> float:
        """100 for the fastest delivery any eligible model could give, less for slower ones."""
        perf = self.plan.speed_perf(table)
        if perf != perf or self.best_perf != self.best_perf:
            return 50.0  # no catalog figure: neither rewarded nor ruled out
        if perf <= 0:
            return 0.0  # the catalog rates the model unsuited for this workload
        req = self.plan.req
        if req.count is None:  # compute delivered over compute asked: 1 (as asked) scores 50, 2x or more 100
            ratio = devices * perf / (req.units * self.plan.reference_perf)  # type: ignore[operator]
            return min(100.0, 50.0 * ratio)
        return 100.0 * perf / self.best_perf

    def _speeds(self, table: PoolTable, devices: np.ndarray) -> np.ndarray:
        req, perf = self.plan.req, self.plan.speed_perf(table)
        if req.count is not None or perf != perf:
            return np.full(devices.shape[0], self._speed(table, int(devices[0])))
        ratio = devices * perf / (req.units * self.plan.reference_perf)  # type: ignore[operator]
        return np.minimum(100.0, 50.0 * ratio)

    def _scores(self, table: PoolTable, rows: np.ndarray, devices: np.ndarray, free: np.ndarray, cost: np.ndarray,
                latency: np.ndarray, best_cost: float) -> dict[str, np.ndarray]:  # fmt: skip
        known = np.isfinite(latency)
        safe = np.where(known, latency, 0.0)
        per_node = table.per_node[rows]
        remainder = devices % per_node
        fits_partial = (free % per_node) >= remainder
        return {
            "price": np.where(cost > 0, 100.0 * best_cost / np.maximum(cost, 1e-12), 100.0),
            "latency": np.where(known, 100.0 * np.clip(1.0 - safe / self.lat_ref, 0.0, 1.0), 0.0),
            "speed": self._speeds(table, devices),
            "green": table.green[rows].astype(np.float64),
            "packing": np.where((remainder == 0) | fits_partial, 100.0, 100.0 * remainder / per_node),
            "west": 100.0 * self.plan.snap.cluster_west[table.cluster[rows]],
        }  # fmt: skip

    def ranked(self, keep: int) -> list[Candidate]:
        """Score every kept row, best first, one candidate per site."""
        plan = self.plan
        best_cost = min(float(np.min(part[5])) for part in self.parts)
        entries: list[tuple[float, int, int, int]] = []
        scored_parts = []
        for p, (table, rows, devices, free, _price, cost, _unit, latency) in enumerate(self.parts):
            scores = self._scores(table, rows, devices, free, cost, latency, best_cost)
            total = sum(plan.weights[k] * scores[k] for k in plan.weights) / plan.weight_sum
            # exact ties (and only those) break by a per-job permutation of site ids: replays on any replica
            tie = (table.site_hash[rows] * np.uint64(2654435761) + np.uint64(plan.seed)) % np.uint64(2**32)
            scored_parts.append((scores, total))
            for i in np.lexsort((-tie.astype(np.int64), -total))[: keep * 2]:
                entries.append((float(total[i]), int(tie[i]), p, int(i)))
        out: list[Candidate] = []
        sites: set[int] = set()
        for total_i, _tie, p, i in sorted(entries, key=lambda e: (-e[0], -e[1])):
            table, rows, devices, free, price, cost, unit_price, latency = self.parts[p]
            site = int(table.site_code[rows[i]])
            if site in sites:
                continue
            sites.add(site)
            scores = {k: float(v[i]) for k, v in scored_parts[p][0].items()}
            facts = (int(devices[i]), int(free[i]), float(price[i]), float(cost[i]), float(unit_price[i]))
            out.append(self._candidate(table, int(rows[i]), *facts, float(latency[i]), total_i, scores))
            if len(out) >= keep:
                break
        return out

    def feasible_sites(self) -> int:
        codes = [part[0].site_code[part[1]] for part in self.parts]
        return int(np.unique(np.concatenate(codes)).size) if codes else 0

    def _candidate(self, table: PoolTable, row: int, devices: int, free: int, price: float, cost: float,
                   unit_price: float, latency: float, total: float, scores: dict[str, float]) -> Candidate:  # fmt: skip
        plan = self.plan
        snap, req = plan.snap, plan.req
        site = snap.site_names[int(table.site_code[row])]
        requirement = req.software[int(plan.stack_ok[table.stackset[row]])] if req.software else None
        stack = None
        if requirement is not None:
            tags = (f"{n}-{v}" if v else n for n, v in snap.stacksets[int(table.stackset[row])])
            stack = next((tag for tag in tags if requirement.admits(tag)), None)
        perf = plan.speed_perf(table)
        if req.units is not None and perf > 0:
            est = req.duration_hours * req.units * plan.reference_perf / (devices * perf)
        elif req.models and perf > 0 and req.models[0] in snap.tables:
            est = req.duration_hours * snap.tables[req.models[0]].perf_for(req.workload) / perf
        else:
            est = req.duration_hours
        named = {k: scores[k] for k in plan.weights}
        return Candidate(site=site, hub=snap.sites[site].hub, model=table.model, arch=table.arch, row=row,
                         devices=devices, free=free, price=price, cost_per_hour=cost, unit_price=unit_price,
                         latency_ms=latency, est_hours=est if est == est else req.duration_hours, score=total,
                         scores=named, stack=stack, image=requirement.image if requirement else None)  # fmt: skip


# ------------------------------------------------------------------------------------------ explanations

_STAGES = ("offline", "model", "domestic", "perf", "stack", "interconnect", "memory", "residency", "price",
           "latency", "capacity")  # fmt: skip


def _labels(req: Request) -> dict[str, str]:
    need = f"fewer than {req.count} devices free" if req.count is not None else "too few devices free"
    return {
        "offline": "site offline",
        "model": f"no {', '.join(req.models)} pool",
        "domestic": "no domestic (信创) pool",
        "perf": f"no pool with a catalog {req.workload} performance for equivalent compute",
        "stack": "no pool with " + " or ".join(r.text for r in req.software),
        "interconnect": "no pool with " + " or ".join(req.interconnect) + " interconnect",
        "memory": f"no pool with >= {req.min_memory_gb:g} GB",
        "residency": "outside the allowed hubs and provinces",
        "price": f"price above {req.max_price:g} CNY/h" if req.max_price is not None else "price",
        "latency": f"latency from {req.origin} above {req.max_latency_ms:g} ms" if req.max_latency_ms else "latency",
        "capacity": need,
    }


def explain(req: Request, snap: Snapshot, plan: _Plan | None = None) -> NoFit:
    """Count, per reason, the sites whose best pool got no further than that filter."""
    if not snap.sites:
        return NoFit(())
    plan = plan or _Plan(req, snap)
    if not plan.origin_known:
        return NoFit(((f"unknown origin {req.origin}", len(snap.sites)),))
    best = np.full(len(snap.site_names), -1, np.int16)
    for table in plan._candidate_tables():
        n = table.size
        if n == 0:
            continue
        rows = np.arange(n)
        need = plan.need(table) if plan._table_ok(table) is None else 1
        devices = -(-need // table.per_node[:n]) * table.per_node[:n] if req.whole_nodes else np.full(n, need)
        unit_price = table.price[:n] * devices / req.units if req.units is not None else table.price[:n]
        static = plan._table_ok(table)
        stages = {
            "offline": table.online[:n],
            "model": np.full(n, static != "model"),
            "domestic": np.full(n, static != "domestic"),
            "perf": np.full(n, static != "perf"),
            "stack": plan.stack_ok[table.stackset[:n]] >= 0,
            "interconnect": plan.ic_ok[table.interconnect[:n]],
            "memory": table.memory_gb[:n] >= req.min_memory_gb,
            "residency": plan.place_ok[table.cluster[:n]],
            "price": unit_price <= req.max_price if req.max_price is not None else np.ones(n, np.bool_),
            "latency": snap.latency(table, rows, req.origin) <= req.max_latency_ms
            if req.max_latency_ms is not None else np.ones(n, np.bool_),
            "capacity": table.free() >= devices,
        }  # fmt: skip
        reached = np.zeros(n, np.int16)
        alive = np.ones(n, np.bool_)
        for i, stage in enumerate(_STAGES):
            alive &= stages[stage]
            reached[alive] = i + 1
        np.maximum.at(best, table.site_code[:n], reached)
    labels = _labels(req)
    counts: dict[str, int] = {}
    for i, stage in enumerate(_STAGES):
        n_sites = int(np.count_nonzero(best == i))
        if n_sites:
            counts[labels[stage]] = counts.get(labels[stage], 0) + n_sites
    without = len(snap.sites) - int(np.count_nonzero(best >= 0))
    if without:
        counts[f"no {'/'.join(req.archs) if req.archs else 'usable'} pool"] = without
    return NoFit(tuple(sorted(counts.items(), key=lambda item: (-item[1], item[0]))))
