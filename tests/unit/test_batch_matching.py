"""Batch matching against the one-at-a-time loop: the same decisions, field by field, on generated fleets.

The loop is what the scheduler ran: `match` a job, take its devices in the snapshot, match the next. Each
case runs the loop and then the batch on the same snapshot (its allocations put back in between) and
compares every result: chosen site, model, row, devices, price, scores, runners-up in order, NoFit
reasons, and the allocations left behind.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pytest

from broker.matching import (
    FILTERS,
    Decision,
    NoFit,
    Request,
    batch_group,
    batch_shared,
    match,
    match_batch,
    match_in_turn,
)
from broker.matching.filters import Active
from broker.matching.plan import Plan
from broker.matching.scan import _Scan
from broker.matching.snapshot import Snapshot
from broker.model.records import SiteRecord
from broker.model.stacks import parse_requirement
from regions import load_geography

GEO = load_geography()
PLACES = [(c.hub, c.id) for c in GEO.clusters.values()]
ORIGINS = ("shanghai", "beijing", "chengdu", "guangzhou", "xian", "guiyang", "wuhan")
# (model, arch, per-node choices): real catalog models, one with no catalog figures, odd node sizes
MODELS = (("A100-80G", "GPU", (8,)), ("H800", "GPU", (8, 4)), ("L20", "GPU", (8,)), ("RTX-4090", "GPU", (8, 2)),
          ("Ascend-910B", "ASIC", (8,)), ("MLU590", "ASIC", (8, 16)), ("Hanguang-800", "ASIC", (4,)),
          ("EPYC-9654", "CPU", (192, 64)), ("Kunpeng-920", "CPU", (128,)), ("Xilinx-Alveo-U250", "FPGA", (2,)),
          ("Mystery-X", "GPU", (8,)))  # fmt: skip
PRICES = (2.0, 3.5, 5.0, 8.0, 10.0, 12.5)  # few distinct prices: exact ties are common
STACKS = (("cuda-12.4",), ("cuda-11.8",), ("cann-8.0",), ("cann-7.0", "x86-64-v4"), (), ("cuda-12.4", "cann-8.0"))
INTERCONNECTS = ("nvlink", "pcie", "hccs", "none", "RoCE")
ENERGY = ({"pue": 1.2, "green_share": 0.5, "tariff_cny_per_kwh": 0.4}, {"pue": 1.5, "green_share": 0.2},
          {"pue": 1.1, "green_share": 0.8, "tariff_cny_per_kwh": 0.3})  # fmt: skip


# --------------------------------------------------------------------------- generated fleets and jobs


def fleet(rng: random.Random, n: int, scale: int = 1) -> list[SiteRecord]:
    """`n` sites in real places (a few in unknown ones), some offline, some that measured their latency."""
    records = []
    for i in range(n):
        hub, cluster = rng.choice(PLACES) if rng.random() > 0.02 else ("atlantis", "")
        pools: list[dict[str, Any]] = []
        capacity: dict[str, int] = {}
        for model, arch, per_nodes in rng.sample(MODELS, rng.choice((1, 1, 2, 3))):
            per_node = rng.choice(per_nodes)
            total = rng.choice((0, 8, 16, 32, 64, 128, 256)) * scale * (8 if arch == "CPU" else 1)
            external = rng.randint(0, total // 4)
            allocated = rng.randint(0, (total - external) // 2)
            price = rng.choice(PRICES) if rng.random() < 0.7 else round(rng.uniform(1.0, 15.0), 2)
            pools.append({"arch": arch, "model": model, "memory_gb": rng.choice((24, 48, 80, 96)),
                          "per_node": per_node, "interconnect": rng.choice(INTERCONNECTS),
                          "stacks": list(rng.choice(STACKS)), "price_cny_per_hour": price})  # fmt: skip
            capacity |= {f"t:{model}": total, f"x:{model}": external, f"a:{model}": allocated}
        measured = {o: round(rng.uniform(2, 60), 1) for o in rng.sample(ORIGINS, 2)} if rng.random() < 0.1 else {}
        status = rng.choices(("online", "offline", "stale"), (0.9, 0.05, 0.05))[0]
        meta = {"pools": pools, "energy": dict(rng.choice(ENERGY)), "latency_ms": measured}
        records.append(SiteRecord(f"site-{i:05d}", hub, cluster, status, 1, 1, meta, capacity))
    return records


def snapshot_of(records: Iterable[SiteRecord]) -> Snapshot:
    snap = Snapshot(GEO)
    for record in records:
        snap.apply(record)
    return snap


CUDA, CANN = parse_requirement("cuda", ">=12.1", "img:cu"), parse_requirement("cann", ">=8.0", "img:cann")
SOFTWARE = ((), (), (), (CUDA,), (CANN, CUDA))
POLICIES = ("balanced",) * 6 + ("cheapest", "nearest", "fastest", "greenest")
WEIGHTS = ((),) * 8 + ((("packing", 0.4),), (("west", 0.5), ("latency", 0.0)), (("packing", 1.0), ("price", 0.0)))


def shape(rng: random.Random, site_ids: list[str]) -> Request:
    """One kind of request, drawn from every feature the matcher has."""
    units = rng.choice((1.0, 4.0, 16.0, 33.0)) if rng.random() < 0.25 else None
    archs = rng.choice(((), ("GPU", "ASIC"), ("GPU",), ("ASIC",))) if units else rng.choice(
        (("GPU",), ("GPU",), ("ASIC",), ("CPU",), ("FPGA",)))  # fmt: skip
    same_arch = [m for m, a, _ in MODELS if a in archs]
    models = tuple(rng.sample(same_arch, min(len(same_arch), rng.choice((1, 2))))) if rng.random() < 0.4 else ()
    count = None if units else rng.choice((1, 2, 3, 4, 7, 8, 12, 16, 32, 64)) * (16 if archs == ("CPU",) else 1)
    residency: dict[str, frozenset[str]] = {}
    if rng.random() < 0.15:
        residency = rng.choice(({"allow_hubs": frozenset({"guizhou", "neimenggu", "yangtze"})},
                                {"deny_hubs": frozenset({"jingjinji"})},
                                {"deny_provinces": frozenset({"guizhou"})}))  # fmt: skip
    return Request(
        job_id="", archs=archs, models=models, count=count, units=units,
        reference=rng.choice(("A100-80G", "H800", "Ascend-910B")) if units else (models[0] if models else ""),
        min_memory_gb=rng.choice((0.0, 0.0, 32.0, 80.0)), origin=rng.choice(ORIGINS * 6 + ("atlantis",)),
        max_latency_ms=rng.choice((None, None, 12.0, 25.0, 40.0)), max_price=rng.choice((None, None, 6.0, 11.0, 90.0)),
        duration_hours=rng.choice((0.5, 1.0, 6.0)),
        workload=rng.choice(("training", "inference", "batch", "general", "hpc", "rendering")),
        software=rng.choice(SOFTWARE), interconnect=rng.choice(((), (), ("nvlink",), ("pcie", "roce"))),
        whole_nodes=rng.random() < 0.1, domestic_only=rng.random() < 0.08, policy=rng.choice(POLICIES),
        weights=rng.choice(WEIGHTS),
        avoid_sites=frozenset(rng.sample(site_ids, 2)) if site_ids and rng.random() < 0.05 else frozenset(),
        **residency,  # type: ignore[arg-type]
    )  # fmt: skip


def batch_of(rng: random.Random, kinds: list[Request], n: int, tag: str) -> list[Request]:
    """`n` jobs of the given kinds: duplicates, the same kind with another count, fresh job ids."""
    jobs = []
    for i in range(n):
        kind = rng.choice(kinds)
        if kind.count is not None and rng.random() < 0.3:
            kind = dataclasses.replace(kind, count=max(1, kind.count + rng.choice((-1, 1, 5))))
        jobs.append(dataclasses.replace(kind, job_id=f"{tag}-{i}", duration_hours=rng.choice((0.5, 1.0, 6.0))))
    return jobs


# --------------------------------------------------------------------------- the loop, the batch, the comparison


class Holds:
    """A backfill stand-in: after a NoFit, the pool the last placement took is held for that job; jobs
    that end within the hour may still use it. Asked per job, so it changes in the middle of a batch."""

    def __init__(self) -> None:
        self.held: tuple[str, int] | None = None
        self.holder = ""
        self.last: tuple[str, int] | None = None

    def exclude_for(self, req: Request) -> tuple[str, int] | None:
        if self.held is None or req.job_id == self.holder or req.duration_hours <= 1.0:
            return None
        return self.held

    def saw(self, req: Request, result: Decision | NoFit) -> None:
        if isinstance(result, Decision):
            self.last = (result.chosen.model, result.chosen.row)
        elif self.held is None and self.last is not None:
            self.held, self.holder = self.last, req.job_id


def sequential(requests: list[Request], snap: Snapshot, holds: Holds) -> list[Decision | NoFit]:
    """The loop the scheduler ran: match, take the devices, the next job."""
    out: list[Decision | NoFit] = []
    for req in requests:
        result = match(req, snap, exclude=holds.exclude_for(req))
        if isinstance(result, Decision):
            snap.tables[result.chosen.model].allocated[result.chosen.row] += result.chosen.devices
        holds.saw(req, result)
        out.append(result)
    return out


def batched(requests: list[Request], snap: Snapshot, holds: Holds) -> list[Decision | NoFit]:
    out: list[Decision | NoFit] = []
    for req, result in zip(requests, match_in_turn(requests, snap, exclude_for=holds.exclude_for), strict=True):
        holds.saw(req, result)
        out.append(result)
    return out


def described(result: Decision | NoFit) -> tuple[Any, ...]:
    if isinstance(result, NoFit):
        return ("no fit", result.reasons)
    return ("decision", dataclasses.asdict(result.chosen), [dataclasses.asdict(c) for c in result.runners_up],
            result.feasible_sites)  # fmt: skip


Runner = Callable[[list[Request], Snapshot, Holds], list[Decision | NoFit]]


def compare(requests: list[Request], snap: Snapshot, run_batch: Runner = batched) -> list[Decision | NoFit]:
    """Run the loop, put the allocations back, run the batch; assert both agree on every job and on the
    allocations left behind. Returns the loop's results."""
    before = {m: t.allocated.copy() for m, t in snap.tables.items()}
    expected = sequential(requests, snap, Holds())
    after = {m: t.allocated.copy() for m, t in snap.tables.items()}
    for model, table in snap.tables.items():
        table.allocated[:] = before[model]
    got = run_batch(requests, snap, Holds())
    assert len(got) == len(expected)
    for i, (want, have) in enumerate(zip(expected, got, strict=True)):
        assert described(have) == described(want), f"job {i} ({requests[i]}) differs"
    for model, table in snap.tables.items():
        assert np.array_equal(table.allocated, after[model]), f"allocations of {model} differ"
    return expected


@pytest.fixture(scope="module")
def fleet_1k() -> tuple[Snapshot, list[str]]:
    records = fleet(random.Random(11), 1000)
    return snapshot_of(records), [r.id for r in records]


# --------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("size", [1, 7, 64, 512])
def test_batch_gives_the_loops_decisions_on_a_1k_fleet(fleet_1k, seed, size):
    """On 1,000 generated sites, batches of 1 to 512 jobs of mixed kinds get the loop's decisions exactly."""
    snap, site_ids = fleet_1k
    rng = random.Random(seed * 1000 + size)
    kinds = [shape(rng, site_ids) for _ in range(rng.choice((3, 12, 40)))]
    compare(batch_of(rng, kinds, size, f"s{seed}"), snap)


def test_takes_that_exhaust_pools_mid_batch_are_seen_by_later_jobs():
    """A small fleet drained by 512 jobs of a few kinds: later jobs move to worse pools, then fit nowhere."""
    rng = random.Random(5)
    records = fleet(rng, 60)
    snap = snapshot_of(records)
    kinds = [dataclasses.replace(shape(rng, []), avoid_sites=frozenset(), origin="shanghai") for _ in range(4)]
    expected = compare(batch_of(rng, kinds, 512, "drain"), snap)
    first_nofit = next(i for i, r in enumerate(expected) if isinstance(r, NoFit))
    assert any(isinstance(r, Decision) for r in expected[:first_nofit])
    assert sum(isinstance(r, NoFit) for r in expected) > 100


def test_batch_gives_the_loops_decisions_on_a_10k_fleet():
    """On 10,000 generated sites, 512 jobs of mixed kinds get the loop's decisions exactly."""
    rng = random.Random(77)
    records = fleet(rng, 10_000, scale=1)
    snap = snapshot_of(records)
    kinds = [shape(rng, [r.id for r in records]) for _ in range(30)]
    compare(batch_of(rng, kinds, 512, "tenk"), snap)


def test_batch_gives_the_loops_decisions_on_the_benchmark_fleet():
    """The benchmark's 10,000 sites and sample jobs (the demo fleet's kinds), in batches of 512."""
    from suanwang.bench_matching import _requests, build_snapshot

    snap = build_snapshot(10_000)
    requests = _requests(500, seed=9)
    for start in range(0, len(requests), 512):
        compare(requests[start : start + 512], snap)


def test_comparison_fails_for_a_batch_that_ignores_earlier_takes(fleet_1k, monkeypatch):
    """The comparison can fail: a batch whose groups never read the free counts takes changed disagrees."""
    snap, site_ids = fleet_1k
    rng = random.Random(3)
    kinds = [dataclasses.replace(shape(rng, site_ids), avoid_sites=frozenset()) for _ in range(3)]
    requests = batch_of(rng, kinds, 256, "blind")
    monkeypatch.setattr(batch_group.Group, "_sync", lambda self: None)
    with pytest.raises(AssertionError):
        compare(requests, snap)


def test_a_small_budget_drops_groups_and_keeps_the_decisions(fleet_1k, monkeypatch):
    """Past the budget of prepared rows the batch forgets groups and pieces; decisions stay the loop's."""
    snap, site_ids = fleet_1k
    monkeypatch.setattr(batch_group, "BUDGET", 3000)
    rng = random.Random(8)
    kinds = [shape(rng, site_ids) for _ in range(40)]
    compare(batch_of(rng, kinds, 300, "budget"), snap)


def test_match_batch_is_the_list_of_match_in_turn(fleet_1k):
    """`match_batch` returns what `match_in_turn` yields, and takes each placement in the snapshot."""
    snap, site_ids = fleet_1k
    rng = random.Random(4)
    requests = batch_of(rng, [shape(rng, site_ids) for _ in range(5)], 40, "list")
    before = {m: t.allocated.copy() for m, t in snap.tables.items()}
    listed = match_batch(requests, snap)
    taken = sum(int((t.allocated - before[m]).sum()) for m, t in snap.tables.items())
    assert taken == sum(r.chosen.devices for r in listed if isinstance(r, Decision)) > 0
    for model, table in snap.tables.items():
        table.allocated[:] = before[model]
    assert [described(r) for r in match_in_turn(requests, snap)] == [described(r) for r in listed]
    for model, table in snap.tables.items():
        table.allocated[:] = before[model]


def test_shared_plans_equal_fresh_plans(fleet_1k):
    """The batch's plans (lookups shared by shape) are, field by field, the plans `match` builds."""
    snap, site_ids = fleet_1k
    rng = random.Random(6)
    shared = batch_shared.Shared(snap, 1024, 4)
    for i in range(200):
        req = dataclasses.replace(shape(rng, site_ids), job_id=f"p{i}", avoid_sites=frozenset())
        exclude = ("A100-80G", 3) if i % 3 == 0 else None
        mine, fresh = vars(shared.plan(req, exclude)), vars(Plan(req, snap, exclude=exclude))
        assert mine.keys() == fresh.keys()
        for name, value in fresh.items():
            if isinstance(value, np.ndarray):
                assert np.array_equal(mine[name], value), name
            else:
                assert mine[name] == value or (value != value and mine[name] != mine[name]), name


def test_shared_segments_equal_the_scans(fleet_1k):
    """The batch's segments are the scan's: same tables, rows, bounds and order flags, in the same order."""
    snap, site_ids = fleet_1k
    rng = random.Random(7)
    shared = batch_shared.Shared(snap, 1024, 4)
    for i in range(200):
        req = dataclasses.replace(shape(rng, site_ids), job_id=f"g{i}", origin=rng.choice(ORIGINS))
        plan = Plan(req, snap)
        active = Active.of(plan)
        tables = shared.tables(plan, active)
        assert tables == [t for t in plan.candidate_tables() if active.admits(plan, t)]
        scan = _Scan(plan, active, tables, keep=4, exhaustive=False)
        mine, theirs = shared.segments(plan, scan, tables), scan.segments()
        assert [(b, t.model, o) for b, t, _, o, _ in mine] == [(b, t.model, o) for b, t, _, o in theirs]
        assert all(np.array_equal(m[2], s[2]) for m, s in zip(mine, theirs, strict=True))


def test_every_filter_the_batch_applies_per_job_is_in_the_list():
    """The filters the batch applies per job (not prepared) are named in FILTERS, so a renamed one shows."""
    names = {f.name for f in FILTERS}
    assert batch_group.DYNAMIC <= names


# --------------------------------------------------------------------------- groups kept from one batch to the next


def _change(rng: random.Random, snap: Snapshot, records: list[SiteRecord], what: str) -> None:
    """Change some sites as Redis would between passes: counts only, or also prices, status, a new site."""
    for i in rng.sample(range(len(records)), len(records) // 3):
        record = records[i]
        capacity = dict(record.capacity)
        for field in [f for f in capacity if f.startswith("a:")]:
            total, external = capacity["t:" + field[2:]], capacity["x:" + field[2:]]
            capacity[field] = rng.choice((0, max(total - external, 0), rng.randint(0, max(total - external, 0))))
        meta, status = record.meta, record.status
        if what == "facts" and rng.random() < 0.3:
            meta = {**(meta or {}), "pools": [{**p, "price_cny_per_hour": rng.choice(PRICES)}
                                               for p in (meta or {}).get("pools", [])]}  # fmt: skip
        if what == "facts" and rng.random() < 0.2:
            status = "offline" if status == "online" else "online"
        records[i] = dataclasses.replace(record, status=status, capacity=capacity, meta=meta,
                                         meta_version=record.meta_version + (meta is not record.meta))  # fmt: skip
        snap.apply(records[i])
    if what == "facts":
        extra = fleet(rng, 1)[0]
        records.append(dataclasses.replace(extra, id=f"site-new-{len(records)}"))
        snap.apply(records[-1])


@pytest.mark.parametrize("what", ["counts", "facts"])
def test_groups_kept_across_batches_see_what_changed_in_between(what):
    """Batches of the same kinds, with sites changing between them (counts; or prices, status and new sites
    too): groups kept from earlier batches give the loop's decisions in every later batch."""
    rng = random.Random(21 if what == "counts" else 22)
    records = fleet(rng, 400)
    snap = snapshot_of(records)
    kinds = [dataclasses.replace(shape(rng, []), avoid_sites=frozenset()) for _ in range(8)]
    for step in range(6):
        compare(batch_of(rng, kinds, 96, f"keep{step}"), snap)
        _change(rng, snap, records, what)
    assert batch_shared._lasting(snap).groups, "groups are kept for the next batch"


def test_comparison_fails_when_kept_groups_keep_old_free_counts(monkeypatch):
    """The comparison can fail: kept groups that do not read the free counts again disagree with the loop."""
    original = batch_group.Group.rebind

    def stale(self: batch_group.Group, shared: batch_shared.Shared) -> bool:
        free = self.cols.get("free")
        kept = None if free is None else (free.copy(), self.cols["free_mod"].copy())
        ok = original(self, shared)
        if kept is not None and ok and self.cols.get("free") is free:
            self.cols["free"][:], self.cols["free_mod"] = kept
        return ok

    monkeypatch.setattr(batch_group.Group, "rebind", stale)
    with pytest.raises(AssertionError):
        test_groups_kept_across_batches_see_what_changed_in_between("counts")


def test_comparison_fails_when_kept_groups_ignore_changed_facts(monkeypatch):
    """The comparison can fail: kept groups that ignore a changed price, status or new row disagree."""
    monkeypatch.setattr(batch_group.Group, "_stale", lambda self, shared: False)
    with pytest.raises(AssertionError):
        test_groups_kept_across_batches_see_what_changed_in_between("facts")
