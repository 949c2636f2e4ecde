"""`suanwang audit`: check the invariants of the live state in Redis and report every violation.

Everything is read in one MULTI transaction, so the audit sees one consistent moment of a running
system (jobs submitted between the key scan and the transaction are checked only for existence).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

from broker.model.records import counted_models, pool_counts
from broker.state.connection import text, translated
from broker.state.store import Store

HOLDING = ("assigned", "running")


@dataclass(frozen=True)
class Violation:
    kind: str
    subject: str
    detail: str

    def as_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "subject": self.subject, "detail": self.detail}


async def _job_ids(store: Store) -> list[str]:
    prefix = store.keys.job("")
    ids = []
    async with translated():
        async for key in store.redis.scan_iter(match=f"{prefix}*", count=1000):
            rest = text(key)[len(prefix) :]
            if ":" not in rest:
                ids.append(rest)
    return ids


async def _tenants(store: Store) -> list[str]:
    pattern = store.keys.tenant_jobs("*")
    head, tail = pattern.split("*")
    async with translated():
        return [text(k)[len(head) : -len(tail)] async for k in store.redis.scan_iter(match=pattern, count=1000)]


async def audit(store: Store, event_window: int = 200_000) -> list[Violation]:
    k = store.keys
    job_ids, tenants = await _job_ids(store), await _tenants(store)
    async with translated():
        sites = [text(s) for s in await store.redis.zrange(k.sites, 0, -1)]
        pipe = store.redis.pipeline(transaction=True)
        for job in job_ids:
            pipe.hmget(k.job(job), "state", "site", "model", "count", "tenant")
        for site in sites:
            pipe.hgetall(k.capacity(site))
            pipe.smembers(k.site_jobs(site))
        pipe.zrange(k.queue, 0, -1)
        for tenant in tenants:
            pipe.zrange(k.tenant_queue(tenant), 0, -1)
        pipe.hgetall(k.tenant_usage)
        pipe.zrange(k.queued_tenants, 0, -1, withscores=True)
        pipe.xrevrange(k.events, count=event_window)
        raw = await pipe.execute()
    jobs = {job: [text(v) if v is not None else None for v in row] for job, row in zip(job_ids, raw, strict=False)}
    at = len(job_ids)
    caps, site_sets = {}, {}
    for site in sites:
        caps[site] = {text(f): int(v) for f, v in raw[at].items()}
        site_sets[site] = {text(j) for j in raw[at + 1]}
        at += 2
    queue = [text(j) for j in raw[at]]
    tenant_queues = {t: [text(j) for j in raw[at + 1 + i]] for i, t in enumerate(tenants)}
    at += 1 + len(tenants)
    usage = {text(t): int(v) for t, v in raw[at].items()}
    queued_tenants = {text(t): int(score) for t, score in raw[at + 1]}
    events = raw[at + 2]
    out: list[Violation] = []
    out += _check_capacity(jobs, caps, site_sets)
    out += _check_placement(jobs, site_sets, queue)
    out += _check_queues(jobs, queue, tenant_queues, queued_tenants)
    out += _check_usage(jobs, usage)
    out += _check_events(jobs, events)
    unknown = {j for s in site_sets.values() for j in s} | set(queue)
    missing = [j for j in unknown if j not in jobs]
    if missing:  # submitted after the key scan, or really gone
        rows = await store.get_jobs(missing, "state")
        for job, (state,) in zip(missing, rows, strict=True):
            if state is None:
                out.append(Violation("unknown_job", job, "referenced but has no record"))
    return out


def _check_capacity(jobs: dict[str, list[Any]], caps: dict[str, dict[str, int]],
                    site_sets: dict[str, set[str]]) -> list[Violation]:  # fmt: skip
    out = []
    for site, cap in caps.items():
        held: Counter[str] = Counter()
        for job in site_sets[site]:
            row = jobs.get(job)
            if row and row[0] in HOLDING and row[2]:
                held[row[2]] += int(row[3] or 0)
        for model in sorted(counted_models(cap) | set(held)):
            total, external, allocated = pool_counts(cap, model)
            subject = f"{site}/{model}"
            if allocated < 0:
                out.append(Violation("negative_allocation", subject, f"allocated {allocated}"))
            if allocated != held[model]:
                detail = f"allocated counter {allocated} but jobs held there hold {held[model]}"
                out.append(Violation("allocation_mismatch", subject, detail))
            if allocated > total - external:
                out.append(Violation("over_allocated", subject,
                                     f"allocated {allocated} > total {total} - external {external}"))  # fmt: skip
    return out


def _check_placement(jobs: dict[str, list[Any]], site_sets: dict[str, set[str]], queue: list[str]) -> list[Violation]:
    out = []
    holders: dict[str, list[str]] = defaultdict(list)
    for site, members in site_sets.items():
        for job in members:
            holders[job].append(site)
    queued = set(queue)
    for job, (state, site, *_rest) in jobs.items():
        if state in HOLDING:
            if holders.get(job) != [site]:
                out.append(Violation("placement", job, f"{state} at {site} but held by {holders.get(job, [])}"))
            if job in queued:
                out.append(Violation("placement", job, f"{state} yet in the queue"))
        elif job in holders:
            out.append(Violation("placement", job, f"{state} yet held by {holders[job]}"))
    return out


def _check_queues(jobs: dict[str, list[Any]], queue: list[str], tenant_queues: dict[str, list[str]],
                  queued_tenants: dict[str, int]) -> list[Violation]:  # fmt: skip
    out = []
    queued = set(queue)
    for job, (state, _site, _model, _count, tenant) in jobs.items():
        in_tenant_queue = job in tenant_queues.get(tenant or "", [])
        if state == "queued" and (job not in queued or not in_tenant_queue):
            out.append(Violation("queue", job, "queued but missing from the queue or its tenant's queue"))
        elif state != "queued" and (job in queued or in_tenant_queue):
            out.append(Violation("queue", job, f"{state} but still in a queue"))
    for tenant, members in tenant_queues.items():
        if len(members) != queued_tenants.get(tenant, 0):
            out.append(Violation("queue_count", tenant,
                                 f"{len(members)} queued, counted {queued_tenants.get(tenant, 0)}"))  # fmt: skip
    return out


def _check_usage(jobs: dict[str, list[Any]], usage: dict[str, int]) -> list[Violation]:
    held: Counter[str] = Counter()
    for state, _site, _model, count, tenant in jobs.values():
        if state in HOLDING:
            held[tenant or ""] += int(count or 0)
    return [Violation("tenant_usage", tenant, f"counted {usage.get(tenant, 0)}, jobs hold {held[tenant]}")
            for tenant in set(held) | set(usage) if usage.get(tenant, 0) != held[tenant]]  # fmt: skip


def _check_events(jobs: dict[str, list[Any]], events: list[Any]) -> list[Violation]:
    """The newest state change logged for each job agrees with the job's state."""
    last: dict[str, str] = {}
    for _id, fields in events:  # newest first
        kind = text(fields.get(b"type"))
        job = text(fields.get(b"job"))
        if kind != "released" and job not in last:
            last[job] = text(fields.get(b"state"))
    return [Violation("event_log", job, f"state {row[0]} but last logged {last[job]}")
            for job, row in jobs.items() if job in last and last[job] != row[0]]  # fmt: skip
