"""EASY backfill: the first job that has waited too long gets the pool it would use held back until its
expected start; later jobs may still use that pool if they end before then, so small work fills the gap
without delaying it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from broker.matching import NoFit, Request, match
from broker.matching.snapshot import Snapshot
from broker.state.store import Store


@dataclass(frozen=True)
class Reservation:
    """A pool held back for a blocked job until its expected start (only work that ends sooner may use it)."""

    job: str
    model: str
    row: int
    site: str
    start_ms: float
    made_ms: float = 0.0  # when the pool was chosen
    note: str = ""  # what the job's `waiting` says about it


# how long a reservation stands before the holder's pool is chosen again: choosing it is a full match over
# every pool (capacity counted as if the broker's work were gone), which a busy scheduler would otherwise
# pay on every pass while the gang waits
REFRESH_MS = 1000.0


class Backfill:
    def __init__(self, store: Store, reserve_after_s: float) -> None:
        self.store = store
        self.reserve_after_ms = reserve_after_s * 1000
        self.reservation: Reservation | None = None
        # jobs no pool could take even with the broker's work gone, and when that was found: not asked
        # again for `REFRESH_MS` (each asking is a full match), so they do not hold up the jobs after them
        self.unreservable: dict[str, float] = {}
        self.tried = False  # whether this pass has chosen a pool for a reservation already

    def keep_if_queued(self, queued: set[str]) -> None:
        if self.reservation is not None and self.reservation.job not in queued:
            self.reservation = None  # the gang was placed, cancelled or failed

    def holds(self, job: str) -> bool:
        return self.reservation is not None and self.reservation.job == job

    def exclude_for(self, req: Request, now_ms: float) -> tuple[str, int] | None:
        """The (model, row) `req` may not use: the held pool, unless it ends before the holder starts."""
        held = self.reservation
        if held is None or req.job_id == held.job or now_ms + req.duration_hours * 3.6e6 <= held.start_ms:
            return None
        return (held.model, held.row)

    def begin_pass(self) -> None:
        """A new pass may choose a pool for one reservation: choosing is a full match, and a pass of jobs
        no pool could ever take would otherwise pay one per job."""
        self.tried = False

    def may_reserve(self, req: Request, created_ms: int | None, now_ms: float) -> bool:
        held = self.reservation
        if self.tried and not (held is not None and held.job == req.job_id):
            return False
        waited = created_ms is not None and now_ms - created_ms >= self.reserve_after_ms
        if not waited or not (held is None or held.job == req.job_id):
            return False
        found = self.unreservable.get(req.job_id)
        return found is None or not 0 <= now_ms - found < REFRESH_MS

    async def reserve(self, req: Request, snapshot: Snapshot, now_ms: float) -> str:
        """Hold back the pool `req` would get when the broker's work there ends; a note for its `waiting`.

        The start is expected from the end times of the broker's jobs there (their start plus estimated
        hours). A reservation made less than `REFRESH_MS` ago stands as it is."""
        held = self.reservation
        if held is not None and held.job == req.job_id and 0 <= now_ms - held.made_ms < REFRESH_MS:
            return held.note
        self.tried = True
        target = match(req, snapshot, when_empty=True)
        if isinstance(target, NoFit):
            self.reservation = None
            if len(self.unreservable) >= 10_000:
                self.unreservable = {j: t for j, t in self.unreservable.items() if 0 <= now_ms - t < REFRESH_MS}
            self.unreservable[req.job_id] = now_ms
            return ""
        chosen = target.chosen
        free = int(snapshot.tables[chosen.model].free(np.array([chosen.row]))[0])
        start = now_ms
        if free < chosen.devices:
            start = math.inf
            for end_ms, count in sorted(await self.store.holdings_ends(chosen.site, chosen.model)):
                free += count
                if free >= chosen.devices:
                    start = max(float(end_ms), now_ms)
                    break
        if start == math.inf:
            # the broker's own jobs there do not explain the shortfall: the view is behind a release that
            # is under way (or outside use is shifting); keep the pool for the gang and start it first
            start = now_ms
        minutes = max(0.0, (start - now_ms) / 60000)
        note = f"; {chosen.site} is held for it, expected to start in about {minutes:.0f} min"
        self.reservation = Reservation(req.job_id, chosen.model, chosen.row, chosen.site, start, now_ms, note)
        return note
