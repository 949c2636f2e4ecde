"""`suanwang bench --matching`: the cost of one decision as the network grows, with no I/O at all.

A snapshot of N synthetic sites (the demo fleet's sites cloned with jittered sizes and prices, about
a quarter of their capacity already taken) is matched against the same set of sample jobs at every
size, so the figures compare like with like.
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Any, cast

from adapters.fleet import all_sites
from broker.matching import Decision, Request, match
from broker.matching.snapshot import Snapshot
from broker.model.job import JobSpec
from broker.model.records import PoolCounts, SiteRecord, counter_fields
from regions import load_geography
from suanwang.samples import sample_job

# Jobs that ask for compute rather than devices, across chip families (the issue's own example first).
EQUIVALENT_JOBS: tuple[dict[str, Any], ...] = (
    {"name": "llm-anywhere-green", "workload": "training",
     "resources": {"equivalent": {"units": 64}, "archs": ["GPU", "ASIC"]},
     "software": [{"stack": "cann", "versions": ">=8.0"}, {"stack": "cuda", "versions": ">=12.1"}],
     "residency": {"allow_hubs": ["yangtze", "neimenggu", "guizhou", "gansu", "ningxia"]},
     "origin": "shanghai", "max_price_cny_per_hour": 12, "duration_hours": 24},
    {"name": "inference-equiv", "workload": "inference", "resources": {"equivalent": {"units": 4}},
     "origin": "guangzhou", "max_latency_ms": 20, "duration_hours": 2},
    {"name": "xinchuang", "workload": "training", "resources": {"equivalent": {"units": 16}},
     "domestic_only": True, "origin": "beijing", "policy": "cheapest", "duration_hours": 8},
    {"name": "nearest-l20", "workload": "inference", "resources": {"arch": "GPU", "models": ["L20"], "count": 2},
     "origin": "hangzhou", "policy": "nearest", "duration_hours": 1},
)  # fmt: skip


def build_snapshot(n_sites: int, seed: int = 3) -> Snapshot:
    geo = load_geography()
    snap = Snapshot(geo)
    rng = random.Random(seed)
    per_hub = -(-n_sites // len(geo.hubs))
    for site in all_sites(per_hub, seed)[:n_sites]:
        pools = site.capacity_pools()
        capacity: dict[str, int] = {}
        for pool in pools:
            total, external = cast(int, pool["total"]), cast(int, pool["in_use_external"])
            allocated = int((total - external) * rng.uniform(0, 0.5))
            capacity |= counter_fields(str(pool["model"]), PoolCounts(total, external, allocated))
        meta = {"pools": [{k: v for k, v in p.items() if k not in ("total", "in_use_external")} for p in pools],
                "energy": dict(site.energy), "latency_ms": {}}  # fmt: skip
        snap.apply(SiteRecord(site.id, site.hub, site.cluster, "online", 0, 1, meta, capacity))
    return snap


def _requests(n_jobs: int, seed: int) -> list[Request]:
    rng = random.Random(seed)
    bodies = [sample_job(rng) for _ in range(n_jobs)] + list(EQUIVALENT_JOBS) * max(1, n_jobs // 40)
    return [Request.of(f"bench-{i}", JobSpec.model_validate(body)) for i, body in enumerate(bodies)]


def measure(sizes: list[int], n_jobs: int = 400, seed: int = 5) -> dict[str, Any]:
    """Per size: mean and p50/p99 microseconds per decision, and how many of the jobs were placed."""
    requests = _requests(n_jobs, seed)
    rows = []
    for size in sizes:
        started = time.perf_counter()
        snap = build_snapshot(size)
        build_s = time.perf_counter() - started
        for req in requests:  # warm the price and cluster orders (a running broker keeps them)
            match(req, snap)
        timings, placed = [], 0
        for req in requests:
            t0 = time.perf_counter()
            result = match(req, snap)
            timings.append((time.perf_counter() - t0) * 1e6)
            placed += isinstance(result, Decision)
        pools = sum(t.size for t in snap.tables.values())
        timings.sort()
        rows.append({
            "sites": size, "pools": pools, "decisions": len(requests), "placed": placed,
            "mean_us": round(statistics.fmean(timings), 1), "p50_us": round(timings[len(timings) // 2], 1),
            "p99_us": round(timings[int(len(timings) * 0.99) - 1], 1), "snapshot_build_s": round(build_s, 2),
        })  # fmt: skip
    base = rows[0]["mean_us"]
    for row in rows:
        row["vs_smallest"] = round(row["mean_us"] / base, 2)
    return {"mode": "matching", "results": rows}
