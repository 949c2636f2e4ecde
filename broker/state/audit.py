"""`suanwang audit`: check the invariants of the live state in Redis and report what breaks them.

The audit reads in pages: each hub's sites with ZSCAN (each site's capacity and ledger in one MULTI on the
hub's shard), jobs with SCAN over their keys, tenants' counters with HSCAN and ZSCAN, the queue with ZSCAN
and the event log backwards with XREVRANGE, each page in a pipelined round trip or two. A page of jobs is
read by one short read-only script (lua/audit_jobs.lua: each job's record and whether it is in the queues,
at one moment).

Who holds which devices is checked from both sides of the two-step protocol (broker.state.ledger): every
ledger entry of a site against its owner on the job shard (a job holding there at that attempt, a standing
hold there), and every job holding devices against its site's ledger; an entry on its lease (the pending
set) or with a step in the outbox is on its way and not a finding. The two shards cannot be read at one
moment, so what looks wrong across them is read again, a few times, and reported only if it stays so.
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

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, TypeVar, cast

from redis.exceptions import WatchError

from broker.model.records import counted_models, pool_counts
from broker.state.cluster import NamespaceCluster
from broker.state.connection import StreamEntries, text, translated
from broker.state.ledger import HOLD_OWNER
from broker.state.store import Store

HOLDING = ("assigned", "running")
PAGE = 500
RETRIES = 5  # consistent re-reads of a suspect before it is reported as unconfirmed
Row = tuple[str, str, str, int, str, str]  # state, site, model, count, tenant, attempt ('0' for a hold)
Places = tuple[bool, bool, bool]  # in the queue, its tenant's window, its tenant's parked set
Entry = tuple[str, str, int]  # a ledger entry: attempt, model, count
# a site's capacity, its ledger, its owners' rows (None: no record) and the owners with a step on its way
_SiteState = tuple[dict[str, int], dict[str, Entry], dict[str, Row | None], set[str]]
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
    state, site, model, count, tenant, *attempt = (text(v) for v in raw)
    return (state, site, model, int(count or 0), tenant, (attempt[0] if attempt else "0") or "0") if state else None


def _entry(raw: Any) -> Entry:
    attempt, model, count, _seq = text(raw).split(" ")
    return attempt, model, int(count)


_PAGE_SCRIPT = (resources.files("broker.state") / "lua" / "audit_jobs.lua").read_text()


def _capacity(raw: Mapping[Any, Any]) -> dict[str, int]:
    out = {}
    for key, value in raw.items():
        try:
            out[text(key)] = int(value)
        except ValueError:
            continue
    return out


def site_findings(site: str, cap: Mapping[str, int], entries: Mapping[str, Entry], owners: Mapping[str, Row | None],
                  moving: Collection[str] = ()) -> tuple[list[Violation], Counter[str]]:  # fmt: skip
    """What is wrong at one site, from its capacity hash, its ledger (owner -> attempt, model, count), the
    records of the ledger's owners (jobs by id, holds as `hold:<id>`; None: no record) and the owners whose
    entry is on its way (on its lease, or a step for it in the outbox); and the devices each tenant holds
    there (a standing hold's devices are counted like a job's)."""
    out: list[Violation] = []
    counted: Counter[str] = Counter()
    by_tenant: Counter[str] = Counter()
    for owner, (attempt, model, count) in entries.items():
        counted[model] += count
        row = owners.get(owner)
        if owner.startswith(HOLD_OWNER):
            bound = row is not None and row[0] == "held" and row[1] == site
            what = f"{row[0]} at {row[1]}" if row is not None else "without a record"
            kind = "hold_placement"
        else:
            bound = row is not None and row[0] in HOLDING and row[1] == site and row[5] == attempt
            what = (f"{row[0]} at {row[1] or '-'} (attempt {row[5]})" if row is not None else "without a record")
            kind = "placement" if row is not None else "unknown_job"
        if bound and row is not None:
            by_tenant[row[4]] += count
            if (row[2], row[3]) != (model, count):
                out.append(Violation(kind, owner, f"holds {row[3]} {row[2]} but {site}'s ledger counts "
                                     f"{count} {model}"))  # fmt: skip
        elif owner not in moving:
            out.append(Violation(kind, owner.removeprefix(HOLD_OWNER),
                                 f"{what} yet in {site}'s ledger (attempt {attempt})"))  # fmt: skip
    for model in sorted(counted_models(cap) | set(counted)):
        total, external, allocated = pool_counts(cap, model)
        subject, usable = f"{site}/{model}", total - external
        if allocated < 0:
            out.append(Violation("negative_allocation", subject, f"allocated {allocated}"))
        if allocated != counted[model]:
            out.append(Violation("allocation_mismatch", subject, f"allocated counter {allocated} but the ledger "
                                 f"there counts {counted[model]}"))  # fmt: skip
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


def job_findings(job: str, row: Row, in_queue: bool, in_window: bool, parked: bool) -> list[Violation]:
    """What is wrong with one job, from its record and where it is: the queue, its tenant's queue (the
    window a pass reads) or its tenant's parked set (a queued job is in exactly one of those two). (Its
    site's ledger is checked by `_held_jobs`.)"""
    state = row[0]
    out = []
    if state in HOLDING:
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
            async with self.redis.pipeline(transaction=True, shard_hint=keys[0]) as watch:  # keys of one shard
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
        by_shard: dict[int, list[str]] = {}
        for job in jobs:
            by_shard.setdefault(self.k.id_shard(job), []).append(job)
        pages = [(self.k.shard(i), of[start : start + self.page]) for i, of in by_shard.items()
                 for start in range(0, len(of), self.page)]  # fmt: skip
        for sk, ids in pages:
            raw = await self._read_page(keys=[sk.prefix + ":", sk.queue], args=list(ids))
            for i, job in enumerate(ids):
                values = raw[9 * i : 9 * i + 9]
                out[job] = _row(values[:6]), (bool(values[6]), bool(values[7]), bool(values[8]))
        return out

    async def _rows(self, jobs: Sequence[str]) -> dict[str, Row | None]:
        return {job: row for job, (row, _places) in (await self._jobs_read(jobs)).items()}

    async def _owner_rows(self, owners: Sequence[str]) -> dict[str, Row | None]:
        """Ledger owners' records: jobs by id, holds as `hold:<id>`."""
        jobs = [o for o in owners if not o.startswith(HOLD_OWNER)]
        holds = [o.removeprefix(HOLD_OWNER) for o in owners if o.startswith(HOLD_OWNER)]
        rows = await self._rows(jobs) if jobs else {}
        rows.update({HOLD_OWNER + h: row for h, row in (await self._hold_rows(holds)).items()})
        return rows

    async def _moving(self, hub: str) -> set[tuple[str, str]]:
        """(site, owner) of the hub's ledger entries on their way: on a lease, or with an outbox step."""
        out = set()
        for member in await self.redis.zrange(self.k.hub(hub).pending, 0, -1):
            site, owner, _attempt = text(member).split("\t")
            out.add((site, owner))
        for member in await self._outbox():
            op, step_hub, site, *rest = member.split("\t")
            if step_hub == hub:
                out.add((site, rest[0]))
                # a merge's sources: `...\towner\tattempt\tcount\tsource\tattempt\tsource\tattempt...`
                out.update((site, rest[i]) for i in range(3, len(rest), 2) if op == "merge")
        return out

    async def _outbox(self) -> list[str]:
        """Every job shard's outbox: the steps on their way."""
        pipe = self.redis.pipeline(transaction=False)
        for sk in self.k.each_shard:
            pipe.zrange(sk.outbox, 0, -1)
        return [text(m) for members in await pipe.execute() for m in members]

    async def _site_state(self, hub: str, sites: Sequence[str]) -> dict[str, _SiteState]:
        """Each site's capacity hash and ledger (read together on the hub's shard), its owners' records and
        which of them are on their way."""
        h = self.k.hub(hub)
        pipe = self.redis.pipeline(transaction=True, shard_hint=h.prefix)  # one moment of the hub's shard
        for site in sites:
            pipe.hgetall(h.capacity(site))
            pipe.hgetall(h.held(site))
        raw = await pipe.execute()
        ledgers = {site: {text(o): _entry(v) for o, v in raw[2 * i + 1].items()} for i, site in enumerate(sites)}
        rows = await self._owner_rows(sorted({o for ledger in ledgers.values() for o in ledger}))
        moving = await self._moving(hub)
        return {site: (_capacity(raw[2 * i]), ledgers[site], {o: rows.get(o) for o in ledgers[site]},
                       {o for s, o in moving if s == site}) for i, site in enumerate(sites)}  # fmt: skip

    async def _hold_rows(self, holds: Sequence[str]) -> dict[str, Row | None]:
        """Holds as rows: state, site, model, count, tenant (None: no record)."""
        if not holds:
            return {}
        pipe = self.redis.pipeline(transaction=False)
        for hold in holds:
            pipe.hmget(self.k.for_id(hold).hold(hold), "state", "site", "model", "count", "tenant")
        return {hold: _row(raw) for hold, raw in zip(holds, await pipe.execute(), strict=True)}

    async def _again(self, read: Callable[[], Awaitable[list[Violation]]]) -> list[Violation]:
        """Findings across the two shards, read again until two reads agree (the same findings), else a warning."""
        last = await read()
        for _ in range(RETRIES):
            if not last:
                return []
            await asyncio.sleep(0.05)  # let a step on its way land
            now = await read()
            if now == last:
                return now
            last = now
        return [_unconfirmed(v.subject, "its placement") for v in last]

    # --------------------------------------------------------------------------------------------- checks

    async def _sites(self) -> None:
        """Each hub's sites: capacity counters against their ledgers, the ledgers against their owners; devices
        held per tenant."""
        for hub in await self.store.hub_ids():
            async for sites in self._zscan(self.k.hub(hub).sites):
                for site, state in (await self._site_state(hub, sites)).items():
                    found, by_tenant = site_findings(site, *state)
                    if found:
                        async def read(site: str = site, hub: str = hub) -> list[Violation]:
                            return site_findings(site, *(await self._site_state(hub, [site]))[site])[0]

                        found = await self._again(read)
                        if found:
                            by_tenant = site_findings(site, *(await self._site_state(hub, [site]))[site])[1]
                    self.report.add(found)
                    self.held.update(by_tenant)

    async def _held_jobs(self, rows: Mapping[str, Row]) -> list[Violation]:
        """Jobs holding devices against their sites' ledgers: each must have its entry at its attempt (or be
        on its way: its hold's devices passing to it)."""
        holding = {job: row for job, row in rows.items() if row[0] in HOLDING}
        if not holding:
            return []
        places = await self.store.places(row[1] for row in holding.values())
        pipe = self.redis.pipeline(transaction=False)
        order = list(holding)
        for job in order:
            row = holding[job]
            hub = places[row[1]].hub if row[1] in places else ""
            pipe.hget(self.k.hub(hub).held(row[1]), job)
        entries = await pipe.execute()
        moving = {m.split("\t")[3] for m in await self._outbox() if m.startswith("merge\t")}
        out = []
        for job, raw in zip(order, entries, strict=True):
            row = holding[job]
            if raw is not None and _entry(raw)[0] == row[5]:
                continue
            if job in moving:
                continue
            have = f"attempt {_entry(raw)[0]}" if raw is not None else "none"
            out.append(Violation("placement", job, f"{row[0]} at {row[1]} (attempt {row[5]}) but that site's "
                                 f"ledger has {have}"))  # fmt: skip
        return out

    async def _jobs(self) -> None:
        """Every job against the queues and its site's set, a job shard at a time."""
        for sk in self.k.each_shard:
            prefix = sk.job("")
            # on Redis Cluster, the node serving the shard's slot (a SCAN walks one node's keys)
            where: dict[str, Any] = (
                {"target_nodes": self.redis.node_of(sk.prefix)} if isinstance(self.redis, NamespaceCluster) else {})
            cursor: int = 0
            while True:
                cursor, keys = await self.redis.scan(cursor, match=f"{prefix}*", count=self.page, **where)
                ids = [rest for rest in (text(key)[len(prefix) :] for key in keys) if ":" not in rest]
                if ids:
                    await self._job_page(ids)
                if not cursor:
                    break

    async def _job_page(self, ids: Sequence[str]) -> None:
        rows: dict[str, Row] = {}
        for job, (row, places) in (await self._jobs_read(ids)).items():
            if row is not None:  # None: archived since the scan
                self.tenants.add(row[4])
                rows[job] = row
                self.report.add(job_findings(job, row, *places))  # read at one moment: nothing to confirm
        if await self._held_jobs(rows):
            async def read() -> list[Violation]:
                return await self._held_jobs({j: r for j, r in (await self._rows(list(rows))).items() if r})

            self.report.add(await self._again(read))

    async def _tenants(self) -> None:
        """Devices counted per tenant against what its jobs hold; queued counts against its queue."""
        usage: dict[str, int] = {}
        for sk in self.k.each_shard:
            cursor: int = 0
            while True:
                cursor, fields = await self.redis.hscan(sk.tenant_usage, cursor, count=self.page)
                usage.update({text(t): int(v) for t, v in cast(dict[bytes, bytes], fields).items()})
                if not cursor:
                    break
            async for tenants in self._zscan(sk.queued_tenants):
                self.tenants.update(tenants)
        self.tenants.update(usage)
        for tenant in sorted(set(usage) | set(self.held)):
            if usage.get(tenant, 0) != self.held[tenant]:
                self.report.add(await self._confirm_usage(tenant))
        tenants = sorted(self.tenants)
        by_shard: dict[int, list[str]] = {}
        for tenant in tenants:
            by_shard.setdefault(self.k.shard_index(tenant), []).append(tenant)
        for index, of in sorted(by_shard.items()):
            sk = self.k.shard(index)
            for start in range(0, len(of), self.page):
                page = of[start : start + self.page]
                pipe = self.redis.pipeline(transaction=True, shard_hint=sk.prefix)  # each count and its queue at once
                for tenant in page:
                    pipe.zcard(sk.tenant_queue(tenant))
                    pipe.zcard(sk.tenant_parked(tenant))
                    pipe.zscore(sk.queued_tenants, tenant)
                raw = await pipe.execute()
                for i, tenant in enumerate(page):
                    queued, counted = int(raw[3 * i]) + int(raw[3 * i + 1]), int(raw[3 * i + 2] or 0)
                    if queued != counted:
                        self.report.add([Violation("queue_count", tenant, f"{queued} queued, counted {counted}")])
                for tenant in page:
                    await self._members_exist(sk.tenant_queue(tenant))
                    await self._members_exist(sk.tenant_parked(tenant))

    async def _confirm_usage(self, tenant: str) -> list[Violation]:
        sk = self.k.for_tenant(tenant)

        async def read() -> tuple[int, int]:
            counted = int(await self.redis.hget(sk.tenant_usage, tenant) or 0)
            holding: dict[str, int] = {}  # only the jobs holding devices: a ZSCAN may repeat a member
            async for jobs in self._zscan(sk.tenant_jobs(tenant)):
                for job, row in (await self._rows(jobs)).items():
                    if row is not None and row[0] in HOLDING:
                        holding[job] = row[3]
            holds = [text(h) for h in await self.redis.zrange(sk.tenant_holds(tenant), 0, -1)]
            standing = await self._hold_rows(holds)
            return counted, sum(holding.values()) + sum(r[3] for r in standing.values() if r and r[0] == "held")

        # every allocation and release of the tenant writes its usage counter
        result = await self._watched([sk.tenant_usage], read)
        if result is None:
            return [_unconfirmed(tenant, "its device count")]
        counted, held = result
        return [] if counted == held else [Violation("tenant_usage", tenant,
                                                     f"counted {counted}, its jobs and holds hold {held}")]

    async def _queue(self) -> None:
        for sk in self.k.each_shard:
            await self._members_exist(sk.queue)

    async def _members_exist(self, key: str) -> None:
        """Every member of the queue `key` has a job record."""
        async for jobs in self._zscan(key):
            if await self.redis.exists(*(self.k.for_id(job).job(job) for job in jobs)) == len(jobs):
                continue  # the usual case: one command for the page (a queue's jobs are on its shard)
            pipe = self.redis.pipeline(transaction=False)
            for job in jobs:
                pipe.exists(self.k.for_id(job).job(job))
            for job, exists in zip(jobs, await pipe.execute(), strict=True):
                if exists:
                    continue
                pipe = self.redis.pipeline(transaction=True, shard_hint=self.k.for_id(job).prefix)
                pipe.zscore(key, job)
                pipe.exists(self.k.for_id(job).job(job))
                still, exists_now = await pipe.execute()
                if still is not None and not exists_now:
                    self.report.add([Violation("unknown_job", job, f"in {key} but has no record")])

    async def _events(self) -> None:
        """The newest state change logged for each job agrees with the job's state: each job shard's log against
        its jobs."""
        for sk in self.k.each_shard:
            await self._shard_events(sk.events)

    async def _shard_events(self, log: str) -> None:
        seen: set[str] = set()
        suspects: dict[str, str] = {}  # job -> state last logged
        top, upper, read = "", "+", 0
        while read < self.event_window:
            count = min(self.page, self.event_window - read)
            entries = cast(StreamEntries, await self.redis.xrevrange(log, upper, "-", count=count))
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
            self.report.add(await self._confirm_events(log, top, suspects))

    async def _confirm_events(self, log: str, top: str, suspects: dict[str, str]) -> list[Violation]:
        """The suspects' states and the log's newest id read in one MULTI, then the entries logged after `top`
        up to that id: what each job's newest logged state was at the moment its state was read."""
        jobs = list(suspects)
        pipe = self.redis.pipeline(transaction=True, shard_hint=self.k.for_id(jobs[0]).prefix)  # one shard's
        for job in jobs:
            pipe.hget(self.k.for_id(job).job(job), "state")
        pipe.xrevrange(log, "+", "-", count=1)
        *states, newest = await pipe.execute()
        until = text(newest[0][0]) if newest else top
        logged = dict(suspects)
        after = "(" + top
        while True:
            entries = cast(StreamEntries, await self.redis.xrange(log, after, until, count=self.page))
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
