"""`suanwang bench --matching`: the cost of one decision as the network grows, with no I/O at all.

A snapshot of N synthetic sites (the demo fleet's sites cloned with jittered sizes and prices, about
a quarter of their capacity already taken) is matched against the same set of sample jobs at every
size, so the figures compare like with like.

Per size: one decision at a time (`match`, nothing taken), then a pass's batch as the scheduler plans
it: the loop (`match`, take the devices, next job) and `match_batch` on batches of 64 and 512 jobs,
in microseconds per job, cold (no group kept from an earlier pass) and warm (as the scheduler runs);
every batch starts from the same snapshot (its takes are put back after).
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Any, cast

from adapters.fleet import all_sites
from broker.matching import Decision, Request, batch_shared, match, match_batch
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


BATCHES = (64, 512)
BATCH_JOBS = 1024  # jobs matched per batch size: 16 batches of 64, 2 of 512


def _loop(batch: list[Request], snap: Snapshot) -> list[Decision | Any]:
    """The scheduler's loop before batching: match, take the devices, the next job."""
    out = []
    for req in batch:
        result = match(req, snap)
        if isinstance(result, Decision):
            snap.tables[result.chosen.model].allocated[result.chosen.row] += result.chosen.devices
        out.append(result)
    return out


def _per_job_us(snap: Snapshot, requests: list[Request], size: int, batched: bool, rounds: int = 3,
                cold: bool = False) -> float:  # fmt: skip
    """Microseconds per job matching `requests` in batches of `size` (the median of `rounds` passes).

    The batch keeps its groups for later passes as the scheduler does (warm); `cold` forgets them before
    every pass, as after a restart or when every kind of job is new."""
    before = {model: table.allocated.copy() for model, table in snap.tables.items()}
    passes = []
    for _ in range(rounds):
        spent = 0.0
        if cold:
            batch_shared.forget(snap)
        for start in range(0, len(requests), size):
            batch = requests[start : start + size]
            t0 = time.perf_counter()
            match_batch(batch, snap) if batched else _loop(batch, snap)
            spent += time.perf_counter() - t0
            for model, table in snap.tables.items():
                table.allocated[:] = before[model]
        passes.append(spent * 1e6 / len(requests))
    return round(statistics.median(passes), 1)


def measure(sizes: list[int], n_jobs: int = 400, seed: int = 5) -> dict[str, Any]:
    """Per size: mean and p50/p99 microseconds per decision, how many of the jobs were placed, and the
    cost per job of a batch: the loop and `match_batch`, at each batch size."""
    requests = _requests(n_jobs, seed)
    batch_requests = _requests(BATCH_JOBS, seed + 1)
    random.Random(seed).shuffle(batch_requests)  # the compute-equivalent jobs mixed in, not all at the end
    batch_requests = batch_requests[:BATCH_JOBS]
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
        row: dict[str, Any] = {
            "sites": size, "pools": pools, "decisions": len(requests), "placed": placed,
            "mean_us": round(statistics.fmean(timings), 1), "p50_us": round(timings[len(timings) // 2], 1),
            "p99_us": round(timings[int(len(timings) * 0.99) - 1], 1), "snapshot_build_s": round(build_s, 2),
        }  # fmt: skip
        for batch in BATCHES:
            row[f"loop{batch}_us"] = _per_job_us(snap, batch_requests, batch, batched=False, rounds=1)
            row[f"batch{batch}_cold_us"] = _per_job_us(snap, batch_requests, batch, batched=True, cold=True)
            row[f"batch{batch}_us"] = _per_job_us(snap, batch_requests, batch, batched=True)
        rows.append(row)
    base = rows[0]["mean_us"]
    for row in rows:
        row["vs_smallest"] = round(row["mean_us"] / base, 2)
    return {"mode": "matching", "results": rows}
