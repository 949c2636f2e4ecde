"""The pure matcher: a job and a snapshot in, a decision (or the reasons there is none) out.

No I/O and no `await`. Reading top to bottom: pick the tables (device models) the job may use, then
visit their pools in the order of the policy's main score (cheapest, nearest, fastest or greenest
first), passing a chunk of rows at a time through the filter list and keeping what survives. A
single-score policy stops as soon as no later row can beat the best; a mixed policy stops after
`limit` feasible pools (as Nomad limits the nodes it scores), so a decision costs about the same over
1,000 or 100,000 sites. Scores are bounded 0-100 and named; ties break by a seed from the job id, so
the same input always gives the same decision. When nothing fits, `explain` walks the same filters.
"""

from __future__ import annotations

import math

import numpy as np

from broker.matching.data import DataRows
from broker.matching.explain import explain
from broker.matching.filters import Active, Chunk
from broker.matching.plan import Plan
from broker.matching.request import CHUNK, LATENCY_REF_MS, LIMIT, RUNNERS_UP, Candidate, Decision, NoFit, Request
from broker.matching.snapshot import PoolTable, Snapshot


def match(req: Request, snap: Snapshot, *, limit: int = LIMIT, exhaustive: bool = False,
          keep: int = RUNNERS_UP + 1, exclude: tuple[str, int] | None = None,
          when_empty: bool = False) -> Decision | NoFit:  # fmt: skip
    """Choose the best pool for `req` in `snap`, or say why none fits.

    Sites in `req.avoid_sites` (the last site that gave the job back) are passed over when another fits.
    `exclude` (model, row) takes one pool out (one reserved for a blocked gang); `when_empty` asks where
    the job would go if every pool were empty of the broker's work (where a blocked gang should wait).
    """
    plan = Plan(req, snap, avoid=req.avoid_sites, exclude=exclude, when_empty=when_empty)
    if plan.avoid.size:
        elsewhere = _decide(plan, limit, exhaustive, keep)
        if elsewhere is not None:
            return elsewhere
        plan = plan.without_avoid()
    return _decide(plan, limit, exhaustive, keep) or explain(plan)


def _decide(plan: Plan, limit: int, exhaustive: bool, keep: int) -> Decision | None:
    active = Active.of(plan)
    tables = [t for t in plan.candidate_tables() if active.admits(plan, t)]
    if not tables or not plan.origin_known:
        return None
    scan = _Scan(plan, active, tables, keep=max(keep, RUNNERS_UP + 1), exhaustive=exhaustive)
    scan.run(limit)
    if not scan.parts:
        return None
    ranked = scan.ranked(keep)
    return Decision(ranked[0], tuple(ranked[1:]), scan.feasible_sites() if exhaustive else 0)


class _Scan:
    """Visits pools in the policy's order, keeps the feasible ones, and scores them together at the end.

    Price scores are relative to the cheapest feasible offer found (100 for it, 50 for twice its cost), so
    they need every kept row: rows are gathered per chunk and scored once, when the scan stops.
    """

    def __init__(self, plan: Plan, active: Active, tables: list[PoolTable], keep: int, exhaustive: bool) -> None:
        self.plan, self.active, self.tables = plan, active, tables
        self.keep = keep
        self.exhaustive = exhaustive
        self.parts: list[Chunk] = []  # the feasible rows of each chunk visited
        self.scored = 0
        weights = plan.weights
        self.single = next(iter(weights)) if len(weights) == 1 else None
        self.order = self.single or max(weights, key=lambda k: weights[k])
        self.best_key = -math.inf  # best value of a one-score policy's score (price: minus the cost)
        perfs = [p for t in tables if (p := plan.speed_perf(t)) > 0]
        self.best_perf = max(perfs) if perfs else float("nan")
        self.lat_ref = plan.req.max_latency_ms or LATENCY_REF_MS
        # per chunk of a job with data (by id, with the chunk itself: an id is reused once its chunk is freed):
        # its transfer, estimated hours, and total cost
        self._moving: dict[int, tuple[Chunk, DataRows, np.ndarray, np.ndarray]] = {}

    # ------------------------------------------------------------------------------------ visiting order

    def segments(self) -> list[tuple[float, PoolTable, np.ndarray, bool]]:
        """(best possible value of the ordering key, table, rows, whether rows are in key order), best first."""
        plan, order, whole = self.plan, self.order, self.plan.req.whole_nodes
        out: list[tuple[float, PoolTable, np.ndarray, bool]] = []
        for table in self.tables:
            if table.size == 0:
                continue
            if plan.data is not None and order in ("price", "speed"):
                out += self._data_segments(table)
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

    def _data_segments(self, table: PoolTable) -> list[tuple[float, PoolTable, np.ndarray, bool]]:
        """A job with data, visited cheapest (or fastest) total first: the rows of each cluster, whose transfer is
        the cluster's (so price order is still key order), then the rows of sites that hold data or measured
        their rate, with a bound from their own values. Moving data only lowers a key, so bounds hold."""
        plan, data, whole = self.plan, self.plan.data, self.plan.req.whole_nodes
        assert data is not None
        rows = table.by_price
        special = data.special_rows(table, rows)
        groups: list[tuple[np.ndarray, int | None]] = []
        if special.any():
            groups.append((rows[special], None))
            rows = rows[~special]
        clusters = table.cluster[rows]
        groups += [(rows[clusters == c], int(c)) for c in np.unique(clusters)]
        need = plan.need(table)
        est = float(plan.est_hours(table, np.array([need], np.int64))[0])
        out: list[tuple[float, PoolTable, np.ndarray, bool]] = []
        for part, c in groups:
            if c is None:
                moving = data.rows(table, part)
                hours, cost = float(np.min(moving.hours)), float(np.min(moving.cost))
            else:
                hours, cost = float(data.cluster_hours[c]), float(data.cluster_cost[c])
            if self.order == "price":
                bound = -(float(table.price[part[0]]) * need * est + cost)
            else:
                bound = 100.0 if whole else self._speed(table, need) * est / (est + hours)
            out.append((bound, table, part, c is not None and not whole))
        return out

    def run(self, limit: int) -> None:
        for bound, table, rows, in_order in self.segments():
            if self.single and self.parts and bound < self.best_key - 1e-9 and not self.exhaustive:
                continue  # nothing in this segment can beat what we have
            need = self.plan.need(table)
            for start in range(0, rows.shape[0], CHUNK):
                hit = self._chunk(Chunk.of(self.plan, table, rows[start : start + CHUNK], need))
                if hit and self.single and in_order and not self.exhaustive:
                    break  # rows are in order of the key: later rows only tie or lose
                if self.scored >= limit and not self.exhaustive and not self.single:
                    return

    def _chunk(self, chunk: Chunk) -> bool:
        """Keep the rows of `chunk` that pass the filters; whether there were any."""
        idx = self.active.sift(self.plan, chunk)
        if idx.size == 0:
            return False
        self.scored += idx.size
        part = chunk.take(idx)
        self.parts.append(part)
        if self.single:
            self.best_key = max(self.best_key, float(np.max(self._key(part))))
        return True

    def _key(self, part: Chunk) -> np.ndarray:
        """The single score a one-score policy ranks by (price: minus the cost, so higher is better)."""
        if self.order == "price":
            return -self._price_basis(part)
        return self._scores(part, 1.0)[self.order]

    def _moved(self, part: Chunk) -> tuple[DataRows, np.ndarray, np.ndarray] | None:
        """For a job with data: moving it to each row of `part`, the run's hours there, and the total cost."""
        data = self.plan.data
        if data is None:
            return None
        found = self._moving.get(id(part))
        if found is None or found[0] is not part:
            moving = data.rows(part.table, part.rows)
            est = self.plan.est_hours(part.table, part.devices)
            found = self._moving[id(part)] = (part, moving, est, part.cost * est + moving.cost)
        return found[1:]

    def _price_basis(self, part: Chunk) -> np.ndarray:
        """What the price score compares: the cost per hour, or with data the total (the run and the move)."""
        moved = self._moved(part)
        return part.cost if moved is None else moved[2]

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
        compute = self.plan.compute
        if compute is not None:  # compute delivered over compute asked: 1 (as asked) scores 50, 2x or more 100
            return min(100.0, 50.0 * (devices * perf / compute))
        return 100.0 * perf / self.best_perf

    def _speeds(self, table: PoolTable, devices: np.ndarray) -> np.ndarray:
        compute, perf = self.plan.compute, self.plan.speed_perf(table)
        if compute is None or perf != perf:
            return np.full(devices.shape[0], self._speed(table, int(devices[0])))
        return np.minimum(100.0, 50.0 * (devices * perf / compute))

    def _scores(self, part: Chunk, best_cost: float) -> dict[str, np.ndarray]:
        table, rows, devices, cost, latency = part.table, part.rows, part.devices, part.cost, part.latency
        known = np.isfinite(latency)
        safe = np.where(known, latency, 0.0)
        per_node = table.per_node[rows]
        remainder = devices % per_node
        fits_partial = (part.free % per_node) >= remainder
        moved = self._moved(part)
        speed = self._speeds(table, devices)
        if moved is not None:  # the total cost; and the speed score scaled by the run's share of the finish time
            cost = moved[2]
            speed = speed * moved[1] / (moved[1] + moved[0].hours)
        return {
            "price": np.where(cost > 0, 100.0 * best_cost / np.maximum(cost, 1e-12), 100.0),
            "latency": np.where(known, 100.0 * np.clip(1.0 - safe / self.lat_ref, 0.0, 1.0), 0.0),
            "speed": speed,
            "green": table.green[rows].astype(np.float64),
            "packing": np.where((remainder == 0) | fits_partial, 100.0, 100.0 * remainder / per_node),
            "west": 100.0 * self.plan.snap.cluster_west[table.cluster[rows]],
            "reliability": table.reliability[rows],
        }  # fmt: skip

    # ------------------------------------------------------------------------------------ ranking

    def ranked(self, keep: int) -> list[Candidate]:
        """Score every kept row, best first, one candidate per site."""
        plan = self.plan
        best_cost = min(float(np.min(self._price_basis(part))) for part in self.parts)
        entries: list[tuple[float, int, int, int]] = []
        scored_parts = []
        for p, part in enumerate(self.parts):
            scores = self._scores(part, best_cost)
            total = np.zeros(part.rows.shape[0])
            for k, w in plan.weights.items():
                total += w * scores[k]
            total /= plan.weight_sum
            # exact ties (and only those) break by a per-job permutation of site ids: replays on any replica
            tie = (part.table.site_hash[part.rows] * np.uint64(2654435761) + np.uint64(plan.seed)) % np.uint64(2**32)
            scored_parts.append(scores)
            for i in np.lexsort((-tie.astype(np.int64), -total))[: keep * 2]:
                entries.append((float(total[i]), int(tie[i]), p, int(i)))
        out: list[Candidate] = []
        sites: set[int] = set()
        for total_i, _tie, p, i in sorted(entries, key=lambda e: (-e[0], -e[1])):
            part = self.parts[p]
            site = int(part.table.site_code[part.rows[i]])
            if site in sites:
                continue
            sites.add(site)
            out.append(self._candidate(part, i, total_i, {k: float(v[i]) for k, v in scored_parts[p].items()}))
            if len(out) >= keep:
                break
        return out

    def feasible_sites(self) -> int:
        codes = [part.table.site_code[part.rows] for part in self.parts]
        return int(np.unique(np.concatenate(codes)).size) if codes else 0

    def _candidate(self, part: Chunk, i: int, total: float, scores: dict[str, float]) -> Candidate:
        plan, table, row = self.plan, part.table, int(part.rows[i])
        snap, req = plan.snap, plan.req
        devices = int(part.devices[i])
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
        moved = self._moved(part)
        return Candidate(site=site, hub=snap.sites[site].hub, model=table.model, arch=table.arch, row=row,
                         devices=devices, free=int(part.free[i]), price=float(part.price[i]),
                         cost_per_hour=float(part.cost[i]), unit_price=float(part.unit_price[i]),
                         latency_ms=float(part.latency[i]), est_hours=est if est == est else req.duration_hours,
                         score=total, scores=named, stack=stack, image=requirement.image if requirement else None,
                         transfer_hours=float(moved[0].hours[i]) if moved else 0.0,
                         transfer_cost=float(moved[0].cost[i]) if moved else 0.0,
                         reliability=float(table.reliability[row]))  # fmt: skip
