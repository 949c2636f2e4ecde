"""What the broker tells sites: run, cancel and reconcile messages, built from the protocol's
`Assignment` model (the one the adapters validate against) and encoded once per site."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from broker.model.job import JobSpec
from broker.model.records import Commit
from common import logs
from common.protocol import Assignment, assignments_payload

log = logs.get("suanwang.assignments")


class PublishAssignments(Protocol):
    """Publishes one `assignments` message to a site (QoS 1)."""

    async def __call__(self, site: str, payload: bytes, /) -> None: ...


def cancel_payload(site: str, jobs: Iterable[tuple[str, int]]) -> bytes:
    """An assignments message telling `site` to stop these (job, attempt) pairs."""
    return assignments_payload(site, (Assignment(job=job, attempt=attempt, action="cancel") for job, attempt in jobs))


def reconcile_payload(site: str, jobs: Iterable[tuple[str, int]], upto: int) -> bytes:
    """Everything the broker counted at `site` when its assignment sequence was `upto`: the site stops any
    job it runs that is not on it, unless its run's `seq` is higher (assigned after the list was read)."""
    items = (Assignment(job=job, attempt=attempt, action="run") for job, attempt in jobs)
    return assignments_payload(site, items, reconcile=True, upto=upto)


async def tell_site_to_cancel(publish: PublishAssignments, site: str, jobs: Sequence[tuple[str, int]]) -> None:
    if not jobs:
        return
    try:
        await publish(site, cancel_payload(site, jobs))
    except Exception as exc:  # best effort: the site's stale events are ignored by attempt anyway
        log.warning("cancel.publish_failed", site=site, error=str(exc))


async def publish_runs(publish: PublishAssignments, by_site: Mapping[str, Sequence[Assignment]]) -> None:
    """One message per site, all sites at once (each QoS 1 publish waits for its PUBACK)."""

    async def one(site: str, items: Sequence[Assignment]) -> None:
        try:
            await publish(site, assignments_payload(site, items))
        except Exception as exc:  # the assignment is in Redis; the accept timeout returns it to the queue
            log.warning("assignment.publish_failed", site=site, error=str(exc))

    await asyncio.gather(*(one(site, items) for site, items in by_site.items()))


def held_assignment(job_id: str, spec: JobSpec, offer: dict[str, Any], commit: Commit) -> Assignment:
    """What a site is told to run for a job placed from a hold: the held pool, for the duration the quote
    estimated there, scaled from the quoted job's duration to this job's."""
    quoted = float(offer.get("duration_hours") or spec.duration_hours)
    hours = float(offer.get("est_hours") or spec.duration_hours) * spec.duration_hours / quoted
    return Assignment(job=job_id, attempt=commit.attempt, action="run", model=offer["model"],
                      count=int(offer["devices"]), duration_hours=round(hours, 4), name=spec.name,
                      workload=spec.workload, stack=offer.get("stack"), image=offer.get("image"),
                      seq=commit.seq)  # fmt: skip


def preempt_payload(site: str, jobs: Iterable[tuple[str, int]], grace_s: float) -> bytes:
    """An assignments message telling `site` to checkpoint and stop these (job, attempt) pairs within
    `grace_s`: they were given back to the queue for higher-priority work."""
    items = (Assignment(job=job, attempt=attempt, action="preempt", grace_s=grace_s) for job, attempt in jobs)
    return assignments_payload(site, items)
