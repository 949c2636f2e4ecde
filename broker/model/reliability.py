"""A site's reliability: what it delivered of the work it was given, from its own history (pure).

`transition.lua` keeps the record in the same step as the transition it counts (`{ns}:site:<id>:rel`):
decayed counters of assignments accepted, jobs completed, assignments that timed out or that the site
rejected, jobs it failed, work it lost (a `lost` event, or running or assigned work given back when it went
offline or silent) and the device-hours of running work lost, with `t`, the Redis time (ms) of the last
update. Every counter halves every `HALF_LIFE_MS`; an update first decays them all to its own time.

The score is a Bayesian ratio, 0-100: `PRIOR_GOOD` good outcomes assumed before any are seen (so a new site
starts at 100), against the weighted bad ones. It is bounded below by `FLOOR` (never 0: no ban), and as the
counters decay, good and bad alike, it returns towards the prior's 100.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

HALF_LIFE_MS = 24 * 3_600_000  # every counter halves in a day (passed to transition.lua as its half-life)
PRIOR_GOOD = 5.0  # good outcomes a site is credited with before its history says anything
ACCEPTED_GOOD = 0.5  # an assignment accepted is half a good outcome; a job completed is one
BAD_WEIGHTS = {"timed_out": 1.0, "rejected": 1.0, "failed": 2.0, "lost": 3.0}
LOST_DH_BOUND = 5.0  # device-hours lost add at most this many bad outcomes ...
LOST_DH_SCALE = 100.0  # ... half of it at this many device-hours
FLOOR = 1.0  # the lowest score: a site that lost everything still ranks, last
COUNTERS = ("accepted", "completed", "timed_out", "rejected", "failed", "lost", "lost_device_hours")


@dataclass(frozen=True, slots=True)
class Reliability:
    """A site's decayed counters as of `t` (ms, Redis time; 0 for a site with no history), last counted at
    `updated` (ms)."""

    accepted: float = 0.0
    completed: float = 0.0
    timed_out: float = 0.0
    rejected: float = 0.0
    failed: float = 0.0
    lost: float = 0.0
    lost_device_hours: float = 0.0
    t: int = 0
    updated: int = 0

    @classmethod
    def from_fields(cls, raw: Mapping[str, str]) -> Reliability:
        """The record from its hash fields as stored (absent ones are 0)."""
        values: dict[str, Any] = {name: float(raw[name]) for name in COUNTERS if raw.get(name)}
        t = int(float(raw.get("t") or 0))
        return cls(**values, t=t, updated=t)

    def at(self, now_ms: int) -> Reliability:
        """The counters decayed to `now_ms` (unchanged when that is not later than `t`)."""
        if now_ms <= self.t or not self.t:
            return self
        factor = decay(now_ms - self.t)
        return replace(self, **{name: getattr(self, name) * factor for name in COUNTERS}, t=now_ms)

    @property
    def good(self) -> float:
        return self.completed + ACCEPTED_GOOD * self.accepted

    @property
    def bad(self) -> float:
        """The weighted bad outcomes, device-hours lost included (bounded)."""
        hours = max(self.lost_device_hours, 0.0)
        return sum(w * getattr(self, name) for name, w in BAD_WEIGHTS.items()) + LOST_DH_BOUND * hours / (
            hours + LOST_DH_SCALE
        )

    @property
    def score(self) -> float:
        return reliability_score(self)

    def as_dict(self) -> dict[str, Any]:
        """As API callers see it: the score, each decayed counter and the half-life."""
        counts = {f.name: round(float(getattr(self, f.name)), 3) for f in fields(self) if f.name in COUNTERS}
        return {"score": self.score, **counts, "half_life_hours": HALF_LIFE_MS / 3_600_000}


def decay(elapsed_ms: float) -> float:
    """What a counter is worth `elapsed_ms` after it was counted: 2^(-elapsed / half-life)."""
    return math.pow(2.0, -max(elapsed_ms, 0.0) / HALF_LIFE_MS)


def reliability_score(r: Reliability) -> float:
    """0-100 (rounded to 0.1): 100 * (prior + good) / (prior + good + weighted bad), at least `FLOOR`.

    A site with nothing bad on record scores 100 whatever its volume; one failure among 200 completed jobs
    costs it about one point, a new site's first failed job about a quarter; the counters decay, so it recovers."""
    good = PRIOR_GOOD + max(r.good, 0.0)
    value = 100.0 * good / (good + max(r.bad, 0.0))
    return round(max(value, FLOOR), 1)


def site_score(r: Reliability | None, now_ms: int) -> float:
    """The score of a record as of `now_ms`; a site with no record scores 100."""
    return 100.0 if r is None else reliability_score(r.at(now_ms))
