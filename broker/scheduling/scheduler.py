"""The shell around the pure matcher: refresh the snapshot, match a batch, commit, publish.

Round trips per pass, whatever the batch size: one to learn which sites changed (plus one to load
them), one to read the head of the queue (plus one for job specs not seen before), one pipelined commit
of every placement, and one MQTT message per site that received work.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np
import orjson

from broker.matching.scan import Decision, NoFit, Request, match
from broker.matching.snapshot import Snapshot
from broker.metrics import Metrics
from broker.model.job import JobSpec
from broker.model.records import Placement
from broker.state.store import Store
from common import logs
from common.protocol import ASSIGNMENTS_SCHEMA

log = logs.get("suanwang.scheduler")

Publish = Callable[[str, bytes], Awaitable[None]]


@dataclass(frozen=True)
class Reservation:
    """A pool held back for a blocked job until its expected start (only work that ends sooner may use it)."""

    job: str
    model: str
    row: int
    site: str
    start_ms: float


def placement_of(job_id: str, decision: Decision) -> Placement:
    """What to commit for a decision, with the record of why it was made (scores and runners-up)."""
    chosen = decision.chosen
    record = orjson.dumps({"chosen": chosen.as_dict(), "runners_up": [c.as_dict() for c in decision.runners_up]})
    latency = round(chosen.latency_ms, 2) if chosen.latency_ms < float("inf") else -1.0
    return Placement(job_id, chosen.site, chosen.hub, chosen.model, chosen.devices, chosen.price, latency,
                     arch=chosen.arch, decision=record.decode())  # fmt: skip


class Scheduler:
    def __init__(
        self,
        store: Store,
        snapshot: Snapshot,
        publish_assignments: Publish,
        *,
        batch: int = 512,
        accept_timeout_s: float = 30.0,
        idle_poll_s: float = 0.5,
        kick: asyncio.Event | None = None,
        metrics: Metrics | None = None,
        reserve_after_s: float = 30.0,
    ) -> None:
        self.metrics = metrics or Metrics()
        self.store = store
        self.snapshot = snapshot
        self.publish_assignments = publish_assignments
        self.batch = batch
        self.accept_timeout_ms = int(accept_timeout_s * 1000)
        self.idle_poll_s = idle_poll_s
        self.kick = kick or asyncio.Event()
        self._requests: OrderedDict[str, Request | None] = OrderedDict()
        self._created: dict[str, int] = {}  # job -> submission time (ms), for the latency histogram
        self._reservation: Reservation | None = None
        self.reserve_after_ms = reserve_after_s * 1000
        self._unfit: dict[str, tuple[int, str]] = {}  # job -> (snapshot version, reason written)
        self.placed = 0

    async def refresh(self) -> int:
        """Apply every site change since the last refresh; returns how many sites changed."""
        changed = await self.store.changed_sites(self.snapshot.version)
        if not changed:
            return 0
        records = await self.store.load_sites([site for site, _ in changed], self.snapshot.meta_versions())
        for record in records:
            self.snapshot.apply(record)
        self.snapshot.version = max(self.snapshot.version, max(version for _, version in changed))
        return len(changed)

    async def _requests_for(self, ids: list[str]) -> list[Request]:
        missing = [job_id for job_id in ids if job_id not in self._requests]
        if missing:
            rows = await self.store.get_jobs(missing, "spec", "created", "last_site")
            for job_id, (spec, created, last_site) in zip(missing, rows, strict=True):
                req = Request.of(job_id, JobSpec.model_validate_json(spec)) if spec else None
                if req is not None and last_site:
                    req = req.relaxed(avoid_sites=frozenset({last_site}))
                self._requests[job_id] = req
                self._created[job_id] = int(created or 0)
            while len(self._requests) > 200_000:
                dropped, _ = self._requests.popitem(last=False)
                self._created.pop(dropped, None)
        return [req for job_id in ids if (req := self._requests.get(job_id)) is not None]

    async def _queue_head(self) -> tuple[list[str], dict[str, str], set[str]]:
        """Jobs to consider this pass, fairly across tenants, and why any were held back.

        Every tenant's first job comes before any tenant's second (so 10,000 jobs from one tenant do not
        block one job from another), priority decides within a round, and a tenant at its device limit
        waits. Jobs already found unfit at this snapshot version are skipped.
        """
        heads = await self.store.queue_heads(self.batch)
        usage, limits = self.store.usage, self.store.limits
        version = self.snapshot.version
        held: dict[str, str] = {}
        ids: list[str] = []
        for job_id, _position, _score, tenant in sorted(heads, key=lambda h: (h[1], h[2])):
            limit = limits.get(tenant)
            if limit is not None and usage.get(tenant, 0) >= limit:
                held[job_id] = f"tenant {tenant} holds {usage.get(tenant, 0)} devices, its limit is {limit}"
            elif self._unfit.get(job_id, (-1, ""))[0] != version:
                ids.append(job_id)
        return ids[: self.batch], held, {h[0] for h in heads}

    async def run_once(self) -> int:
        """One scheduling pass; returns the number of jobs placed."""
        await self.refresh()
        head, held, queued = await self._queue_head()
        if self._reservation is not None and self._reservation.job not in queued:
            self._reservation = None  # the gang was placed, cancelled or failed
        requests = await self._requests_for(head)
        if held:
            await self.store.set_reasons({j: r for j, r in held.items() if self._unfit.get(j, (0, ""))[1] != r})
            for job_id, reason in held.items():
                self._unfit[job_id] = (-2, reason)  # re-checked every pass: usage changes without a site change
        if not requests:
            return 0
        if len(self._unfit) > 200_000:
            self._unfit.clear()  # entries of jobs that left the queue elsewhere; rebuilt as needed
        placements: list[tuple[Placement, Request, Decision]] = []
        reasons: dict[str, str] = {}
        now = time.time() * 1000
        for req in requests:
            reserved = self._reservation
            exclude = None
            if (
                reserved is not None
                and req.job_id != reserved.job
                and now + req.duration_hours * 3.6e6 > reserved.start_ms
            ):
                exclude = (reserved.model, reserved.row)  # backfill only what ends before the gang starts
            result = match(req, self.snapshot, exclude=exclude)
            if isinstance(result, NoFit):
                message = result.message
                if (reserved is None or reserved.job == req.job_id) and self._waited(req.job_id, now):
                    note = await self._reserve(req, now)
                    message += note
                previous = self._unfit.get(req.job_id)
                self._unfit[req.job_id] = (self.snapshot.version, message)
                if previous is None or previous[1] != message:
                    reasons[req.job_id] = message
                continue
            chosen = result.chosen
            self.snapshot.tables[chosen.model].allocated[chosen.row] += chosen.devices  # optimistic; commit decides
            placements.append((placement_of(req.job_id, result), req, result))
        await self.store.set_reasons(reasons)
        results = await self.store.allocate([p for p, _, _ in placements], self.accept_timeout_ms)
        by_site: dict[str, list[dict[str, object]]] = defaultdict(list)
        stale = False
        for (placement, req, decision), attempt in zip(placements, results, strict=True):
            if attempt <= 0:  # undo the optimistic take; Redis holds the truth
                self.snapshot.tables[decision.chosen.model].allocated[decision.chosen.row] -= decision.chosen.devices
            if attempt > 0:
                self._unfit.pop(req.job_id, None)
                self._requests.pop(req.job_id, None)
                created = self._created.pop(req.job_id, 0)
                self.metrics.placements.labels(placement.hub, placement.arch).inc()
                if created:
                    self.metrics.submit_to_allocation.observe(max(time.time() - created / 1000, 0.0))
                chosen = decision.chosen
                by_site[placement.site].append(
                    {"job": req.job_id, "attempt": attempt, "action": "run", "model": placement.model,
                     "count": placement.count, "duration_hours": round(chosen.est_hours, 4), "name": req.name,
                     "workload": req.workload, "stack": chosen.stack, "image": chosen.image}
                )  # fmt: skip
                log.info("job.allocated", job=req.job_id, site=placement.site, model=placement.model,
                         count=placement.count, attempt=attempt)  # fmt: skip
            elif attempt == -1:
                self._requests.pop(req.job_id, None)  # cancelled or placed by another replica
                self.metrics.rejections.labels("not_queued").inc()
            elif attempt == -3:
                self.metrics.rejections.labels("tenant_limit").inc()  # the next pass holds the tenant's jobs
            else:
                stale = True  # our view was behind Redis; the next pass reloads the site
                self.metrics.rejections.labels("stale_view" if attempt == 0 else "site_not_online").inc()
        if by_site:
            await self._publish(by_site)
        placed = sum(len(v) for v in by_site.values())
        self.placed += placed
        if stale:
            self.kick.set()
        return placed

    def _waited(self, job_id: str, now: float) -> bool:
        created = self._created.get(job_id)
        return created is not None and now - created >= self.reserve_after_ms

    async def _reserve(self, req: Request, now: float) -> str:
        """Hold back, for the first job that has waited too long, the pool it would get when work there ends.

        EASY backfill: later jobs may still use that pool if they end before the job's expected start, so
        small work fills the gap without delaying it. The start is expected from the end times of the
        broker's jobs there (their start plus estimated hours). Returns a note for the job's `waiting`.
        """
        target = match(req, self.snapshot, when_empty=True)
        if isinstance(target, NoFit):
            self._reservation = None
            return ""
        chosen = target.chosen
        table = self.snapshot.tables[chosen.model]
        free = int(table.free(np.array([chosen.row]))[0])
        start = now
        if free < chosen.devices:
            ends = sorted(await self.store.holdings_ends(chosen.site, chosen.model))
            start = float("inf")
            for end_ms, count in ends:
                free += count
                if free >= chosen.devices:
                    start = max(float(end_ms), now)
                    break
        if start == float("inf"):
            # the broker's own jobs there do not explain the shortfall: the view is behind a release that
            # is under way (or outside use is shifting); keep the pool for the gang and start it first
            start = now
        self._reservation = Reservation(req.job_id, chosen.model, chosen.row, chosen.site, start)
        minutes = max(0.0, (start - now) / 60000)
        return f"; {chosen.site} is held for it, expected to start in about {minutes:.0f} min"

    async def _publish(self, by_site: dict[str, list[dict[str, object]]]) -> None:
        """One message per site, all sites at once (each QoS 1 publish waits for its PUBACK)."""

        async def one(site: str, items: list[dict[str, object]]) -> None:
            payload = orjson.dumps({"schema": ASSIGNMENTS_SCHEMA, "site": site, "assignments": items})
            try:
                await self.publish_assignments(site, payload)
            except Exception as exc:  # the assignment is in Redis; the accept timeout returns it to the queue
                log.warning("assignment.publish_failed", site=site, error=str(exc))

        await asyncio.gather(*(one(site, items) for site, items in by_site.items()))

    async def run(self, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
        """Schedule until `stop` is set: at once when kicked, otherwise every `idle_poll_s`.

        With `ready` (the MQTT link's connected event), the first pass waits for it: assignments made
        before the link is up could not be published and would wait out the accept timeout.
        """
        if ready is not None:
            await ready.wait()
        while not stop.is_set():
            try:
                await asyncio.wait_for(self.kick.wait(), self.idle_poll_s)
            except TimeoutError:
                pass
            self.kick.clear()
            try:
                placed = await self.run_once()
            except Exception as exc:  # a pass that fails (Redis down) is retried on the next tick
                log.warning("scheduler.pass_failed", error=str(exc), error_type=type(exc).__name__)
                await asyncio.sleep(self.idle_poll_s)
                continue
            if placed:
                self.kick.set()  # there may be more behind this batch
