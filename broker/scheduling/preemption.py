"""Preemption: a job that cannot be placed may take devices from preemptible work of lower priority.

When a high- or normal-priority job fits nowhere, the matcher is asked where it would go if the broker's
work were gone (`when_empty`); at those pools, in the matcher's order, the jobs holding devices are read
and victims are chosen by one rule (`choose_victims`):

1. only preemptible jobs of strictly lower priority, holding the pool's model at that site;
2. tenants above their fair share first (a tenant within its share is preempted last); a tenant's fair
   share is an equal part of the devices the broker has given out now, among the tenants holding any;
3. then the lowest priority first;
4. then the least work lost first: devices x time since the job started (or was assigned);
5. as few as the job needs, taken in that order.

The first pool where such victims free enough is preempted, all at once or not at all (preempt.lua): the
victims go back to the queue with "preempted by job X of tenant Y" in their history, their site is told to
checkpoint and stop them within the grace period (the longest `grace_s` among them), and their devices
pass to a hold for the preempting job that the sweeper hands to it when the grace period ends.

No cascades: a job that was preempted never preempts (preempt.lua refuses it). A job preempted
`max_preemptions` times is no longer preemptible. A job is considered at most every `RETRY_MS`, and a
pass considers at most `PER_PASS` jobs, so a full network costs a pass little.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping, Sequence

from broker.matching import Decision, Request, match
from broker.matching.snapshot import Snapshot
from broker.metrics import Metrics
from broker.model.records import Refusal
from broker.sites.assignments import PublishAssignments, preempt_payload
from broker.state.holds import Holding, HoldOption
from broker.state.store import Store
from common import logs

log = logs.get("suanwang.preemption")

RANK = {"high": 0, "normal": 1, "low": 2}
RETRY_MS = 5_000
PER_PASS = 4
CANDIDATES = 8  # pools looked at, in the matcher's order


def fair_share(usage: Mapping[str, int]) -> float:
    """An equal part of the devices given out now, among the tenants holding any."""
    holding = [n for n in usage.values() if n > 0]
    return sum(holding) / len(holding) if holding else 0.0


def choose_victims(holdings: Sequence[Holding], model: str, need: int, priority: str, usage: Mapping[str, int],
                   now_ms: int) -> list[Holding] | None:  # fmt: skip
    """The jobs to preempt for `need` devices of `model` (the module's rule), or None when they cannot free
    that many."""
    rank = RANK[priority]
    share = fair_share(usage)
    eligible = [h for h in holdings if h.preemptible and h.model == model and RANK.get(h.priority, 0) > rank]

    def order(h: Holding) -> tuple[bool, int, int, str]:
        within_share = usage.get(h.tenant, 0) <= share
        lost = h.count * max(now_ms - h.since_ms, 0)
        return within_share, -RANK[h.priority], lost, h.job

    chosen: list[Holding] = []
    freed = 0
    for h in sorted(eligible, key=order):
        if freed >= need:
            break
        chosen.append(h)
        freed += h.count
    return chosen if freed >= need else None


class Preemptor:
    def __init__(self, store: Store, publish: PublishAssignments, metrics: Metrics, max_preemptions: int = 3) -> None:
        self.store, self.publish, self.metrics = store, publish, metrics
        self.max_preemptions = max_preemptions
        self.tried: dict[str, float] = {}  # job -> when it was last considered (ms)
        self.budget = PER_PASS

    def begin_pass(self) -> None:
        self.budget = PER_PASS
        if len(self.tried) > 10_000:
            cutoff = time.time() * 1000 - RETRY_MS
            self.tried = {job: at for job, at in self.tried.items() if at > cutoff}

    def may_try(self, req: Request, now_ms: float) -> bool:
        if self.budget <= 0 or RANK.get(req.priority, 2) >= RANK["low"]:
            return False
        return now_ms - self.tried.get(req.job_id, -RETRY_MS) >= RETRY_MS

    async def consider(self, req: Request, snapshot: Snapshot) -> str | None:
        """Preempt for `req` if lower-priority preemptible work can make room; a note for its `waiting`."""
        now = await self.store.clock_ms()
        self.budget -= 1
        self.tried[req.job_id] = time.time() * 1000
        where = match(req, snapshot, keep=CANDIDATES, when_empty=True)
        if not isinstance(where, Decision):
            return None
        candidates = [where.chosen, *where.runners_up]
        holdings = await self.store.holdings(sorted({c.site for c in candidates}))
        for c in candidates:
            table = snapshot.tables[c.model]
            free = int(table.total[c.row]) - int(table.external[c.row]) - int(table.allocated[c.row])
            # a preemption is one step on its job's shard: it stops only jobs of that shard
            mine = [h for h in holdings.get(c.site, []) if self.store.same_shard(h.job, req.job_id)]
            victims = choose_victims(mine, c.model, c.devices - max(free, 0), req.priority,
                                     self.store.usage, now)  # fmt: skip
            if not victims:
                continue
            grace_ms = max(v.grace_ms for v in victims)
            hold_id = self.store.keys.with_shard_of(f"p{int(now):011x}{secrets.token_hex(4)}", req.job_id)
            option = HoldOption.of_offer({**c.as_dict(), "duration_hours": req.duration_hours})
            _, refusal = await self.store.preempt(req.job_id, hold_id, option, grace_ms, self.max_preemptions,
                                                  [(v.job, v.attempt) for v in victims])  # fmt: skip
            if refusal is not None:
                log.info("preemption.refused", job=req.job_id, site=c.site, refusal=refusal.value)
                if refusal in (Refusal.NO_CASCADE, Refusal.NOT_QUEUED):
                    return None
                continue
            self.metrics.preemptions.inc(len(victims))
            try:
                await self.publish(c.site, preempt_payload(c.site, [(v.job, v.attempt) for v in victims],
                                                           grace_ms / 1000))  # fmt: skip
            except Exception as exc:  # the victims are requeued in Redis; a reconcile stops them at the site
                log.warning("preemption.publish_failed", site=c.site, error=str(exc))
            log.info("job.preempting", job=req.job_id, site=c.site, hold=hold_id, grace_ms=grace_ms,
                     victims=[v.job for v in victims])  # fmt: skip
            s = "" if len(victims) == 1 else "s"
            return f"; preempting {len(victims)} job{s} at {c.site}, starts when their {grace_ms / 1000:g} s grace ends"
        return None
