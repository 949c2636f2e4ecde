"""Giving work back: jobs of a site that went offline or silent, and assignments never accepted.

Every path ends in the `transition` script, which checks the job's site and attempt, so running any of
these twice, or on several replicas at once, changes nothing the second time.
"""

from __future__ import annotations

import asyncio
from collections import Counter

from broker.metrics import Metrics
from broker.model.job import JobSpec
from broker.sites.assignments import (
    PublishAssignments,
    held_assignment,
    publish_runs,
    reconcile_payload,
    tell_site_to_cancel,
)
from broker.state.store import Store
from common import logs

log = logs.get("suanwang.lifecycle")


async def reconcile_site(store: Store, publish: PublishAssignments, site: str) -> int:
    """Tell a site that came back which of its jobs the broker still counts there; it stops the rest.

    The list is stamped with the site's assignment sequence as it was read (in the same step): a run
    assigned after it carries a higher `seq`, and the site keeps it whether it arrives before or after the
    list."""
    upto, items = await store.reconcile_list(site)
    try:
        await publish(site, reconcile_payload(site, items, upto))
    except Exception as exc:  # it reconciles on its next return instead
        log.warning("reconcile.publish_failed", site=site, error=str(exc))
        return len(items)
    log.info("site.reconciled", site=site, jobs=len(items), upto=upto)
    return len(items)


async def requeue_site(store: Store, publish: PublishAssignments, site: str, reason: str) -> int:
    """Return every job held at `site` to the queue; returns how many went back."""
    jobs = await store.jobs_at(site)
    if not jobs:
        return 0
    attempts = [a or "0" for (a,) in await store.get_jobs(jobs, "attempt")]
    # fenced on the attempt read: a job placed again in between (even at this site) is left to its new attempt
    results = await store.transitions((job, "requeue", site, a, reason) for job, a in zip(jobs, attempts, strict=True))
    back = [(job, int(a)) for job, a, r in zip(jobs, attempts, results, strict=True) if r == "queued"]
    for job, _ in back:
        log.info("job.requeued", job=job, site=site, reason=reason)
    await tell_site_to_cancel(publish, site, back)
    return len(back)


async def hand_over(store: Store, publish: PublishAssignments, hold: str, accept_timeout_ms: int) -> bool:
    """Give a preemption's hold to the job it is for (fenced: the hold standing, the job queued) and tell the
    site to run it; a hold that cannot be given (the job was cancelled or placed elsewhere meanwhile) is left
    to expire, which gives its devices back."""
    handed = await store.commit_hold(hold, accept_timeout_ms)
    if handed is None:
        return False
    held, job, commit = handed
    if not commit.ok:
        log.info("preemption.not_handed_over", hold=hold, job=held.for_job, refusal=str(commit.refusal))
        return False
    spec = JobSpec.model_validate_json(job["spec"])
    await publish_runs(publish, {held.site: [held_assignment(held.for_job, spec, held.offer, commit)]})
    log.info("job.allocated", job=held.for_job, site=held.site, model=held.model, count=held.count,
             attempt=commit.attempt, hold=hold)  # fmt: skip
    return True


async def sweep(store: Store, publish: PublishAssignments, site_ttl_ms: int,
                accept_timeout_ms: int = 30_000) -> Counter[str]:  # fmt: skip
    """One maintenance pass: expire unaccepted assignments, fail jobs past their deadline, end holds past
    their time, and give back the work of silent sites. Returns how many jobs moved, by reason."""
    now = await store.clock_ms()
    moved: Counter[str] = Counter()
    renewed = await store.new_primary()
    if renewed:  # writes of the old primary may be lost: every site learns what the broker counts there now
        log.warning("redis.new_primary", sites=len(renewed))
        for renewed_site in renewed:
            await reconcile_site(store, publish, renewed_site)
    overdue = await store.overdue_assignments(now)
    if overdue:
        rows = await store.get_jobs(overdue, "site", "attempt")
        results = await store.transitions(  # fenced on the holder and attempt read
            (job, "expire", site or "", attempt or "", "the site did not accept the assignment in time")
            for job, (site, attempt) in zip(overdue, rows, strict=True)
        )
        for job, (site, attempt), result in zip(overdue, rows, results, strict=True):
            if result in ("queued", "failed") and site:
                moved["accept_timeout"] += 1
                log.info("job.requeued", job=job, site=site, reason="accept timeout")
                await tell_site_to_cancel(publish, site, [(job, int(attempt or 0))])
    due = await store.due_deadlines(now)
    if due:
        results = await store.transitions((job, "deadline", "", "", "not started by its deadline") for job in due)
        for job, result in zip(due, results, strict=True):
            if result == "failed":
                moved["deadline"] += 1
                log.info("job.deadline_passed", job=job)
    due_holds = await store.due_holds(now)
    for hold, for_job in due_holds:  # a preemption's grace period is over: the devices go to the job
        if for_job and await hand_over(store, publish, hold, accept_timeout_ms):
            moved["preempted_for"] += 1
    if due_holds:  # each checked against Redis's clock by the script that ends it (a handed-over one is used)
        moved["hold_expired"] += sum(await store.expire_holds([hold for hold, _ in due_holds]))
    for site in await store.silent_sites(now - site_ttl_ms):
        if await store.set_site_status(site, "stale", expect="online"):
            log.warning("site.silent", site=site)
            moved["site_silent"] += await requeue_site(store, publish, site, f"site {site} stopped sending heartbeats")
    ledger = await store.sweep_ledger(now)  # two-step changes a broker left half done (broker.state.ledger)
    moved.update({f"ledger_{k}": v for k, v in ledger.items() if v})
    await store.retire(now)  # archive finished jobs past the retention, a bounded batch; trim the usage log
    return moved


async def run_sweeper(
    store: Store, publish: PublishAssignments, site_ttl_s: float, kick: asyncio.Event, stop: asyncio.Event,
    every_s: float = 1.0, metrics: Metrics | None = None, accept_timeout_s: float = 30.0,
) -> None:  # fmt: skip
    while not stop.is_set():
        try:
            moved = await sweep(store, publish, int(site_ttl_s * 1000), int(accept_timeout_s * 1000))
            if moved:
                kick.set()
            if metrics is not None:
                for reason, n in moved.items():
                    if reason == "hold_expired":
                        metrics.holds.labels("expired").inc(n)
                    elif reason == "preempted_for":
                        metrics.holds.labels("used").inc(n)
                    else:
                        metrics.rejections.labels(reason).inc(n)
                await metrics.observe_redis(store)
        except Exception as exc:  # Redis away: try again next round
            log.warning("sweep.failed", error=str(exc), error_type=type(exc).__name__)
        try:
            await asyncio.wait_for(stop.wait(), every_s)
        except TimeoutError:
            pass
