"""The pure matcher: a job and a snapshot in, a decision (or the reasons there is none) out.

No I/O and no `await`: the scheduler loads the snapshot and commits the decision. Filters run cheapest
first over whole columns; every site a filter removes is counted under that filter's reason, so a queued
job can say why. Scores are bounded 0-100 and named; ties break by a seed from the job id, so the same
input always gives the same decision.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from broker.schemas import JobSpec
from broker.snapshot import PoolTable, Snapshot

# Weights of the default policy: cheapest first, then nearest.
PRICE_WEIGHT = 0.6
LATENCY_WEIGHT = 0.4
RUNNERS_UP = 3


@dataclass(frozen=True, slots=True)
class Request:
    """What the matcher needs from a job."""

    job_id: str
    arch: str
    models: tuple[str, ...]
    count: int
    min_memory_gb: float
    origin: str
    max_latency_ms: float | None
    max_price: float | None
    duration_hours: float = 1.0
    name: str = ""
    workload: str = "general"

    @classmethod
    def of(cls, job_id: str, spec: JobSpec) -> Request:
        r = spec.resources
        return cls(job_id, r.arch.value, r.models, r.count, r.min_memory_gb, spec.origin, spec.max_latency_ms,
                   spec.max_price_cny_per_hour, spec.duration_hours, spec.name, spec.workload)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Candidate:
    site: str
    hub: str
    model: str
    arch: str
    row: int
    free: int
    price: float
    latency_ms: float
    score: float
    scores: dict[str, float]

    def as_dict(self) -> dict[str, object]:
        return {"site": self.site, "hub": self.hub, "model": self.model, "free": self.free,
                "price_cny_per_hour": self.price, "latency_ms": round(self.latency_ms, 2),
                "score": round(self.score, 2), "scores": {k: round(v, 2) for k, v in self.scores.items()}}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Decision:
    chosen: Candidate
    runners_up: tuple[Candidate, ...]


@dataclass(frozen=True, slots=True)
class NoFit:
    """Why no site can take the job now: (reason, number of sites it rules out), most common first."""

    reasons: tuple[tuple[str, int], ...]

    @property
    def message(self) -> str:
        if not self.reasons:
            return "no sites known yet"
        return "; ".join(f"{n} site{'s' if n != 1 else ''}: {reason}" for reason, n in self.reasons)


def _stage_reasons(req: Request, snap: Snapshot) -> list[str]:
    models = ", ".join(req.models)
    return [
        "site offline",
        f"no {models} pool",
        f"no pool with >= {req.min_memory_gb:g} GB",
        f"price above {req.max_price:g} CNY/h" if req.max_price is not None else "price",
        f"latency from {req.origin} above {req.max_latency_ms:g} ms" if req.max_latency_ms is not None else "latency",
        f"fewer than {req.count} devices free",
    ]


def match(req: Request, snap: Snapshot) -> Decision | NoFit:
    """Choose the best pool for `req` in `snap`, or say why none fits."""
    known_sites = len(snap.sites)
    table = snap.tables.get(req.arch)
    origin = snap.origins.get(req.origin)
    if table is None or table.size == 0:
        return NoFit(((f"no {req.arch} pool", known_sites),) if known_sites else ())
    if origin is None:
        return NoFit(((f"unknown origin {req.origin}", known_sites),))
    n = table.size
    latency = table.latency[:n, origin]
    free = table.free()
    # Each stage is a mask of rows that pass it; a row's stage is the first one it fails.
    stages = [
        table.online[:n],
        np.isin(table.model_code[:n], [snap.models.get(m, -1) for m in req.models]) if req.models else None,
        table.memory_gb[:n] >= req.min_memory_gb if req.min_memory_gb > 0 else None,
        table.price[:n] <= req.max_price if req.max_price is not None else None,
        latency <= req.max_latency_ms if req.max_latency_ms is not None else None,
        free >= req.count,
    ]
    passing = np.ones(n, np.bool_)
    for stage in stages:
        if stage is not None:
            passing &= stage
    rows = np.flatnonzero(passing)
    if rows.size == 0:
        return _explain(req, snap, table, stages)
    return _select(req, snap, table, rows, latency, free)


def _select(req: Request, snap: Snapshot, table: PoolTable, rows: np.ndarray, latency: np.ndarray,
            free: np.ndarray) -> Decision:  # fmt: skip
    price = table.price[rows]
    lat = latency[rows]
    price_ref = req.max_price if req.max_price is not None else float(price.max())
    # A site at no known place has no latency estimate: it scores 0 on latency and sets no reference.
    known = np.isfinite(lat)
    if req.max_latency_ms is not None:
        lat_ref = req.max_latency_ms
    else:
        lat_ref = float(lat[known].max()) if known.any() else 1.0
    price_score = 100.0 * (1.0 - price / max(price_ref, 1e-9))
    latency_score = np.where(known, 100.0 * (1.0 - np.where(known, lat, 0.0) / max(lat_ref, 1e-9)), 0.0)
    total = PRICE_WEIGHT * np.clip(price_score, 0, 100) + LATENCY_WEIGHT * np.clip(latency_score, 0, 100)
    # Deterministic tie-break: a per-job permutation of sites, far below any real score difference.
    seed = zlib.crc32(req.job_id.encode())
    jitter = ((table.site_code[rows].astype(np.uint64) * 2654435761 + seed) % 1_000_003) * 1e-9
    order = np.argsort(-(total + jitter), kind="stable")
    picked: list[Candidate] = []
    seen_sites: set[int] = set()
    for i in order:
        code = int(table.site_code[rows[i]])
        if code in seen_sites:
            continue
        seen_sites.add(code)
        row = int(rows[i])
        site = snap.site_names[code]
        picked.append(Candidate(
            site=site, hub=snap.sites[site].hub, model=snap.model_names[int(table.model_code[row])], arch=table.arch,
            row=row, free=int(free[row]), price=float(price[i]), latency_ms=float(lat[i]), score=float(total[i]),
            scores={"price": float(np.clip(price_score[i], 0, 100)),
                    "latency": float(np.clip(latency_score[i], 0, 100))},
        ))  # fmt: skip
        if len(picked) > RUNNERS_UP:
            break
    return Decision(picked[0], tuple(picked[1:]))


def _explain(req: Request, snap: Snapshot, table: PoolTable, stages: list[np.ndarray | None]) -> NoFit:
    """Count, per reason, the sites whose best pool got no further than that filter."""
    n = table.size
    reached = np.zeros(n, np.int8)
    alive = np.ones(n, np.bool_)
    for i, stage in enumerate(stages):
        if stage is not None:
            alive &= stage
        reached[alive] = i + 1
    best = np.full(len(snap.site_names), -1, np.int8)
    np.maximum.at(best, table.site_code[:n], reached)
    labels = _stage_reasons(req, snap)
    counts: dict[str, int] = {}
    for stage_index in range(len(stages)):
        n_sites = int(np.count_nonzero(best == stage_index))
        if n_sites:
            counts[labels[stage_index]] = n_sites
    without_arch = len(snap.sites) - int(np.count_nonzero(best >= 0))
    if without_arch:
        counts[f"no {req.arch} pool"] = without_arch
    return NoFit(tuple(sorted(counts.items(), key=lambda item: (-item[1], item[0]))))
