"""Giving work back: jobs of a site that went offline or silent, and assignments never accepted.

Every path ends in the `transition` script, which checks the job's site and attempt, so running any of
these twice, or on several replicas at once, changes nothing the second time.
"""

from __future__ import annotations

import asyncio
from collections import Counter

from broker.metrics import Metrics
from broker.sites.assignments import PublishAssignments, publish_runs, reconcile_payload, run_of, tell_site_to_cancel
from broker.state.store import Store
from common import logs

log = logs.get("suanwang.lifecycle")


async def reconcile_site(store: Store, publish: PublishAssignments, site: str) -> int:
    """Tell a site that came back which of its jobs the broker still counts there; it stops the rest."""
    jobs = await store.jobs_at(site)
    rows = await store.get_jobs(jobs, "attempt", "state") if jobs else []
    items = [(job, int(attempt or 0)) for job, (attempt, state) in zip(jobs, rows, strict=True)
             if state in ("assigned", "running")]  # fmt: skip
    payload = reconcile_payload(site, items)
    try:
        await publish(site, payload)
    except Exception as exc:  # it reconciles on its next return instead
        log.warning("reconcile.publish_failed", site=site, error=str(exc))
        return len(items)
    log.info("site.reconciled", site=site, jobs=len(items))
    await resend_newer(store, publish, site, set(jobs))
    return len(items)


async def resend_newer(store: Store, publish: PublishAssignments, site: str, listed: set[str]) -> None:
    """Send again, after a reconcile list, the runs of jobs assigned to `site` since the list was read.

    Their first run message may have reached the site before the list, which then stopped them; the site
    does not count a job stopped by a reconcile as finished, so the run sent again (after the list, on the
    same connection, so in order) starts it. A run the site already holds is ignored there."""
    newer = [job for job in await store.jobs_at(site) if job not in listed]
    if not newer:
        return
    fields = ("attempt", "state", "model", "count", "name", "decision", "spec")
    runs = [run_of(job, dict(zip(fields, row, strict=True)))
            for job, row in zip(newer, await store.get_jobs(newer, *fields), strict=True)]  # fmt: skip
    items = [run for run in runs if run is not None]
    if items:
        await publish_runs(publish, {site: items})
        log.info("site.runs_resent", site=site, jobs=len(items))


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


async def sweep(store: Store, publish: PublishAssignments, site_ttl_ms: int) -> Counter[str]:
    """One maintenance pass: expire unaccepted assignments, fail jobs past their deadline, and give back
    the work of silent sites. Returns how many jobs moved, by reason."""
    now = await store.clock_ms()
    moved: Counter[str] = Counter()
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
    for site in await store.silent_sites(now - site_ttl_ms):
        if await store.set_site_status(site, "stale", expect="online"):
            log.warning("site.silent", site=site)
            moved["site_silent"] += await requeue_site(store, publish, site, f"site {site} stopped sending heartbeats")
    return moved


async def run_sweeper(
    store: Store, publish: PublishAssignments, site_ttl_s: float, kick: asyncio.Event, stop: asyncio.Event,
    every_s: float = 1.0, metrics: Metrics | None = None,
) -> None:  # fmt: skip
    while not stop.is_set():
        try:
            moved = await sweep(store, publish, int(site_ttl_s * 1000))
            if moved:
                kick.set()
            if metrics is not None:
                for reason, n in moved.items():
                    metrics.rejections.labels(reason).inc(n)
                await metrics.observe_redis(store)
        except Exception as exc:  # Redis away: try again next round
            log.warning("sweep.failed", error=str(exc), error_type=type(exc).__name__)
        try:
            await asyncio.wait_for(stop.wait(), every_s)
        except TimeoutError:
            pass
