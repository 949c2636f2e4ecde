"""Assignments at sites that cannot start work themselves (nvidia-smi, npu-smi, Kubernetes nodes): leases.

Such a site has no scheduler Suanwang can hand a job to, so an assignment is a lease: the devices are
set aside for the job's duration (the site's operator gives the tenant access by its own means), the
site reports `running` at once and `completed` when the time is up, and a cancel ends the lease.
Refusing instead would not help: the broker would place the job on the same free devices again.

The site checks a lease against what it has free locally, so a broker whose view is stale (local
work just started) sees a rejection rather than an over-booked host. What the tenant then runs on
the leased devices shows up as local use in later inventory reads and is not taken back out (the
tools cannot say whose process it is): conservative, it can only make the site refuse, never
over-book.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass

from adapters.site import SiteLink
from broker.schemas import Assignment, Assignments, SiteEventKind
from suanwang import logs

log = logs.get("adapters.lease")

FINISHED_MEMORY = 100_000


@dataclass
class _Lease:
    model: str
    count: int
    task: asyncio.Task[None] | None = None


class LeaseKeeper:
    """The ledger of a site's leases: (job, attempt) -> devices held, plus recently finished keys."""

    def __init__(self, link: SiteLink, time_scale: float = 1.0) -> None:
        self.link = link
        self.time_scale = time_scale
        self.leases: dict[tuple[str, int], _Lease] = {}
        self.finished: OrderedDict[tuple[str, int], None] = OrderedDict()

    def own_usage(self) -> dict[str, int]:
        usage: dict[str, int] = {}
        for lease in self.leases.values():
            usage[lease.model] = usage.get(lease.model, 0) + lease.count
        return usage

    def free(self, model: str) -> int | None:
        """Devices of `model` neither used locally nor leased; None if the site has no such pool."""
        pool = next((p for p in self.link.pools if p.model == model), None)
        if pool is None:
            return None
        return pool.total - pool.in_use_external - self.own_usage().get(model, 0)

    def on_assignments(self, batch: Assignments) -> None:
        for item in batch.assignments:
            if item.action == "cancel":
                self._cancel(item)
            else:
                self._start(item)

    def _remember(self, key: tuple[str, int]) -> None:
        self.finished[key] = None
        while len(self.finished) > FINISHED_MEMORY:
            self.finished.popitem(last=False)

    def _start(self, item: Assignment) -> None:
        key = (item.job, item.attempt)
        if key in self.leases or key in self.finished:
            return  # a redelivery of something already handled
        free = self.free(item.model or "")
        if free is None or item.count < 1 or item.count > free:
            self._remember(key)
            have = "no such pool" if free is None else f"{free} free"
            reason = f"requested {item.count} x {item.model}, {have} at site {self.link.site}"
            self.link.emit(item.job, item.attempt, SiteEventKind.REJECTED, reason)
            log.info("lease rejected", site=self.link.site, job=item.job, reason=reason)
            return
        lease = self.leases[key] = _Lease(item.model or "", item.count)
        self.link.emit(item.job, item.attempt, SiteEventKind.ACCEPTED)
        self.link.emit(item.job, item.attempt, SiteEventKind.RUNNING)
        seconds = max(0.0, item.duration_hours * 3600.0 / self.time_scale)
        lease.task = asyncio.create_task(self._hold(key, seconds), name=f"lease-{self.link.site}-{item.job}")
        log.info(
            "lease started", site=self.link.site, job=item.job, model=item.model, count=item.count, seconds=seconds
        )

    async def _hold(self, key: tuple[str, int], seconds: float) -> None:
        await asyncio.sleep(seconds)
        if self.leases.pop(key, None) is not None:
            self._remember(key)
            self.link.emit(key[0], key[1], SiteEventKind.COMPLETED)
            log.info("lease ended", site=self.link.site, job=key[0], attempt=key[1])

    def _cancel(self, item: Assignment) -> None:
        # A cancel for attempt N also ends older attempts of the job still held here.
        for key in [k for k in self.leases if k[0] == item.job and k[1] <= item.attempt]:
            lease = self.leases.pop(key)
            self._remember(key)
            if lease.task is not None:
                lease.task.cancel()
            log.info("lease cancelled", site=self.link.site, job=key[0], attempt=key[1])
        self._remember((item.job, item.attempt))

    async def close(self) -> None:
        tasks = [lease.task for lease in self.leases.values() if lease.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
