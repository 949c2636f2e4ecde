"""`suanwang audit`: check the invariants of the live state in Redis and report what breaks them.

The audit reads in pages: sites with ZSCAN (and each site's jobs with SSCAN), jobs with SCAN over their
keys, tenants' counters with HSCAN and ZSCAN, the queue with ZSCAN and the event log backwards with
XREVRANGE, each page in a pipelined round trip or two. A page of jobs is read by one short read-only script
(lua/audit_jobs.lua: each job's record and whether it is in the queues and its site's set, at one moment).
It never runs one transaction over every job, and holds a page at a time (plus a counter per tenant and,
for the event log, the ids of the jobs its window names).

A running system changes between two pages, so whatever spans pages and looks wrong (a site's counters
against its jobs, a tenant's count, the log against a job) is read again consistently (under WATCH of the
few keys every change of it writes, or in one MULTI) and reported only if it still is; what keeps changing
too fast to be confirmed is a warning (`unconfirmed`).

Findings are errors (the broker broke an invariant) or warnings (worth an operator's eye, but nothing the
broker did wrong). A pool whose site now offers fewer devices than the broker has allocated there is one
of each, told apart by `p:<model>` in the site's capacity hash where it is recorded: the usable devices
(total - in use outside) the allocation script saw at the pool's last allocation. A correct broker never
allocates past that, so `allocated <= p` means the site shrank after its allocations (a warning), and
`allocated > p` that the broker gave out more than the site had (an error); with no record nothing shows
the site shrank, and it stays an error.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from importlib import resources
from typing import Any, TypeVar, cast

from redis.exceptions import WatchError

from broker.model.records import counted_models, pool_counts
from broker.state.connection import StreamEntries, text, translated
from broker.state.store import Store

HOLDING = ("assigned", "running")
PAGE = 500
RETRIES = 5  # consistent re-reads of a suspect before it is reported as unconfirmed
Row = tuple[str, str, str, int, str]  # state, site, model, count, tenant
Places = tuple[bool, bool, bool, bool]  # in the queue, its tenant's window, its tenant's parked set, its site's set
_SiteState = tuple[dict[str, int], dict[str, Row | None], dict[str, Row | None]]  # capacity, jobs, holds
T = TypeVar("T")


@dataclass(frozen=True)
class Violation:
    """One finding: `severity` is `error` (an invariant is broken) or `warning`."""

    kind: str
    subject: str
    detail: str
    severity: str = "error"

    def as_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "subject": self.subject, "detail": self.detail, "severity": self.severity}


@dataclass
class Report:
    """What an audit found: `violations` (errors) and `warnings`, each once."""

    violations: list[Violation] = field(default_factory=list)
    warnings: list[Violation] = field(default_factory=list)
    _seen: set[Violation] = field(default_factory=set, repr=False)

    def add(self, findings: Sequence[Violation]) -> None:
        for finding in findings:
            if finding not in self._seen:  # a SCAN may return a key twice
                self._seen.add(finding)
                (self.violations if finding.severity == "error" else self.warnings).append(finding)


def _row(raw: Sequence[Any]) -> Row | None:
    state, site, model, count, tenant = (text(v) for v in raw)
    return (state, site, model, int(count or 0), tenant) if state else None


_PAGE_SCRIPT = (resources.files("broker.state") / "lua" / "audit_jobs.lua").read_text()


def _capacity(raw: Mapping[Any, Any]) -> dict[str, int]:
    out = {}
    for key, value in raw.items():
        try:
            out[text(key)] = int(value)
        except ValueError:
            continue
    return out


def site_findings(site: str, cap: Mapping[str, int], rows: Mapping[str, Row | None],
                  holds: Mapping[str, Row | None] | None = None) -> tuple[list[Violation], Counter[str]]:  # fmt: skip
    """What is wrong at one site, from its capacity hash, the records of the jobs in its set and of the
    holds in its set of holds (None: no record); and the devices each tenant holds there (a standing
    hold's devices are counted like a job's)."""
    out: list[Violation] = []
    held: Counter[str] = Counter()
    by_tenant: Counter[str] = Counter()
    for hold, row in (holds or {}).items():
        if row is None or row[0] != "held" or row[1] != site:
            what = f"{row[0]} at {row[1]}" if row is not None else "without a record"
            out.append(Violation("hold_placement", hold, f"{what} yet in the holds of {site}"))
        else:
            held[row[2]] += row[3]
            by_tenant[row[4]] += row[3]
    for job, row in rows.items():
        if row is None:
            out.append(Violation("unknown_job", job, f"held by {site} but has no record"))
        elif row[0] not in HOLDING or row[1] != site:
            where = f" at {row[1]}" if row[1] and row[0] in HOLDING else ""
            out.append(Violation("placement", job, f"{row[0]}{where} yet held by {site}"))
        else:
            held[row[2]] += row[3]
            by_tenant[row[4]] += row[3]
    for model in sorted(counted_models(cap) | set(held)):
        total, external, allocated = pool_counts(cap, model)
        subject, usable = f"{site}/{model}", total - external
        if allocated < 0:
            out.append(Violation("negative_allocation", subject, f"allocated {allocated}"))
        if allocated != held[model]:
            out.append(Violation("allocation_mismatch", subject, f"allocated counter {allocated} but the jobs and "
                                 f"holds there hold {held[model]}"))  # fmt: skip
        if allocated > usable:
            out.append(_over(subject, total, external, allocated, cap.get(f"p:{model}")))
    return out, by_tenant


def _over(subject: str, total: int, external: int, allocated: int, basis: int | None) -> Violation:
    """A pool with more allocated than it now offers: the site shrank, or the broker over-allocated."""
    now = f"total {total} - external {external} = {total - external} < allocated {allocated}"
    if basis is not None and allocated <= basis:
        return Violation("site_shrank", subject, f"site shrank below its allocation: {now}; it had {basis} usable "
                         "when the broker last allocated there", "warning")  # fmt: skip
    known = f"only {basis} usable when the broker last allocated there" if basis is not None else (
        "no record of what it had when the broker allocated there")  # fmt: skip
    return Violation("over_allocated", subject, f"{now}; {known}")


def job_findings(job: str, row: Row, in_queue: bool, in_window: bool, parked: bool, at_site: bool
                 ) -> list[Violation]:  # fmt: skip
    """What is wrong with one job, from its record and where it is: the queue, its tenant's queue (the
    window a pass reads) or its tenant's parked set (a queued job is in exactly one of those two), and its
    site's set."""
    state, site = row[0], row[1]
    out = []
    if state in HOLDING:
        if not at_site:
            out.append(Violation("placement", job, f"{state} at {site} but not among that site's jobs"))
        if in_queue or in_window or parked:
            out.append(Violation("placement", job, f"{state} yet in the queue"))
    if state == "queued" and not (in_queue and in_window != parked):
        out.append(Violation("queue", job, "queued but missing from the queue, or not in exactly one of its "
                             "tenant's queue and parked set"))  # fmt: skip
    elif state != "queued" and (in_queue or in_window or parked):
        out.append(Violation("queue", job, f"{state} but still in a queue"))
    return out


def _unconfirmed(subject: str, what: str) -> Violation:
    return Violation("unconfirmed", subject, f"{what} looked wrong but kept changing while it was read again",
                     "warning")  # fmt: skip


class _Audit:
    def __init__(self, store: Store, page: int, event_window: int) -> None:
        self.store, self.redis, self.k = store, store.redis, store.keys
        self._read_page = store.redis.register_script(_PAGE_SCRIPT)
        self.page = page
        self.event_window = event_window
        self.report = Report()
        self.held: Counter[str] = Counter()  # devices each tenant holds, summed over sites
        self.tenants: set[str] = set()

    async def run(self) -> Report:
        async with translated():
            await self._sites()
            await self._jobs()
            await self._tenants()
            await self._queue()
            await self._events()
        return self.report

    # --------------------------------------------------------------------------------------------- reading

    async def _zscan(self, key: str) -> AsyncIterator[list[str]]:
        cursor: int = 0
        while True:
            cursor, items = await self.redis.zscan(key, cursor, count=self.page)
            if items:
                yield [text(member) for member, _score in items]
            if not cursor:
                return

    async def _watched(self, keys: Sequence[str], read: Callable[[], Awaitable[T]]) -> T | None:
        """`read()` done while none of `keys` changed (None when they kept changing)."""
        for _ in range(RETRIES):
            async with self.redis.pipeline(transaction=True) as watch:
                try:
                    await watch.watch(*keys)
                    value = await read()
                    watch.multi()
                    await watch.execute()  # refused if a watched key was written meanwhile
                    return value
                except WatchError:
                    continue
        return None

    async def _jobs_read(self, jobs: Sequence[str]) -> dict[str, tuple[Row | None, Places]]:
        """Each job's record (None: none) and places, read at one moment by one script call per page."""
        out: dict[str, tuple[Row | None, Places]] = {}
        for start in range(0, len(jobs), self.page):
            ids = jobs[start : start + self.page]
            raw = await self._read_page(keys=[self.k.prefix + ":", self.k.queue], args=list(ids))
            for i, job in enumerate(ids):
                values = raw[9 * i : 9 * i + 9]
                out[job] = _row(values[:5]), (bool(values[5]), bool(values[6]), bool(values[7]), bool(values[8]))
        return out

    async def _rows(self, jobs: Sequence[str]) -> dict[str, Row | None]:
        return {job: row for job, (row, _places) in (await self._jobs_read(jobs)).items()}

    async def _site_state(self, sites: Sequence[str]) -> dict[str, _SiteState]:
        """Each site's capacity hash, the records of the jobs in its set and of its standing holds."""
        pipe = self.redis.pipeline(transaction=False)
        for site in sites:
            pipe.hgetall(self.k.capacity(site))
            pipe.sscan(self.k.site_jobs(site), 0, count=self.page)
            pipe.smembers(self.k.site_holds(site))  # a few at most: holds last a minute or so
        raw = await pipe.execute()
        members: dict[str, set[str]] = {}
        holds: dict[str, list[str]] = {site: sorted(text(h) for h in raw[3 * i + 2]) for i, site in enumerate(sites)}
        for i, site in enumerate(sites):
            cursor, first = raw[3 * i + 1]
            members[site] = {text(j) for j in first}
            while cursor:  # a site holding more jobs than a page
                cursor, more = await self.redis.sscan(self.k.site_jobs(site), cursor, count=self.page)
                members[site].update(text(j) for j in more)
        rows = await self._rows(sorted({j for m in members.values() for j in m}))
        hold_rows = await self._hold_rows(sorted({h for hs in holds.values() for h in hs}))
        return {site: (_capacity(raw[3 * i]), {j: rows[j] for j in members[site]},
                       {h: hold_rows[h] for h in holds[site]}) for i, site in enumerate(sites)}  # fmt: skip

    async def _hold_rows(self, holds: Sequence[str]) -> dict[str, Row | None]:
        """Holds as rows: state, site, model, count, tenant (None: no record)."""
        if not holds:
            return {}
        pipe = self.redis.pipeline(transaction=False)
        for hold in holds:
            pipe.hmget(self.k.hold(hold), "state", "site", "model", "count", "tenant")
        return {hold: _row(raw) for hold, raw in zip(holds, await pipe.execute(), strict=True)}

    # --------------------------------------------------------------------------------------------- checks

    async def _sites(self) -> None:
        """Capacity counters against the jobs each site holds; devices held per tenant."""
        async for sites in self._zscan(self.k.sites):
            for site, (cap, rows, holds) in (await self._site_state(sites)).items():
                found, by_tenant = site_findings(site, cap, rows, holds)
                if found:
                    # every change there writes the capacity and the jobs' or the holds' set
                    keys = [self.k.capacity(site), self.k.site_jobs(site), self.k.site_holds(site)]
                    state = await self._watched(keys, partial(self._site_state, [site]))
                    if state is None:
                        self.report.add([_unconfirmed(site, "its capacity")])
                        continue
                    found, by_tenant = site_findings(site, *state[site])
                self.report.add(found)
                self.held.update(by_tenant)

    async def _jobs(self) -> None:
        """Every job against the queues and its site's set."""
        prefix = self.k.job("")
        cursor: int = 0
        while True:
            cursor, keys = await self.redis.scan(cursor, match=f"{prefix}*", count=self.page)
            ids = [rest for rest in (text(key)[len(prefix) :] for key in keys) if ":" not in rest]
            if ids:
                await self._job_page(ids)
            if not cursor:
                return

    async def _job_page(self, ids: Sequence[str]) -> None:
        for job, (row, places) in (await self._jobs_read(ids)).items():
            if row is not None:  # None: archived since the scan
                self.tenants.add(row[4])
                self.report.add(job_findings(job, row, *places))  # read at one moment: nothing to confirm

    async def _tenants(self) -> None:
        """Devices counted per tenant against what its jobs hold; queued counts against its queue."""
        usage: dict[str, int] = {}
        cursor: int = 0
        while True:
            cursor, fields = await self.redis.hscan(self.k.tenant_usage, cursor, count=self.page)
            usage.update({text(t): int(v) for t, v in cast(dict[bytes, bytes], fields).items()})
            if not cursor:
                break
        self.tenants.update(usage)
        async for tenants in self._zscan(self.k.queued_tenants):
            self.tenants.update(tenants)
        for tenant in sorted(set(usage) | set(self.held)):
            if usage.get(tenant, 0) != self.held[tenant]:
                self.report.add(await self._confirm_usage(tenant))
        tenants = sorted(self.tenants)
        for start in range(0, len(tenants), self.page):
            pipe = self.redis.pipeline(transaction=True)  # each count and its queue in one moment
            for tenant in tenants[start : start + self.page]:
                pipe.zcard(self.k.tenant_queue(tenant))
                pipe.zcard(self.k.tenant_parked(tenant))
                pipe.zscore(self.k.queued_tenants, tenant)
            raw = await pipe.execute()
            for i, tenant in enumerate(tenants[start : start + self.page]):
                queued, counted = int(raw[3 * i]) + int(raw[3 * i + 1]), int(raw[3 * i + 2] or 0)
                if queued != counted:
                    self.report.add([Violation("queue_count", tenant, f"{queued} queued, counted {counted}")])
            for tenant in tenants[start : start + self.page]:
                await self._members_exist(self.k.tenant_queue(tenant))
                await self._members_exist(self.k.tenant_parked(tenant))

    async def _confirm_usage(self, tenant: str) -> list[Violation]:
        async def read() -> tuple[int, int]:
            counted = int(await self.redis.hget(self.k.tenant_usage, tenant) or 0)
            holding: dict[str, int] = {}  # only the jobs holding devices: a ZSCAN may repeat a member
            async for jobs in self._zscan(self.k.tenant_jobs(tenant)):
                for job, row in (await self._rows(jobs)).items():
                    if row is not None and row[0] in HOLDING:
                        holding[job] = row[3]
            holds = [text(h) for h in await self.redis.zrange(self.k.tenant_holds(tenant), 0, -1)]
            standing = await self._hold_rows(holds)
            return counted, sum(holding.values()) + sum(r[3] for r in standing.values() if r and r[0] == "held")

        # every allocation and release of the tenant writes its usage counter
        result = await self._watched([self.k.tenant_usage], read)
        if result is None:
            return [_unconfirmed(tenant, "its device count")]
        counted, held = result
        return [] if counted == held else [Violation("tenant_usage", tenant,
                                                     f"counted {counted}, its jobs and holds hold {held}")]

    async def _queue(self) -> None:
        await self._members_exist(self.k.queue)

    async def _members_exist(self, key: str) -> None:
        """Every member of the queue `key` has a job record."""
        async for jobs in self._zscan(key):
            if await self.redis.exists(*(self.k.job(job) for job in jobs)) == len(jobs):
                continue  # the usual case: one command for the page
            pipe = self.redis.pipeline(transaction=False)
            for job in jobs:
                pipe.exists(self.k.job(job))
            for job, exists in zip(jobs, await pipe.execute(), strict=True):
                if exists:
                    continue
                pipe = self.redis.pipeline(transaction=True)
                pipe.zscore(key, job)
                pipe.exists(self.k.job(job))
                still, exists_now = await pipe.execute()
                if still is not None and not exists_now:
                    self.report.add([Violation("unknown_job", job, f"in {key} but has no record")])

    async def _events(self) -> None:
        """The newest state change logged for each job agrees with the job's state."""
        seen: set[str] = set()
        suspects: dict[str, str] = {}  # job -> state last logged
        top, upper, read = "", "+", 0
        while read < self.event_window:
            count = min(self.page, self.event_window - read)
            entries = cast(StreamEntries, await self.redis.xrevrange(self.k.events, upper, "-", count=count))
            if not entries:
                break
            top = top or text(entries[0][0])
            read += len(entries)
            upper = "(" + text(entries[-1][0])
            logged: dict[str, str] = {}
            for _id, fields in entries:  # newest first
                job = text(fields.get(b"job"))
                if job and text(fields.get(b"type")) != "released" and job not in seen and job not in logged:
                    logged[job] = text(fields.get(b"state"))
            seen.update(logged)
            for job, row in (await self._rows(list(logged))).items():
                if row is not None and row[0] != logged[job]:  # no record: archived, nothing to compare
                    suspects[job] = logged[job]
        if suspects:
            self.report.add(await self._confirm_events(top, suspects))

    async def _confirm_events(self, top: str, suspects: dict[str, str]) -> list[Violation]:
        """The suspects' states and the log's newest id read in one MULTI, then the entries logged after `top`
        up to that id: what each job's newest logged state was at the moment its state was read."""
        jobs = list(suspects)
        pipe = self.redis.pipeline(transaction=True)
        for job in jobs:
            pipe.hget(self.k.job(job), "state")
        pipe.xrevrange(self.k.events, "+", "-", count=1)
        *states, newest = await pipe.execute()
        until = text(newest[0][0]) if newest else top
        logged = dict(suspects)
        after = "(" + top
        while True:
            entries = cast(StreamEntries, await self.redis.xrange(self.k.events, after, until, count=self.page))
            for _id, fields in entries:
                job = text(fields.get(b"job"))
                if job in logged and text(fields.get(b"type")) != "released":
                    logged[job] = text(fields.get(b"state"))
            if len(entries) < self.page:
                break
            after = "(" + text(entries[-1][0])
        return [Violation("event_log", job, f"state {text(state)} but last logged {logged[job]}")
                for job, state in zip(jobs, states, strict=True)
                if state is not None and text(state) != logged[job]]  # fmt: skip


async def audit_report(store: Store, page: int = PAGE, event_window: int = 200_000) -> Report:
    """Every finding: errors and warnings."""
    return await _Audit(store, page, event_window).run()


async def audit(store: Store, page: int = PAGE, event_window: int = 200_000) -> list[Violation]:
    """The errors: invariants the broker broke (warnings, such as a site that shrank, are left out)."""
    return (await audit_report(store, page, event_window)).violations
