"""What the broker knows of a site and what it commits for a job (pure records), and the one codec of
the per-site capacity counters (`t:<model>` total, `x:<model>` in use outside the broker, `a:<model>`
allocated by the broker) that the Lua scripts keep.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Any, NamedTuple

from broker.model.reliability import Reliability

_KINDS = ("t:", "x:", "a:")


class PoolCounts(NamedTuple):
    """One pool's counters: free = total - external - allocated."""

    total: int = 0
    external: int = 0
    allocated: int = 0

    @property
    def free(self) -> int:
        return self.total - self.external - self.allocated


def counter_fields(model: str, counts: PoolCounts) -> dict[str, int]:
    """The capacity hash fields for one pool."""
    return {f"t:{model}": counts.total, f"x:{model}": counts.external, f"a:{model}": counts.allocated}


def pool_counts(capacity: Mapping[str, int], model: str) -> PoolCounts:
    """One pool's counters from a site's capacity hash (absent fields are 0)."""
    return PoolCounts(capacity.get(f"t:{model}", 0), capacity.get(f"x:{model}", 0), capacity.get(f"a:{model}", 0))


def counted_models(capacity: Iterable[str]) -> set[str]:
    """The models a capacity hash has any counter for."""
    return {field[2:] for field in capacity if field[:2] in _KINDS}


@dataclass(frozen=True)
class Placement:
    """A decision to commit: `count` devices of `model` at `site` for `job`."""

    job: str
    site: str
    hub: str
    model: str
    count: int
    price: float
    latency_ms: float
    arch: str = ""
    decision: str = "{}"  # JSON: the chosen pool's named scores and the runners-up
    # the runners-up to take in order when the chosen pool cannot take the job at commit (another replica
    # was faster): (site, hub, model, count, price, latency_ms, arch) each
    alternatives: tuple[tuple[str, str, str, int, float, float, str], ...] = ()
    hold: str = ""  # a hold whose devices the job takes (hold.lua), at the hold's price


class Applied(IntEnum):
    """What a capacity message did (capacity.lua's return code)."""

    MOVED = -1  # it named another hub or cluster than the site's own (registered, or first reported)
    STALE = 0  # its content was not newer than the last applied (still a heartbeat unless a duplicate)
    APPLIED = 1
    REVIVED = 2  # it brought a stale site back online


class Refusal(StrEnum):
    """Why Redis refused to commit a placement."""

    STALE_VIEW = "stale_view"  # the pool has less free than the matcher's view said
    NOT_QUEUED = "not_queued"  # cancelled, or placed by another replica
    SITE_NOT_ONLINE = "site_not_online"
    TENANT_LIMIT = "tenant_limit"  # the tenant would hold more devices than its limit
    HOLD_NOT_STANDING = "hold_not_standing"  # the hold was used, ended, or is for another placement
    TOO_MANY_HOLDS = "too_many_holds"  # the tenant has the most standing holds allowed
    VICTIM_MOVED = "victim_moved"  # a job a preemption would stop moved, ended or changed meanwhile
    NO_CASCADE = "no_cascade"  # a job that was preempted does not preempt others


@dataclass(frozen=True, slots=True)
class Commit:
    """The outcome of one placement: the attempt number and the site's assignment sequence number when it
    was committed, else why not."""

    attempt: int = 0
    refusal: Refusal | None = None
    seq: int = 0
    choice: int = 0  # which pool took the job: 0 the chosen one, i the placement's i-th alternative

    @property
    def ok(self) -> bool:
        return self.refusal is None


@dataclass(frozen=True)
class SiteRecord:
    """A site as stored: identity, status, pool metadata and the capacity counters."""

    id: str
    hub: str
    cluster: str
    status: str
    seen_ms: int
    meta_version: int
    meta: dict[str, Any] | None
    capacity: dict[str, int]
    reliability: Reliability | None = None  # decayed to when it was read; None: not read

    def counts(self, model: str) -> PoolCounts:
        return pool_counts(self.capacity, model)
