"""What the broker knows of a site and what it commits for a job (pure records)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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
