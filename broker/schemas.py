"""Wire formats: the job users submit over HTTP and the messages sites and broker exchange over MQTT.

Every model forbids unknown fields so that a typo is an error naming the field, not a silent default.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal, TypeVar

import orjson
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from suanwang.errors import InvalidInput

T = TypeVar("T", bound=BaseModel)

CAPACITY_SCHEMA = "suanwang.capacity/1"
EVENT_SCHEMA = "suanwang.event/1"
ASSIGNMENTS_SCHEMA = "suanwang.assignments/1"

Identifier = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9._-]*$")]
Model = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")]
Stack = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9._+-]*$")]
Count = Annotated[int, Field(ge=0, le=10_000_000)]


class Arch(StrEnum):
    CPU = "CPU"
    GPU = "GPU"
    ASIC = "ASIC"
    FPGA = "FPGA"


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


class SiteEventKind(StrEnum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


# --------------------------------------------------------------------------- jobs (HTTP)


class Equivalent(_Strict):
    """An amount of compute, counted in devices of a reference model for the job's workload class."""

    units: float = Field(gt=0, le=1_000_000, description="How many reference devices' worth of compute")
    reference: Model = Field(default="A100-80G", description="The catalog model the units are counted in")


class Resources(_Strict):
    arch: Arch | None = Field(default=None, description="One architecture; see also `archs`")
    archs: tuple[Arch, ...] = Field(default=(), max_length=4, description="Any of these architectures")
    models: tuple[Model, ...] = Field(default=(), max_length=64, description="Acceptable models; empty means any")
    count: int | None = Field(default=None, ge=1, le=100_000, description="Devices wanted, one model at one site")
    equivalent: Equivalent | None = Field(default=None, description="Compute wanted instead of a device count")
    min_memory_gb: float = Field(default=0, ge=0, le=100_000, description="Per device")
    same_site: bool = Field(default=True, description="All devices at one site (a gang); placements always are")
    interconnect: tuple[Annotated[str, Field(max_length=32)], ...] = Field(
        default=(), max_length=8, description="Any of these interconnects (nvlink, hccs, infiniband, roce ...)"
    )
    whole_nodes: bool = Field(default=False, description="Take whole servers (multiples of the pool's per_node)")

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


class Software(_Strict):
    """A stack the job can run on, with a version range and the image to run there."""

    stack: Annotated[str, Field(min_length=1, max_length=32, pattern=r"^[a-z0-9][a-z0-9._+-]*$")]
    versions: str = Field(default="", max_length=64, description="Range like '>=12.1,<13'; empty means any")
    image: str | None = Field(default=None, max_length=256)


class Residency(_Strict):
    """Where the job's data may go: allow lists (empty means anywhere) and deny lists of hubs and provinces."""

    allow_hubs: tuple[Identifier, ...] = Field(default=(), max_length=16)
    deny_hubs: tuple[Identifier, ...] = Field(default=(), max_length=16)
    allow_provinces: tuple[Annotated[str, Field(max_length=32)], ...] = Field(default=(), max_length=40)
    deny_provinces: tuple[Annotated[str, Field(max_length=32)], ...] = Field(default=(), max_length=40)


class Policy(StrEnum):
    BALANCED = "balanced"
    CHEAPEST = "cheapest"
    FASTEST = "fastest"
    NEAREST = "nearest"
    GREENEST = "greenest"


ScoreName = Literal["price", "latency", "speed", "green", "packing", "west"]


class JobSpec(_Strict):
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
    domestic_only: bool = Field(default=False, description="Only domestic chips and CPUs (信创)")
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

    @field_validator("software")
    @classmethod
    def _ranges_parse(cls, software: tuple[Software, ...]) -> tuple[Software, ...]:
        from broker.stacks import parse_requirement  # local: stacks imports the errors module only

        for item in software:
            try:
                parse_requirement(item.stack, item.versions, item.image)
            except InvalidInput as exc:
                raise ValueError(exc.message) from None
        return software


# --------------------------------------------------------------------------- MQTT, site -> broker


class Pool(_Strict):
    arch: Arch
    model: Model
    memory_gb: float = Field(ge=0, le=100_000)
    total: Count
    in_use_external: Count = 0
    per_node: int = Field(default=1, ge=1, le=1024)
    interconnect: str = Field(default="none", max_length=32)
    stacks: tuple[Stack, ...] = Field(default=(), max_length=32)
    price_cny_per_hour: float = Field(ge=0, le=1_000_000)

    @model_validator(mode="after")
    def _external_within_total(self) -> Pool:
        if self.in_use_external > self.total:
            raise ValueError(f"in_use_external {self.in_use_external} exceeds total {self.total}")
        return self


class Energy(_Strict):
    pue: float = Field(default=1.3, ge=1.0, le=3.0)
    green_share: float = Field(default=0.3, ge=0, le=1)
    tariff_cny_per_kwh: float = Field(default=0.5, ge=0, le=10)


class Capacity(_Strict):
    schema_: Literal["suanwang.capacity/1"] = Field(alias="schema")
    site: Identifier
    hub: Identifier
    cluster: Identifier | None = None
    seq: int = Field(ge=0, le=2**53)
    pools: tuple[Pool, ...] = Field(max_length=256)
    energy: Energy = Energy()
    latency_ms: dict[Identifier, Annotated[float, Field(ge=0, le=10_000)]] = Field(
        default_factory=dict, max_length=512, description="Measured round trip per origin; overrides the model"
    )
    ts: float | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("pools")
    @classmethod
    def _unique_models(cls, pools: tuple[Pool, ...]) -> tuple[Pool, ...]:
        seen: set[str] = set()
        for pool in pools:
            if pool.model in seen:
                raise ValueError(f"model {pool.model} appears in two pools")
            seen.add(pool.model)
        return pools


class SiteEvent(_Strict):
    schema_: Literal["suanwang.event/1"] = Field(alias="schema")
    site: Identifier
    job: Identifier
    attempt: int = Field(ge=1, le=1_000_000)
    event: SiteEventKind
    reason: str | None = Field(default=None, max_length=512)
    ts: float | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


# --------------------------------------------------------------------------- MQTT, broker -> site


class Assignment(_Strict):
    job: Identifier
    attempt: int
    action: Literal["run", "cancel"] = "run"
    model: Model | None = None
    count: int = 0
    duration_hours: float = 0
    name: str = ""
    workload: str = ""
    stack: str | None = None
    image: str | None = None


class Assignments(_Strict):
    schema_: Literal["suanwang.assignments/1"] = Field(alias="schema")
    site: Identifier
    assignments: tuple[Assignment, ...]
    # True when the list is everything the broker still counts at the site (sent when a site comes back):
    # the site stops any job it runs that is not on it.
    reconcile: bool = False

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


# --------------------------------------------------------------------------- parsing with clear errors


def _field_of(error: ValidationError) -> tuple[str, str | None]:
    first = error.errors(include_url=False)[0]
    loc = ".".join(str(part) for part in first["loc"] if part != "[key]") or None
    if loc == "schema_":
        loc = "schema"
    message = first["msg"]
    if loc:
        message = f"{loc}: {message}"
    return message, loc


def parse(model: type[T], payload: bytes | str | dict) -> T:
    """Validate `payload` (JSON bytes or a decoded dict) as `model`, raising InvalidInput naming the field."""
    if isinstance(payload, bytes | str):
        try:
            payload = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            raise InvalidInput(f"body is not valid JSON: {exc}", None, code="malformed_json") from None
    if not isinstance(payload, dict):
        raise InvalidInput("body must be a JSON object", None)
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        message, field = _field_of(exc)
        raise InvalidInput(message, field) from None
