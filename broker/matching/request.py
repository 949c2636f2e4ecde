"""What the matcher is asked (a Request) and what it answers (a Decision, or NoFit with the reasons).

Also the policies: the named weightings of the bounded 0-100 scores a decision ranks pools by.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TypedDict, Unpack

from broker.model.job import JobSpec
from broker.model.stacks import Requirement, parse_requirement

RUNNERS_UP = 3
CHUNK = 512  # rows filtered and scored together
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
# Both weigh the site's reliability (what it delivered of its recent work) at 0.1 on top, so of sites alike the
# one that keeps losing work ranks lower (totals are divided by the weights' sum).
BALANCED_TOLERANT = {"price": 0.45, "latency": 0.1, "speed": 0.15, "green": 0.1, "packing": 0.1, "west": 0.1,
                     "reliability": 0.1}  # fmt: skip
BALANCED_SENSITIVE = {"price": 0.35, "latency": 0.45, "speed": 0.1, "packing": 0.1, "reliability": 0.1}


@dataclass(frozen=True, slots=True)
class DataSet:
    """Data a job reads (hashable): its size, where it is (a city, cluster or hub id, or `site:<id>`), and
    whether it may be copied to where the job runs."""

    name: str
    size_gb: float
    location: str
    copyable: bool = True


class RequestChanges(TypedDict, total=False):
    """The fields of a Request that `Request.relaxed` may change (every one but the job id)."""

    archs: tuple[str, ...]
    models: tuple[str, ...]
    count: int | None
    units: float | None
    reference: str
    min_memory_gb: float
    origin: str
    max_latency_ms: float | None
    max_price: float | None
    duration_hours: float
    name: str
    workload: str
    software: tuple[Requirement, ...]
    interconnect: tuple[str, ...]
    whole_nodes: bool
    allow_hubs: frozenset[str]
    deny_hubs: frozenset[str]
    allow_provinces: frozenset[str]
    deny_provinces: frozenset[str]
    domestic_only: bool
    policy: str
    weights: tuple[tuple[str, float], ...]
    avoid_sites: frozenset[str]
    priority: str
    datasets: tuple[DataSet, ...]
    data_moves: bool | None


@dataclass(frozen=True, slots=True)
class Request:
    """What the matcher needs from a job: a device count or an amount of compute (`units`), never both."""

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
    priority: str = "normal"  # high, normal or low: what a preemption weighs (matching itself ignores it)
    datasets: tuple[DataSet, ...] = ()
    # only pools where the job's data would move (True) or stay (False); None for either (quotes compare both)
    data_moves: bool | None = None

    def __post_init__(self) -> None:
        if (self.count is None) == (self.units is None):
            raise ValueError(f"request {self.job_id} must ask for either a device count or equivalent units")

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
            priority=spec.priority.value,
            datasets=tuple(DataSet(d.name, d.size_gb, d.location, d.copyable) for d in spec.datasets),
        )  # fmt: skip

    def relaxed(self, **changes: Unpack[RequestChanges]) -> Request:
        """The same request with `changes` applied (a loosened constraint, a site to avoid)."""
        return replace(self, **changes)

    def weight_map(self) -> dict[str, float]:
        base = POLICIES.get(self.policy)
        if base is None:
            base = BALANCED_TOLERANT if self.workload in TOLERANT else BALANCED_SENSITIVE
        weights = {**base, **dict(self.weights)}
        return {k: v for k, v in weights.items() if v > 0} or {"price": 1.0}


@dataclass(frozen=True, slots=True)
class Candidate:
    """One pool a job could go to, with the facts and the named scores it was ranked by."""

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
    transfer_hours: float = 0.0  # moving the job's data to the site
    transfer_cost: float = 0.0  # CNY, egress for that move
    reliability: float = 100.0  # the site's reliability score (broker.model.reliability), weighted or not

    @property
    def finish_hours(self) -> float:
        """Transfer, then the run."""
        return self.est_hours + self.transfer_hours

    @property
    def compute_cost(self) -> float:
        return self.cost_per_hour * self.est_hours

    @property
    def total_cost(self) -> float:
        """The run for its estimated hours and the data's move."""
        return self.compute_cost + self.transfer_cost

    def as_dict(self) -> dict[str, object]:
        return {
            "site": self.site, "hub": self.hub, "model": self.model, "arch": self.arch, "devices": self.devices,
            "free": self.free, "price_cny_per_hour": self.price, "cost_cny_per_hour": round(self.cost_per_hour, 4),
            "unit_price_cny_per_hour": round(self.unit_price, 4), "reliability": self.reliability,
            "latency_ms": round(self.latency_ms, 2) if math.isfinite(self.latency_ms) else None,
            "est_hours": round(self.est_hours, 3), "score": round(self.score, 2),
            "scores": {k: round(v, 2) for k, v in self.scores.items()}, "stack": self.stack, "image": self.image,
            "transfer_hours": round(self.transfer_hours, 3), "transfer_cost_cny": round(self.transfer_cost, 2),
            "finish_hours": round(self.finish_hours, 3), "compute_cost_cny": round(self.compute_cost, 2),
            "total_cost_cny": round(self.total_cost, 2),
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
