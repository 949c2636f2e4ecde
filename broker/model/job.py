"""The job users submit over HTTP, and the states it moves through."""

from __future__ import annotations

import hashlib
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import AwareDatetime, Field, StrictBool, field_validator, model_validator

from broker.model.stacks import parse_requirement
from common.errors import InvalidInput
from common.validation import Arch, Identifier, Model, Strict


class Priority(StrEnum):
    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"


class JobState(StrEnum):
    QUEUED = "queued"
    ASSIGNED = "assigned"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)


# --------------------------------------------------------------------------- jobs (HTTP)


class Equivalent(Strict):
    """An amount of compute, counted in devices of a reference model for the job's workload class."""

    units: float = Field(gt=0, le=1_000_000, description="How many reference devices' worth of compute")
    reference: Model = Field(default="A100-80G", description="The catalog model the units are counted in")


class Resources(Strict):
    arch: Arch | None = Field(default=None, description="One architecture; see also `archs`")
    archs: tuple[Arch, ...] = Field(default=(), max_length=4, description="Any of these architectures")
    models: tuple[Model, ...] = Field(default=(), max_length=64, description="Acceptable models; empty means any")
    count: int | None = Field(default=None, ge=1, le=100_000, description="Devices wanted, one model at one site")
    equivalent: Equivalent | None = Field(default=None, description="Compute wanted instead of a device count")
    min_memory_gb: float = Field(default=0, ge=0, le=100_000, description="Per device")
    same_site: StrictBool = Field(default=True, description="All devices at one site (a gang); placements always are")
    interconnect: tuple[Annotated[str, Field(max_length=32)], ...] = Field(
        default=(), max_length=8, description="Any of these interconnects (nvlink, hccs, infiniband, roce ...)"
    )
    whole_nodes: StrictBool = Field(default=False, description="Take whole servers (multiples of the pool's per_node)")

    @model_validator(mode="after")
    def _one_amount(self) -> Resources:
        if (self.count is None) == (self.equivalent is None):
            raise ValueError("give either count (devices) or equivalent (compute), not both")
        if self.arch is not None and self.archs:
            raise ValueError("give either arch or archs")
        if self.count is not None and self.arch is None and not self.archs:
            raise ValueError("a device count needs arch (or archs)")
        return self

    @property
    def arch_set(self) -> tuple[str, ...]:
        """Architectures the job may run on; empty means any."""
        if self.arch is not None:
            return (self.arch.value,)
        return tuple(a.value for a in self.archs)


class Software(Strict):
    """A stack the job can run on, with a version range and the image to run there."""

    stack: Annotated[str, Field(min_length=1, max_length=32, pattern=r"^[a-z0-9][a-z0-9._+-]*$")]
    versions: str = Field(default="", max_length=64, description="Range like '>=12.1,<13'; empty means any")
    image: str | None = Field(default=None, max_length=256)


class Residency(Strict):
    """Where the job's data may go: allow lists (empty means anywhere) and deny lists of hubs and provinces."""

    allow_hubs: tuple[Identifier, ...] = Field(default=(), max_length=16)
    deny_hubs: tuple[Identifier, ...] = Field(default=(), max_length=16)
    allow_provinces: tuple[Annotated[str, Field(max_length=32)], ...] = Field(default=(), max_length=40)
    deny_provinces: tuple[Annotated[str, Field(max_length=32)], ...] = Field(default=(), max_length=40)


MAX_DATASET_GB = 10_000_000  # 10 PB
MAX_DATASETS = 16
SITE_PREFIX = "site:"


class Dataset(Strict):
    """Data the job reads: how big it is, where it is now, and whether it may be copied elsewhere."""

    name: str = Field(min_length=1, max_length=128)
    size_gb: float = Field(gt=0, le=MAX_DATASET_GB, description="Decimal GB (1 TB = 1,000 GB), at most 10 PB")
    location: Annotated[str, Field(min_length=1, max_length=72, pattern=r"^(site:)?[a-z0-9][a-z0-9._-]*$")] = Field(
        description="A city, cluster or hub id (as `origin` takes), or `site:<id>`"
    )
    copyable: StrictBool = Field(default=True, description="False: the job runs only where the data is")


class Policy(StrEnum):
    BALANCED = "balanced"
    CHEAPEST = "cheapest"
    FASTEST = "fastest"
    NEAREST = "nearest"
    GREENEST = "greenest"


ScoreName = Literal["price", "latency", "speed", "green", "packing", "west", "reliability"]


# what a job may change between its quote and its submission without losing the quote's hold
_NOT_PLACEMENT = {"name", "labels", "tenant", "priority", "deadline", "policy", "weights", "duration_hours", "hold",
                  "preemptible", "grace_s"}  # fmt: skip


class JobSpec(Strict):
    name: str = Field(default="job", min_length=1, max_length=128)
    workload: Literal["training", "inference", "hpc", "rendering", "batch", "general"] = "general"
    resources: Resources
    software: tuple[Software, ...] = Field(default=(), max_length=16, description="Any of these stacks")
    origin: Identifier = Field(description="City (or hub/cluster) the job's users and data are in")
    max_latency_ms: float | None = Field(default=None, gt=0, le=10_000)
    max_price_cny_per_hour: float | None = Field(
        default=None, gt=0, le=1_000_000, description="Per device-hour, or per reference-device-hour for equivalent"
    )
    residency: Residency = Residency()
    datasets: tuple[Dataset, ...] = Field(
        default=(), max_length=MAX_DATASETS, description="Data the job reads: moving it counts in time and cost"
    )
    domestic_only: StrictBool = Field(default=False, description="Only domestic chips and CPUs (信创)")
    policy: Policy = Policy.BALANCED
    weights: dict[ScoreName, Annotated[float, Field(ge=0, le=100)]] = Field(
        default_factory=dict, description="Override the policy's score weights"
    )
    duration_hours: float = Field(gt=0, le=24 * 365, description="On the requested devices (or reference devices)")
    priority: Priority = Priority.NORMAL
    deadline: AwareDatetime | None = Field(
        default=None, description="Fail the job if it has not started by then (ISO 8601 with a time zone)"
    )
    tenant: Identifier = "default"
    labels: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=256)]] = Field(
        default_factory=dict, max_length=32
    )
    hold: Identifier | None = Field(
        default=None, description="A hold from POST /v1/quote?hold=true: place the job there, at the quoted price"
    )
    preemptible: StrictBool = Field(
        default=False, description="May give way to higher-priority work (after a grace period to checkpoint)"
    )
    grace_s: float = Field(default=60, ge=0, le=3600, description="Seconds a preemptible job gets to checkpoint")

    def placement_hash(self) -> str:
        """A digest of what decides where the job may run and how much it takes (resources, software, origin,
        caps, residency, data): a hold is good only for a job asking what the quote it came from asked."""
        asked = self.model_dump_json(exclude=_NOT_PLACEMENT)
        return hashlib.sha256(asked.encode()).hexdigest()[:24]

    @field_validator("software")
    @classmethod
    def _ranges_parse(cls, software: tuple[Software, ...]) -> tuple[Software, ...]:
        for item in software:
            try:
                parse_requirement(item.stack, item.versions, item.image)
            except InvalidInput as exc:
                raise ValueError(exc.message) from None
        return software
