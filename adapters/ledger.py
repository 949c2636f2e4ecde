"""A site's ledger of the work it holds for the broker, shared by every adapter that times work itself.

An assignment is checked against what the site has free locally (its pools, less outside use, less
what it already holds), so a broker whose view is stale sees a rejection rather than an over-booked
site. A (job, attempt) is handled once: QoS 1 redeliveries and late duplicates are ignored. A cancel
for attempt N also ends older attempts of the job. A reconcile message (sent when the site comes back
after an outage) is the broker's whole list for the site as of its assignment sequence `upto`: anything
else held here is stopped, except runs with a higher `seq`, which were assigned after the list was read.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass

from adapters.site import SiteLink
from common import logs
from common.protocol import Assignment, Assignments, SiteEventKind

log = logs.get("adapters.ledger")

# (job, attempt) keys remembered after they finish, so late QoS 1 duplicates are still ignored.
FINISHED_MEMORY = 100_000
CHECKPOINT_S = 1.0  # the longest a simulated job takes to checkpoint when it is preempted


@dataclass
class Held:
    model: str
    count: int
    task: asyncio.Task[None] | None = None
    seq: int | None = None  # the run's place in the site's assignment sequence


def newer(held: Held, upto: int | None) -> bool:
    """Whether a held run was assigned after a reconcile list stamped `upto` was read (so it stays)."""
    return upto is not None and held.seq is not None and held.seq > upto


class Ledger:
    """Work held at one site: (job, attempt) -> devices, each released when its time is up or it is cancelled."""

    # Whether `running` is reported with `accepted` (a lease starts at once) or when the work starts.
    running_at_once = False

    def __init__(self, link: SiteLink, time_scale: float = 1.0) -> None:
        self.link = link
        self.time_scale = time_scale
        self.held: dict[tuple[str, int], Held] = {}
        self.finished: OrderedDict[tuple[str, int], None] = OrderedDict()

    def own_usage(self) -> dict[str, int]:
        usage: dict[str, int] = {}
        for held in self.held.values():
            usage[held.model] = usage.get(held.model, 0) + held.count
        return usage

    def free(self, model: str) -> int | None:
        """Devices of `model` neither used outside the broker nor held here; None if there is no such pool."""
        pool = next((p for p in self.link.pools if p.model == model), None)
        if pool is None:
            return None
        return pool.total - pool.in_use_external - self.own_usage().get(model, 0)

    def on_assignments(self, batch: Assignments) -> None:
        if batch.reconcile:
            self._reconcile(batch)
            return
        for item in batch.assignments:
            if item.action == "cancel":
                self._cancel(item)
            elif item.action == "preempt":
                self._preempt(item)
            else:
                self._start(item)

    def _reconcile(self, batch: Assignments) -> None:
        """Stop what the broker no longer counts here; report what it counts that this site does not hold."""
        listed = {(a.job, a.attempt) for a in batch.assignments}
        for key in [k for k, held in self.held.items() if k not in listed and not newer(held, batch.upto)]:
            self._cancel(Assignment(job=key[0], attempt=key[1], action="cancel"))
        for key in sorted(listed):
            if key not in self.held and key not in self.finished:
                self._lost(key)

    def _remember(self, key: tuple[str, int]) -> None:
        self.finished[key] = None
        while len(self.finished) > FINISHED_MEMORY:
            self.finished.popitem(last=False)

    def _lost(self, key: tuple[str, int]) -> None:
        """Tell the broker this site does not hold work it counts here; a late run for it is then ignored."""
        self._remember(key)
        reason = f"site {self.link.site} does not hold it (lost in a restart, or its run has not arrived)"
        self.link.emit(key[0], key[1], SiteEventKind.LOST, reason)
        log.info("job lost", site=self.link.site, job=key[0], attempt=key[1])

    def _reject(self, key: tuple[str, int], reason: str) -> None:
        self._remember(key)
        self.link.emit(key[0], key[1], SiteEventKind.REJECTED, reason)
        log.info("job rejected", site=self.link.site, job=key[0], attempt=key[1], reason=reason)

    def _start(self, item: Assignment) -> None:
        key = (item.job, item.attempt)
        if key in self.held or key in self.finished:
            return  # a redelivery of something already handled
        free = self.free(item.model or "")
        if free is None or item.count < 1 or item.count > free:
            have = "no such pool" if free is None else f"{free} free"
            self._reject(key, f"requested {item.count} x {item.model}, {have} at site {self.link.site}")
            return
        held = self.held[key] = Held(item.model or "", item.count, seq=item.seq)
        self.link.emit(item.job, item.attempt, SiteEventKind.ACCEPTED)
        if self.running_at_once:
            self.link.emit(item.job, item.attempt, SiteEventKind.RUNNING)
        seconds = max(0.0, item.duration_hours * 3600.0 / self.time_scale)
        held.task = asyncio.create_task(self._execute(key, seconds), name=f"{self.link.site}-{item.job}")
        log.info("job accepted", site=self.link.site, job=item.job, attempt=item.attempt, model=item.model,
                 count=item.count, seconds=seconds)  # fmt: skip

    async def _execute(self, key: tuple[str, int], seconds: float) -> None:
        try:
            if not self.running_at_once:
                self.link.emit(key[0], key[1], SiteEventKind.RUNNING)
            await self._work(key, seconds)
        finally:
            # also on cancellation: the devices are free again either way
            if self.held.pop(key, None) is not None:
                self._remember(key)

    async def _work(self, key: tuple[str, int], seconds: float) -> None:
        """Hold the devices for `seconds`, then report the job completed."""
        await asyncio.sleep(seconds)
        self.link.emit(key[0], key[1], SiteEventKind.COMPLETED)
        log.info("job completed", site=self.link.site, job=key[0], attempt=key[1])

    def _preempt(self, item: Assignment) -> None:
        """Checkpoint and stop within the grace period: the work stops after half of it (at most
        `CHECKPOINT_S`), its devices free before the broker hands them to the work that preempted it."""
        delay = min(item.grace_s or 0.0, 2 * CHECKPOINT_S) / 2
        stop = Assignment(job=item.job, attempt=item.attempt, action="cancel")
        asyncio.get_running_loop().call_later(delay, self._cancel, stop)
        log.info("job preempted", site=self.link.site, job=item.job, attempt=item.attempt, grace_s=item.grace_s)

    def _cancel(self, item: Assignment) -> None:
        for key in [k for k in self.held if k[0] == item.job and k[1] <= item.attempt]:
            # free the devices now: a task cancelled before its first step never runs `finally`
            held = self.held.pop(key)
            self._remember(key)
            if held.task is not None:
                held.task.cancel()
            log.info("job cancelled", site=self.link.site, job=key[0], attempt=key[1])
        self._remember((item.job, item.attempt))

    async def close(self) -> None:
        tasks = [held.task for held in self.held.values() if held.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
