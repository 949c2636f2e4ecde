"""The MQTT protocol, version 1: what sites and the broker say to each other (topics are in
`common.topics`). Sites, adapters and the broker all validate against these models.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from common.validation import Arch, Count, Identifier, Model, Stack, Strict

CAPACITY_SCHEMA = "suanwang.capacity/1"
EVENT_SCHEMA = "suanwang.event/1"
ASSIGNMENTS_SCHEMA = "suanwang.assignments/1"


class SiteEventKind(StrEnum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    # the site does not hold work the broker counts there (an adapter that restarted and lost it): the
    # broker queues it again
    LOST = "lost"


# --------------------------------------------------------------------------- MQTT, site -> broker


class Pool(Strict):
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


class Energy(Strict):
    pue: float = Field(default=1.3, ge=1.0, le=3.0)
    green_share: float = Field(default=0.3, ge=0, le=1)
    tariff_cny_per_kwh: float = Field(default=0.5, ge=0, le=10)


class Capacity(Strict):
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
    bandwidth_gbps: dict[Identifier, Annotated[float, Field(gt=0, le=10_000)]] = Field(
        default_factory=dict, max_length=64,
        description="Measured sustained rate into the site from a hub or cluster; overrides the seeded matrix",
    )
    ts: float | None = None
    boot: str | None = Field(default=None, min_length=1, max_length=64,
                             description="Changes when the adapter restarts: `seq` starts again with it")  # fmt: skip

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


class SiteEvent(Strict):
    schema_: Literal["suanwang.event/1"] = Field(alias="schema")
    site: Identifier
    job: Identifier
    attempt: int = Field(ge=1, le=1_000_000)
    event: SiteEventKind
    reason: str | None = Field(default=None, max_length=512)
    ts: float | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


# --------------------------------------------------------------------------- MQTT, broker -> site


class Assignment(Strict):
    job: Identifier
    attempt: int
    # run; cancel (stop now); preempt (checkpoint and stop within `grace_s`: the job was given back to the
    # queue for higher-priority work, and its devices go to that work when the grace period ends)
    action: Literal["run", "cancel", "preempt"] = "run"
    grace_s: float | None = Field(default=None, ge=0, le=3600)
    model: Model | None = None
    count: int = 0
    duration_hours: float = 0
    name: str = ""
    workload: str = ""
    stack: str | None = None
    image: str | None = None
    # a run's place in the site's assignment sequence (per site, grows with every run the broker assigns
    # there): what a reconcile's `upto` is compared with
    seq: int | None = Field(default=None, ge=1)


class Assignments(Strict):
    schema_: Literal["suanwang.assignments/1"] = Field(alias="schema")
    site: Identifier
    assignments: tuple[Assignment, ...]
    # True when the list is everything the broker still counts at the site (sent when a site comes back):
    # the site stops any job it runs that is not on it.
    reconcile: bool = False
    # with `reconcile`: the site's assignment sequence when the list was read. Runs with a higher `seq` were
    # assigned after it and are kept whether or not they are listed.
    upto: int | None = Field(default=None, ge=0)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def assignments_payload(
    site: str, assignments: Iterable[Assignment], *, reconcile: bool = False, upto: int | None = None
) -> bytes:
    """One `assignments` message for `site`, encoded once, by the model's own serializer (its parts were
    validated when they were built)."""
    message = Assignments.model_construct(schema_=ASSIGNMENTS_SCHEMA, site=site, assignments=tuple(assignments),
                                          reconcile=reconcile, upto=upto)  # fmt: skip
    return message.model_dump_json(by_alias=True, exclude_none=True).encode()
