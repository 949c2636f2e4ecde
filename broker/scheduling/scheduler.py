"""The shell around the pure matcher. A pass reads top to bottom as its steps:

    refresh -> intake -> plan (match, optimistic take) -> bind (one pipelined commit) -> notify

Round trips per pass, whatever the batch size: one to learn which sites changed (plus one to load
them), one to read the head of the queue (plus one for job specs not seen before), one pipelined commit
of every placement, and one MQTT message per site that received work.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import orjson

from broker.matching import RUNNERS_UP, Candidate, Decision, NoFit, Request, match_in_turn
from broker.matching.snapshot import Snapshot
from broker.metrics import Metrics
from broker.model.records import Commit, Placement, Refusal
from broker.scheduling.backfill import Backfill
from broker.scheduling.intake import Batch, Intake
from broker.scheduling.preemption import Preemptor
from broker.sites.assignments import PublishAssignments, publish_runs
from broker.state.store import Store
from common import logs
from common.protocol import Assignment

log = logs.get("suanwang.scheduler")
LOAD_CHUNK = 5_000
# pools a placement carries to its commit: the chosen one and runners-up to fall back on when another replica
# filled it first (the job's record shows `RUNNERS_UP` of them; the rest ride along under "more")
COMMIT_KEEP = 8  # sites loaded in one round trip when the view is brought up to date


def _latency(candidate: Candidate) -> float:
    return round(candidate.latency_ms, 2) if candidate.latency_ms < float("inf") else -1.0


def placement_of(job_id: str, decision: Decision) -> Placement:
    """What to commit for a decision, with the record of why it was made (scores and runners-up); the
    runners-up go along, so that a pool another replica filled first hands the job to the next one in the
    same commit instead of refusing it."""
    chosen = decision.chosen
    shown, more = decision.runners_up[:RUNNERS_UP], decision.runners_up[RUNNERS_UP:]
    record = orjson.dumps({"chosen": chosen.as_dict(), "runners_up": [c.as_dict() for c in shown],
                           "more": [c.as_dict() for c in more]})  # fmt: skip
    alternatives = tuple((c.site, c.hub, c.model, c.devices, c.price, _latency(c), c.arch) for c in decision.runners_up)
    return Placement(job_id, chosen.site, chosen.hub, chosen.model, chosen.devices, chosen.price, _latency(chosen),
                     arch=chosen.arch, decision=record.decode(), alternatives=alternatives)  # fmt: skip


def taken_by(decision: Decision, commit: Commit) -> Candidate:
    """The pool that took the job: the chosen one, or the runner-up the commit fell back to."""
    return decision.chosen if commit.choice == 0 else decision.runners_up[commit.choice - 1]


def assignment_of(req: Request, decision: Decision, commit: Commit) -> Assignment:
    chosen = taken_by(decision, commit)
    return Assignment(job=req.job_id, attempt=commit.attempt, action="run", model=chosen.model,
                      count=chosen.devices, duration_hours=round(chosen.est_hours, 4), name=req.name,
                      workload=req.workload, stack=chosen.stack, image=chosen.image, seq=commit.seq)  # fmt: skip


@dataclass
class Plan:
    """One pass's decisions: placements taken optimistically in the snapshot, new waiting reasons, and the
    jobs that fit nowhere now (parked out of their tenant's window until capacity may have grown)."""

    placements: list[tuple[Placement, Request, Decision]] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)
    parked: set[str] = field(default_factory=set)


class Scheduler:
    def __init__(
        self,
        store: Store,
        snapshot: Snapshot,
        publish_assignments: PublishAssignments,
        *,
        batch: int = 512,
        accept_timeout_s: float = 30.0,
        idle_poll_s: float = 0.5,
        kick: asyncio.Event | None = None,
        metrics: Metrics | None = None,
        reserve_after_s: float = 30.0,
        replica: str = "",
        preemptor: Preemptor | None = None,
    ) -> None:
        self.metrics = metrics or Metrics()
        self.store = store
        self.snapshot = snapshot
        self.publish_assignments = publish_assignments
        self.accept_timeout_ms = int(accept_timeout_s * 1000)
        self.idle_poll_s = idle_poll_s
        self.kick = kick or asyncio.Event()
        self.intake = Intake(store, batch, replica)
        self.backfill = Backfill(store, reserve_after_s)
        self.preemptor = preemptor
        self.placed = 0
        # held by a pass from its refresh to the undo of its refused placements, and by every other
        # refresh: a refresh between an optimistic take and its undo would count the take twice
        self._view = asyncio.Lock()

    async def refresh(self) -> int:
        """Apply every site change since the last refresh (after any pass under way); returns how many
        sites changed."""
        async with self._view:
            return await self._refresh()

    @asynccontextmanager
    async def view(self) -> AsyncIterator[Snapshot]:
        """The snapshot, refreshed, with no pass's optimistic takes in it, for as long as the block runs."""
        async with self._view:
            await self._refresh()
            yield self.snapshot

    async def _refresh(self) -> int:
        """Bring the view up to date with the sites changed since it was last brought up to date, `LOAD_CHUNK`
        sites a round trip: a first load of 100,000 sites in one piece would leave the process holding about
        600 MB more than it needs once the replies are gone."""
        changed = await self.store.changed_sites(self.snapshot.version)
        self.snapshot.age_reliability(self.store.time_seen)  # sites with no new event recover too
        if not changed:
            return 0
        sites = [site for site, _ in changed]
        for start in range(0, len(sites), LOAD_CHUNK):
            part = sites[start : start + LOAD_CHUNK]
            for record in await self.store.load_sites(part, self.snapshot.meta_versions(part), cached=True):
                self.snapshot.apply(record)
        self.snapshot.version = max(self.snapshot.version, max(version for _, version in changed))
        return len(changed)

    async def run_once(self) -> int:
        """One scheduling pass; returns the number of jobs placed."""
        async with self._view:
            by_site = await self._pass()
        if by_site:
            await publish_runs(self.publish_assignments, by_site)
        placed = sum(len(items) for items in by_site.values())
        self.placed += placed
        return placed

    async def _pass(self) -> dict[str, list[Assignment]]:
        await self._refresh()
        batch = await self.intake.next_batch(self.snapshot.version)
        self.backfill.keep_if_queued(batch.queued)
        held = self.intake.hold(batch.held)
        # jobs already unfit at this view (woken by a change the view held already) go back to sleep too
        asleep = {job for job in batch.unfit if not self.backfill.holds(job)}
        if not batch.requests:
            await self.store.set_reasons(held, asleep, seen=self.store.wake_seen)
            return {}
        plan = await self._plan(batch)
        plan.reasons.update(held)
        plan.parked |= asleep
        await self.store.set_reasons(plan.reasons, plan.parked, seen=self.store.wake_seen)
        commits = await self.store.allocate([p for p, _, _ in plan.placements], self.accept_timeout_ms)
        by_site, refused = self._bind(plan, commits)
        if refused:
            await self._reload(refused)
        return by_site

    async def _reload(self, sites: set[str]) -> None:
        """Load again the sites where a commit was refused: Redis holds the truth, the view is not guessed."""
        for record in await self.store.load_sites(sorted(sites), self.snapshot.meta_versions(sites), cached=True):
            self.snapshot.apply(record)

    async def _plan(self, batch: Batch) -> Plan:
        """Match the batch's jobs in turn (jobs asking the same thing share their filtering, `match_in_turn`);
        a placement takes its devices in the snapshot at once (the commit decides), so later jobs of the
        batch see them gone."""
        plan = Plan()
        self.backfill.begin_pass()
        if self.preemptor is not None:
            self.preemptor.begin_pass()
        now = time.time() * 1000
        version = self.snapshot.version
        results = match_in_turn(batch.requests, self.snapshot, keep=COMMIT_KEEP,
                                exclude_for=lambda req: self.backfill.exclude_for(req, now))  # fmt: skip
        for req, result in zip(batch.requests, results, strict=True):
            if isinstance(result, NoFit):
                message = result.message
                if self.preemptor is not None and self.preemptor.may_try(req, now):
                    preempting = await self.preemptor.consider(req, self.snapshot)
                    if preempting is not None:
                        plan.reasons[req.job_id] = message + preempting
                        plan.parked.add(req.job_id)  # its hold is handed to it when the grace period ends
                        continue
                if self.backfill.may_reserve(req, self.intake.created.get(req.job_id), now):
                    message += await self.backfill.reserve(req, self.snapshot, now)
                if self.intake.unfit(req.job_id, version, message):
                    plan.reasons[req.job_id] = message
                if not self.backfill.holds(req.job_id):  # the job a pool is held for stays in view
                    plan.parked.add(req.job_id)
                continue
            plan.placements.append((placement_of(req.job_id, result), req, result))
        return plan

    def _take(self, candidate: Candidate, sign: int) -> None:
        self.snapshot.tables[candidate.model].allocated[candidate.row] += sign * candidate.devices

    def _bind(self, plan: Plan, commits: list[Commit]) -> tuple[dict[str, list[Assignment]], set[str]]:
        """Settle each placement by what Redis decided: assignments to send, per site, for those committed,
        and the sites whose view a refusal showed to be behind."""
        by_site: dict[str, list[Assignment]] = defaultdict(list)
        behind: set[str] = set()
        for (placement, req, decision), commit in zip(plan.placements, commits, strict=True):
            if commit.refusal is not None:
                self._take(decision.chosen, -1)  # undo the optimistic take
                self._refused(req, commit.refusal)
                if commit.refusal in (Refusal.STALE_VIEW, Refusal.SITE_NOT_ONLINE):
                    behind.add(placement.site)
                continue
            taken = taken_by(decision, commit)
            if commit.choice:  # the chosen pool had filled (another replica): a runner-up took the job
                self._take(decision.chosen, -1)
                self._take(taken, +1)
                behind.add(placement.site)
                self.metrics.fallbacks.inc()
            created = self.intake.placed(req.job_id)
            self.metrics.placements.labels(taken.hub, taken.arch).inc()
            if taken.transfer_hours > 0:
                self.metrics.data_moves.labels(taken.hub).inc()
                self.metrics.data_transfer_hours.observe(taken.transfer_hours)
            if created:
                self.metrics.submit_to_allocation.observe(max(time.time() - created / 1000, 0.0))
            by_site[taken.site].append(assignment_of(req, decision, commit))
            log.info("job.allocated", job=req.job_id, site=taken.site, model=taken.model, count=taken.devices,
                     attempt=commit.attempt, choice=commit.choice)  # fmt: skip
        return by_site, behind

    def _refused(self, req: Request, refusal: Refusal) -> None:
        self.metrics.rejections.labels(refusal.value).inc()
        if refusal is Refusal.NOT_QUEUED:
            self.intake.forget(req.job_id)  # cancelled or placed by another replica
        elif refusal in (Refusal.STALE_VIEW, Refusal.SITE_NOT_ONLINE):
            self.kick.set()  # the site is reloaded at the end of this pass; try the job again
        # TENANT_LIMIT: the next pass holds the tenant's jobs

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
