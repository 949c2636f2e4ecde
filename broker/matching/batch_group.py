"""The groups of a batch: pools prepared once for one kind of job, and the sequential part of its jobs.

`broker.matching.batch` describes the design; this module holds the machinery. `Shared` is what every
group of one batch shares (the snapshot, the log of takes, plans, admitted tables, segments); a `Group`
prepares the chunks its jobs reach, in visiting order, and decides its jobs one at a time.
"""

from __future__ import annotations

import bisect
import itertools
import math
import zlib
from typing import Any

import numpy as np

from broker.matching.batch_shared import Shared
from broker.matching.explain import explain
from broker.matching.filters import Active, Chunk, RowFilter
from broker.matching.plan import Plan
from broker.matching.request import CHUNK, RUNNERS_UP, Candidate, Decision, NoFit, Request
from broker.matching.scan import _Scan
from broker.matching.snapshot import PoolTable

# The filters whose outcome depends on the moment or on the job alone: applied per job, never prepared.
DYNAMIC = frozenset({"capacity", "when_empty", "reserved", "avoided"})
PIECE = 4  # chunks prepared at once
MARGIN = 1e-7  # proxy scores this close to the cut are scored exactly (the proxy errs by about 1e-13)
MANY = 16  # rows to score exactly past which one vector pass is cheaper than one row at a time
FIRST_CUT = 0.5  # points below the best proxy score the first candidate cut reaches
BUDGET = 1_000_000  # rows a batch keeps prepared (about 130 bytes each)
_KNUTH = 2654435761
_NEG = -math.inf


class _Variant:
    """What one origin adds to a group: latency, the late filters' outcome, the latency score."""

    def __init__(self, req: Request, plan: Plan) -> None:
        self.req, self.plan = req, plan
        self.size = 0
        self.latency = np.zeros(0, np.float32)
        self.ok: np.ndarray | None = None
        self.score = np.zeros(0, np.float32)
        self.term = np.zeros(0, np.float32)
        self.fixed: np.ndarray | None = None  # the weighted scores all its jobs share, summed ahead, over the sum


class Group:
    """The pools one kind of job may use, prepared in visiting order, and the sequential part of its jobs."""

    def __init__(self, shared: Shared, req: Request, *, fixed_count: bool) -> None:
        self.shared = shared
        self.snap = shared.snap
        self.plan = shared.plan(req)
        self.active = Active.of(self.plan)
        self.static = tuple(f for f in self.active.rows if f.name not in DYNAMIC)
        self.late: tuple[RowFilter, ...] = tuple(f for f in self.active.late if f.name not in DYNAMIC)
        self.tables = shared.tables(self.plan, self.active)
        self.table_index = {t.model: i for i, t in enumerate(self.tables)}
        self.tids = [shared.table_ids[t.model] for t in self.tables]
        self.perfs = [self.plan.speed_perf(t) for t in self.tables]
        self.scan = _Scan(self.plan, self.active, self.tables, keep=RUNNERS_UP + 1, exhaustive=False)
        self.weights = list(self.plan.weights.items())
        self.weight_sum = self.plan.weight_sum
        self.single = self.scan.single is not None
        self.order = self.scan.order
        self.static_keys = [k for k, _ in self.weights if k in ("speed", "green", "west", "reliability")]
        ready = self.tables and self.plan.origin_known
        self.segments = shared.segments(self.plan, self.scan, self.tables) if ready else []
        self.seg_chunks = [-(-s[2].shape[0] // CHUNK) for s in self.segments]
        self.per_row_devices = req.count is None or req.whole_nodes  # else every row needs the job's count
        self.count_free = fixed_count or self._order_ignores_count()
        self.unsupported = False  # a case `match` decides (a pool priced at zero under a mixed policy)
        # chunks are numbered in visiting order: segment by segment, chunk by chunk
        self.seg_base = [0, *itertools.accumulate(self.seg_chunks)]
        self.n_chunks = self.seg_base[-1]
        self.next_chunk = 0  # a mixed policy prepares chunks in visiting order: the first not prepared
        self.chunk_at: dict[int, tuple[int, int]] = {}  # chunk -> its prepared rows' positions
        self.size = 0
        self.cols: dict[str, np.ndarray] = {}
        self.bulks: list[tuple[PoolTable, Chunk, np.ndarray, int]] = []  # (table, chunk, rows that passed, start)
        self.pending: list[dict[str, np.ndarray]] = []  # columns prepared since the last join
        self.pending_rows = 0
        self.variants: dict[str, _Variant] = {}
        self.seen = shared.takes
        self.table_seen = self._table_takes()
        self.per_node = 0
        self.fixed_terms: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.nofits: dict[tuple[Any, ...], tuple[tuple[int, Any], NoFit]] = {}
        self.free_version = 0  # bumps when a joined row's free count changes: NoFits are kept until then
        self.stacks: dict[int, tuple[Any, str | None]] = {}
        self.gens = [t.gen for t in self.tables]  # what the prepared rows were read from
        self.reliability_seen = [t.reliability_version for t in self.tables]

    def _order_ignores_count(self) -> bool:
        """Whether every device count visits the tables in one order (cheapest first: unless two tables'
        cheapest prices are so close that multiplying by a count could round them equal)."""
        if self.order != "price":
            return True
        floors = sorted({float(t.price[t.by_price[0]]) for t in self.tables if t.size})
        return all(b > a * (1 + 1e-12) and a > 0 for a, b in itertools.pairwise(floors))

    def rebind(self, shared: Shared) -> bool:
        """Take this group, prepared in an earlier batch, into the batch of `shared`: False (drop it) when
        something but the counts changed in one of its tables since. Its rows passed the fixed filters,
        which read nothing the counts change, so only the free counts are read again."""
        if self._stale(shared):
            return False
        self.shared = shared
        self.seen, self.table_seen = shared.takes, self._table_takes()
        if self.unsupported:
            return True
        self._flatten()
        if not self.size or self.unsupported:
            return True
        cols = self.cols
        tab, row, free = cols["tab"], cols["row"], cols["free"]
        single = len(self.tables) == 1
        for ti, table in enumerate(self.tables):
            pos = None if single else np.flatnonzero(tab == ti)
            rows = row if pos is None else row[pos]
            now = table.total[rows] - table.external[rows] if self.plan.when_empty else table.free(rows)
            if not np.array_equal(now, free if pos is None else free[pos]):
                self.free_version += 1
            if pos is None:
                free[:] = now
            else:
                free[pos] = now
        cols["free_mod"] = free % cols["per_node"]
        self._reread_reliability()
        cols["g"] = shared.offset[np.asarray(self.tids, np.int64)[tab]] + row  # other tables may have grown
        return True

    def _reread_reliability(self) -> None:
        """Read the sites' reliability scores again, like the free counts: they move with sites' outcomes
        without bumping a table's `gen`, so a kept group must not rank by the old ones."""
        cols = self.cols
        if "s:reliability" not in cols:
            return
        versions = [t.reliability_version for t in self.tables]
        if versions == self.reliability_seen:
            return  # no score in the group's tables moved
        self.reliability_seen = versions
        tab, row = cols["tab"], cols["row"]
        now = np.empty(self.size, np.float64)
        for ti, table in enumerate(self.tables):
            pos = np.flatnonzero(tab == ti)
            now[pos] = table.reliability[row[pos]]
        if np.array_equal(now, cols["s:reliability"]):
            return
        cols["s:reliability"] = now
        cols["t:reliability"] = self.plan.weights["reliability"] * now
        self.fixed_terms["reliability"] = (now, cols["t:reliability"])
        for variant in self.variants.values():
            variant.fixed = None  # the proxy's sum of fixed terms

    def _stale(self, shared: Shared) -> bool:
        """Whether more than the counts changed in the group's tables since it was prepared."""
        return shared.snap is not self.snap or [t.gen for t in self.tables] != self.gens

    def _table_takes(self) -> int:
        takes = self.shared.table_takes
        return sum(takes[t] for t in self.tids)

    # ------------------------------------------------------------------------------------ preparing

    def _prepare(self, chunks: list[int]) -> None:
        """Run the fixed filters over `chunks` (one pass per table) and keep the rows that pass."""
        plan, shared = self.plan, self.shared
        by_table: dict[str, list[tuple[int, np.ndarray]]] = {}
        for c in chunks:
            si = bisect.bisect_right(self.seg_base, c) - 1
            _, table, rows, _, _ = self.segments[si]
            k = c - self.seg_base[si]
            by_table.setdefault(table.model, []).append((c, rows[k * CHUNK : (k + 1) * CHUNK]))
        for model, parts in by_table.items():
            table = self.tables[self.table_index[model]]
            sizes = [rows.shape[0] for _, rows in parts]
            chunk = Chunk.of(plan, table, np.concatenate([rows for _, rows in parts]), plan.need(table))
            ok = np.ones(chunk.rows.shape[0], np.bool_)
            for f in self.static:
                ok &= f.keep(plan, chunk)
            idx = np.flatnonzero(ok)
            ends = list(itertools.accumulate(sizes))
            cuts = np.searchsorted(idx, ends).tolist()
            start = self.size + self.pending_rows
            for (c, _), lo, hi in zip(parts, [0, *cuts], cuts, strict=False):
                self.chunk_at[c] = (start + lo, start + hi)
            n = idx.shape[0]
            if n == 0:
                continue
            counts = np.diff([0, *cuts])
            prow = chunk.rows[idx]
            first = np.repeat(np.array([c for c, _ in parts], np.int64), counts)
            raw_start = np.repeat(np.array([0, *ends[:-1]], np.int64), counts)
            cols = {"tab": np.full(n, self.table_index[model], np.int64), "row": prow,
                    "g": shared.offset[shared.table_ids[model]] + prow, "price": chunk.price[idx],
                    "free": chunk.free[idx], "per_node": table.per_node[prow], "site": table.site_code[prow],
                    "hash": table.site_hash[prow], "chunk": first, "offset": idx - raw_start}  # fmt: skip
            devices = chunk.devices[idx]
            if self.per_row_devices:
                cols["devices"], cols["cost"] = devices, chunk.cost[idx]
            for key in self.static_keys:
                if key == "speed":
                    cols["s:speed"] = self.scan._speeds(table, devices).astype(np.float64)
                elif key == "green":
                    cols["s:green"] = table.green[prow].astype(np.float64)
                elif key == "reliability":
                    cols["s:reliability"] = table.reliability[prow]
                else:
                    cols["s:west"] = 100.0 * self.snap.cluster_west[table.cluster[prow]]
            self.pending.append(cols)
            self.bulks.append((table, chunk, idx, start))
            self.pending_rows += n
            shared.rows_held += n

    def _prepare_next(self, wanted: int) -> bool:
        """Prepare the next chunks in visiting order, about `wanted` rows of them (at least as many as are
        prepared, so a sparse group gets there in few steps); False when every chunk is prepared."""
        wanted = max(wanted, self.size, CHUNK)
        chunks: list[int] = []
        rows = 0
        while self.next_chunk < self.n_chunks and rows < wanted:
            c = self.next_chunk
            si = bisect.bisect_right(self.seg_base, c) - 1
            rows += min(CHUNK, self.segments[si][2].shape[0] - (c - self.seg_base[si]) * CHUNK)
            chunks.append(c)
            self.next_chunk += 1
        if chunks:
            self._prepare(chunks)
        return bool(chunks)

    def _flatten(self) -> None:
        """Join the rows prepared since the last join to the flat columns (origins extend on next use)."""
        if not self.pending:
            return
        old = self.cols
        parts = ([old] if old else []) + self.pending
        self.cols = cols = {name: np.concatenate([p[name] for p in parts]) for name in self.pending[0]}
        self.pending, self.pending_rows = [], 0
        self.size = cols["tab"].shape[0]
        unit = cols["cost"] if self.per_row_devices else cols["price"]
        if not self.single and not bool(np.all(unit > 0)):
            self.unsupported = True  # a free pool: the price score's special case
            return
        cols["unit"], cols["inv"] = unit, 1.0 / unit
        for key, w in self.weights:
            if key in self.static_keys:
                cols["t:" + key] = w * cols["s:" + key]
        per_node = cols["per_node"]
        self.per_node = int(per_node[0]) if per_node.min() == per_node.max() else 0
        self.fixed_terms = {key: (cols["s:" + key], cols["t:" + key]) for key in self.static_keys}
        cols["free_mod"] = cols["free"] % per_node
        for variant in self.variants.values():
            variant.fixed = None

    def _variant(self, req: Request) -> _Variant:
        """The origin's columns, for every joined row."""
        variant = self.variants.get(req.origin)
        if variant is None:
            variant = self.variants[req.origin] = _Variant(req, self.shared.plan(req))
        if variant.size == self.size:
            return variant
        lat, oks = [variant.latency], [variant.ok] if variant.ok is not None else []
        for table, chunk, idx, start in self.bulks:
            if start < variant.size:
                continue
            latency = self.snap.latency(table, chunk.rows[idx], req.origin)
            lat.append(latency)
            if self.late:  # the late filters see the rows as the scan's chunk would, with this origin
                part = chunk.take(idx)
                part._origin, part._latency = req.origin, latency
                ok = np.ones(idx.shape[0], np.bool_)
                for f in self.late:
                    ok &= f.keep(variant.plan, part)
                oks.append(ok)
        w = self.plan.weights.get("latency")
        if w is not None:  # the scan's latency score, on the same float32 values, for the new rows
            new = np.concatenate(lat[1:])
            known = np.isfinite(new)
            safe = np.where(known, new, 0.0)
            score = np.where(known, 100.0 * np.clip(1.0 - safe / self.scan.lat_ref, 0.0, 1.0), 0.0)
            variant.score = np.concatenate([variant.score, score])
            variant.term = np.concatenate([variant.term, w * score])
        variant.latency = np.concatenate(lat)
        variant.ok = np.concatenate(oks) if self.late else None
        variant.size = self.size
        variant.fixed = None
        return variant

    def _proxy(self, variant: _Variant, devices: int | None, unit_min: float) -> np.ndarray:
        """The total score of every row summed in another order (the scan's order matters only in the
        last bits): the weighted fixed scores, the price score from `unit_min`, the packing score."""
        cols, w_sum = self.cols, self.weight_sum
        if variant.fixed is None:
            fixed = np.zeros(self.size)
            for key, _ in self.weights:
                if key == "latency":
                    fixed += variant.term
                elif key in self.static_keys:
                    fixed += cols["t:" + key]
            variant.fixed = fixed / w_sum
        score = cols["inv"] * (self.plan.weights.get("price", 0.0) * 100.0 * unit_min / w_sum)
        score += variant.fixed
        w = self.plan.weights.get("packing")
        if w is None:
            return score
        if devices is not None and self.per_node:  # one node size: a fit, or one partial score for all
            remainder = devices % self.per_node
            if remainder == 0:
                score += w * 100.0 / w_sum
            else:
                partial = w * 100.0 * remainder / self.per_node / w_sum
                score += np.where(cols["free_mod"] >= remainder, w * 100.0 / w_sum, partial)
        else:
            need = cols["devices"] if devices is None else devices
            score += (w / w_sum) * _packing(need, cols["free"], cols["per_node"])
        return score

    # ------------------------------------------------------------------------------------ takes

    def _sync(self) -> None:
        """Read the free count again for the joined rows that takes touched since this group last looked."""
        shared = self.shared
        if self.seen == shared.takes or shared.stamp is None or not self.size:
            self.seen = shared.takes
            return
        in_tables = self._table_takes()
        if in_tables == self.table_seen:  # no take in this group's tables
            self.seen = shared.takes
            return
        touched = np.flatnonzero(shared.stamp[self.cols["g"]] >= self.seen)
        self.seen, self.table_seen = shared.takes, in_tables
        if not touched.shape[0]:
            return
        self.free_version += 1
        cols, now = self.cols, shared.free
        free, free_mod, per_node, g = cols["free"], cols["free_mod"], cols["per_node"], cols["g"]
        for pos in touched.tolist():
            free[pos] = count = now[g.item(pos)]
            free_mod[pos] = count % per_node.item(pos)

    def _position(self, pool: tuple[str, int] | None) -> int | None:
        """The joined position of a pool (model, row), if it is joined."""
        if pool is None or pool[0] not in self.table_index or not self.size:
            return None
        hits = np.flatnonzero((self.cols["row"] == pool[1]) & (self.cols["tab"] == self.table_index[pool[0]]))
        return int(hits[0]) if hits.shape[0] else None

    # ------------------------------------------------------------------------------------ deciding

    def decide(self, req: Request, exclude: tuple[str, int] | None) -> Decision | NoFit | None:
        """The job's decision, or None when `match` should decide it (a case found while preparing)."""
        self._sync()
        decided = None
        if self.segments:
            decided = self._single(req, exclude) if self.single else self._mixed(req, exclude)
        if self.unsupported:
            return None
        return decided if decided is not None else self._nofit(req, exclude)

    def _feasible(self, variant: _Variant, devices: int | None, exclude: int | None,
                  lo: int = 0, hi: int | None = None) -> np.ndarray:  # fmt: skip
        """Which joined rows in [lo, hi) the job may use now: capacity, the late filters, the held pool."""
        cols = self.cols
        hi = self.size if hi is None else hi
        ok = cols["free"][lo:hi] >= (cols["devices"][lo:hi] if devices is None else devices)
        if variant.ok is not None:
            ok &= variant.ok[lo:hi]
        if exclude is not None and lo <= exclude < hi:
            ok[exclude - lo] = False
        return ok

    def _mixed(self, req: Request, held: tuple[str, int] | None) -> Decision | None:
        """A mixed policy: the rows of the chunks up to where `limit` rows fit, ranked by the proxy."""
        devices = None if self.per_row_devices else req.count
        limit = self.shared.limit
        while True:
            self._flatten()
            if self.unsupported:
                return None
            fits = 0
            if self.size:
                variant = self._variant(req)
                ok = self._feasible(variant, devices, self._position(held))
                cum = np.cumsum(np.bincount(self.cols["chunk"], weights=ok, minlength=self.next_chunk))
                last = int(np.searchsorted(cum, limit))  # the scan stops after chunk `last`
                if last < cum.shape[0]:
                    ok &= self.cols["chunk"] <= last
                    break
                fits = int(cum[-1])
            if not self._prepare_next(2 * (limit - fits)):
                if not fits:
                    return None
                break
        cols = self.cols
        unit_min = float(cols["unit"][ok].min())
        best_cost = unit_min if devices is None else unit_min * devices
        score = np.where(ok, self._proxy(variant, devices, unit_min), _NEG)
        picks = _cut(score, cols["site"], self.shared.keep, MARGIN)
        return self._decision(req, variant, devices, best_cost, picks)

    def _single(self, req: Request, held: tuple[str, int] | None) -> Decision | None:
        """A one-score policy: the scan's own stop rules replayed chunk by chunk, then exact scores."""
        devices = None if self.per_row_devices else req.count
        parts: list[np.ndarray] = []
        best_key = _NEG
        variant = None
        for si, (bound, _table, _rows, in_order, _kind) in enumerate(self.segments):
            if parts and bound < best_key - 1e-9:
                continue  # nothing in this segment can beat what we have
            for k in range(self.seg_chunks[si]):
                c = self.seg_base[si] + k
                if c not in self.chunk_at:  # prepare this chunk and the next few of the segment
                    self._prepare(list(range(c, min(c + PIECE, self.seg_base[si + 1]))))
                start, stop = self.chunk_at[c]
                if stop == start:
                    continue
                self._flatten()
                variant = self._variant(req)
                ok = self._feasible(variant, devices, self._position(held), start, stop)
                if not ok.any():
                    continue
                idx = start + np.flatnonzero(ok)
                parts.append(idx)
                best_key = max(best_key, float(np.max(self._key(variant, idx, devices))))
                if in_order:
                    break
        if not parts or variant is None:
            return None
        rows = np.concatenate(parts)
        cost = self.cols["cost"][rows] if devices is None else self.cols["price"][rows] * devices
        best_cost = float(np.min(cost))
        if self.order == "price":
            score = np.where(cost > 0, 100.0 * best_cost / np.maximum(cost, 1e-12), 100.0)
        else:
            score = variant.score[rows] if self.order == "latency" else self.cols["s:" + self.order][rows]
        total = np.zeros(rows.shape[0])
        total += self.weights[0][1] * score
        total /= self.weight_sum
        picks = _cut(total, self.cols["site"][rows], self.shared.keep, 0.0)
        return self._decision(req, variant, devices, best_cost, rows[picks].tolist())

    def _key(self, variant: _Variant, rows: np.ndarray, devices: int | None) -> np.ndarray:
        """The score a one-score policy visits by (price: minus the cost)."""
        if self.order == "price":
            return -(self.cols["cost"][rows] if devices is None else self.cols["price"][rows] * devices)
        if self.order == "latency":
            return variant.score[rows]
        return self.cols["s:" + self.order][rows]

    # ------------------------------------------------------------------------------------ exact scores

    def _decision(self, req: Request, variant: _Variant, devices: int | None, best_cost: float,
                  picks: list[int]) -> Decision:  # fmt: skip
        """Score `picks` exactly as the scan does and keep the best sites, in the scan's order: by total,
        then the job's tie-break, then the order of the visit."""
        cols = self.cols
        seed = zlib.crc32(req.job_id.encode())
        site_hash, chunk, offset = cols["hash"], cols["chunk"], cols["offset"]
        entries: list[tuple[float, int, int, int, Any]] = []
        if len(picks) > MANY:
            totals, columns = self._exact_many(picks, variant, devices, best_cost)
            for i, pos in enumerate(picks):
                tie = (site_hash.item(pos) * _KNUTH + seed) % 4294967296
                visited = chunk.item(pos) * CHUNK + offset.item(pos)  # the scan's order of the visit
                entries.append((-totals[i], -tie, visited, pos, i))
        else:
            for pos in picks:
                total, scores = self._exact(pos, variant, devices, best_cost)
                tie = (site_hash.item(pos) * _KNUTH + seed) % 4294967296
                visited = chunk.item(pos) * CHUNK + offset.item(pos)
                entries.append((-total, -tie, visited, pos, scores))
        entries.sort(key=lambda e: (e[0], e[1], e[2]))
        chosen: list[Candidate] = []
        sites: set[int] = set()
        site = cols["site"]
        for neg_total, _tie, _vkey, pos, scores in entries:
            code = site.item(pos)
            if code in sites:
                continue
            sites.add(code)
            if isinstance(scores, int):  # a row of the vector pass: its named scores
                scores = {key: values[scores] for key, values in columns.items()}
            chosen.append(self._candidate(req, variant, pos, devices, -neg_total, scores))
            if len(chosen) >= self.shared.keep:
                break
        return Decision(chosen[0], tuple(chosen[1:]), 0)

    def _exact(self, pos: int, variant: _Variant, devices: int | None,
               best_cost: float) -> tuple[float, dict[str, float]]:  # fmt: skip
        """The scan's total for one row and its named scores: the scan's `_scores` and `ranked` operation for
        operation, in the same order, on the same values (float32 terms are added as the scan adds them)."""
        cols = self.cols
        total = 0.0
        scores: dict[str, float] = {}
        for key, w in self.weights:
            if key in self.fixed_terms:
                score_col, term_col = self.fixed_terms[key]
                scores[key] = score_col.item(pos)
                total += term_col.item(pos)
                continue
            if key == "price":
                cost = cols["cost"].item(pos) if devices is None else cols["price"].item(pos) * devices
                score = 100.0 * best_cost / max(cost, 1e-12) if cost > 0 else 100.0
                total += w * score
            elif key == "packing":
                need = cols["devices"].item(pos) if devices is None else devices
                per_node = cols["per_node"].item(pos)
                remainder = need % per_node
                score = 100.0 if remainder == 0 or cols["free"].item(pos) % per_node >= remainder else (
                    100.0 * remainder / per_node)  # fmt: skip
                total += w * score
            elif key == "latency":
                score = variant.score.item(pos)
                total += variant.term.item(pos)
            else:
                score = cols["s:" + key].item(pos)
                total += cols["t:" + key].item(pos)
            scores[key] = score
        return total / self.weight_sum, scores

    def _exact_many(self, picks: list[int], variant: _Variant, devices: int | None,
                    best_cost: float) -> tuple[list[float], dict[str, list[float]]]:  # fmt: skip
        """`_exact` for many rows at once: their totals and named scores, with the scan's own vector
        expressions (elementwise, so the same values)."""
        cols = self.cols
        at = np.array(picks, np.int64)
        cost = cols["cost"][at] if devices is None else cols["price"][at] * devices
        total = np.zeros(at.shape[0])
        scores: dict[str, np.ndarray] = {}
        for key, w in self.weights:
            if key in self.fixed_terms:
                score_col, term_col = self.fixed_terms[key]
                score = score_col[at]
                total += term_col[at]
            elif key == "price":
                score = np.where(cost > 0, 100.0 * best_cost / np.maximum(cost, 1e-12), 100.0)
                total += w * score
            elif key == "packing":
                need = cols["devices"][at] if devices is None else devices
                score = _packing(need, cols["free"][at], cols["per_node"][at])
                total += w * score
            else:
                score = variant.score[at]
                total += variant.term[at]
            scores[key] = score
        total /= self.weight_sum
        return total.tolist(), {key: score.tolist() for key, score in scores.items()}

    def _candidate(self, req: Request, variant: _Variant, pos: int, devices: int | None, total: float,
                   scores: dict[str, float]) -> Candidate:  # fmt: skip
        """What the scan's `_candidate` builds, for one joined row."""
        cols, snap = self.cols, self.snap
        ti = cols["tab"].item(pos)
        table, perf = self.tables[ti], self.perfs[ti]
        row = cols["row"].item(pos)
        n = cols["devices"].item(pos) if devices is None else devices
        price = cols["price"].item(pos)
        cost = cols["cost"].item(pos) if devices is None else price * n
        site = snap.site_names[cols["site"].item(pos)]
        requirement, stack = self._stack(table, row)
        if req.units is not None and perf > 0:
            est = req.duration_hours * req.units * self.plan.reference_perf / (n * perf)
        elif req.models and perf > 0 and req.models[0] in snap.tables:
            est = req.duration_hours * snap.tables[req.models[0]].perf_for(req.workload) / perf
        else:
            est = req.duration_hours
        return Candidate(site=site, hub=snap.sites[site].hub, model=table.model, arch=table.arch, row=row,
                         devices=n, free=cols["free"].item(pos), price=price, cost_per_hour=cost,
                         unit_price=cost / req.units if req.units is not None else price,
                         latency_ms=variant.latency.item(pos), est_hours=est if est == est else req.duration_hours,
                         score=total, scores=scores, stack=stack,
                         image=requirement.image if requirement else None,
                         reliability=float(table.reliability[row]))  # fmt: skip

    def _stack(self, table: PoolTable, row: int) -> tuple[Any, str | None]:
        """The requirement a pool satisfies first and the tag it satisfies it with (per stack set)."""
        req, snap = self.plan.req, self.snap
        if not req.software:
            return None, None
        stackset = int(table.stackset[row])
        found = self.stacks.get(stackset)
        if found is None:
            requirement = req.software[int(self.plan.stack_ok[stackset])]
            tags = (f"{n}-{v}" if v else n for n, v in snap.stacksets[stackset])
            found = self.stacks[stackset] = (requirement, next((t for t in tags if requirement.admits(t)), None))
        return found

    def _nofit(self, req: Request, exclude: tuple[str, int] | None) -> NoFit:
        """`explain` with the job's own plan (the same filter list); shared by equal jobs, in this batch and
        later ones, until a free count of the group's rows changes. A NoFit comes only once every chunk is
        prepared, so the group's rows are all its tables' rows that pass the fixed filters: what the capacity
        reasons count; every other reason (over every site, in every table) reads only what a new site or a
        table's `gen` moves."""
        key = (req.count, req.origin, exclude)
        found = self.nofits.get(key)
        seen = (self.free_version, self.shared.facts)
        if found is not None and found[0] == seen:
            return found[1]
        result = explain(self.shared.plan(req, exclude))
        self.nofits[key] = (seen, result)
        return result


def _packing(devices: int | np.ndarray, free: np.ndarray, per_node: np.ndarray) -> np.ndarray:
    """The scan's packing score."""
    remainder = devices % per_node
    fits_partial = (free % per_node) >= remainder
    return np.where((remainder == 0) | fits_partial, 100.0, 100.0 * remainder / per_node)


def _cut(score: np.ndarray, sites: np.ndarray, keep: int, margin: float) -> list[int]:
    """Positions that may hold one of the best `keep` sites' best rows: every position scoring at least
    the `keep`-th best site's best less `margin` (every finite one when fewer sites have any).

    Looks first only just below the top, then four times further each time, so a dense top costs a
    few small sorts rather than one of every row."""
    if not score.shape[0]:
        return []
    top = float(score.max())
    if top == _NEG:
        return []
    drop = FIRST_CUT
    while True:
        floor = top - drop if drop < 1e6 else _NEG
        idx = np.flatnonzero(score >= floor) if floor > _NEG else np.flatnonzero(score > _NEG)
        values = score[idx]
        order = np.argsort(-values, kind="stable")
        seen: set[int] = set()
        for value, code in zip(values[order].tolist(), sites[idx[order]].tolist(), strict=True):
            seen.add(code)
            if len(seen) == keep:
                cut = value - margin
                if cut >= floor:
                    return list(idx[values >= cut].tolist())
                return list(np.flatnonzero(score >= cut).tolist())
        if floor == _NEG:
            return list(idx.tolist())
        drop *= 4
