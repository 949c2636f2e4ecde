"""The two-step protocol (broker.state.ledger) against a real Redis, with a broker that may stop between any two of
its round trips: a stateful model-based test.

A hypothesis state machine submits jobs of three tenants (one with a device limit) for three sites on two hubs
(two models, pools of 4 to 8 devices, so they fill up), and drives the store's own entry points: allocations
(`allocate`, a pool and maybe a runner-up on the other hub; a requeued job placed again where it was),
transitions (running, completed, failed, cancel, requeue; now and then with a stale attempt), quote holds taken,
released, expired and submitted onto (`take_hold`, `release_hold`, `expire_holds`, `submit_held`), preemptions and
their hand-over (`preempt`, `commit_hold`), a job's binding or a hold's take after its lease is over (maybe after
the sweeper released the reservation), and the sweeper (`sweep_ledger`) at a chosen moment: now, past the
outbox's age, or past the leases and their margin.

Any of those may be stopped: the store's Redis client is wrapped (`GatedRedis`) so that, armed with k, the next
operation's first k round trips reach Redis and the next one does not (or the k-th runs and its reply is lost:
done, but the broker never learns it). The commands really run or really do not; after a stop a fresh store on
the same Redis carries on, as a replica taking over would.

The invariant, after every step, read from Redis at one moment:

- no pool is over-allocated: at each site and model the ledger's counts sum to `a:<model>`, which is at most what
  the pool offers;
- every job the job shard says holds devices (assigned or running at a site, attempt a) has its ledger entry there
  for (job, a, model, count), and every standing hold its entry `hold:<id>` (0, model, count), unless a step
  naming it is in the outbox;
- every ledger entry belongs to such an owner, or is on its lease (in its hub's pending set), or has an outbox
  step on its way; every member of a pending set has its entry; no tenant holds more than its limit, and each
  tenant's usage counter is what its jobs and holds hold;
- the job shard agrees with a plain model of the run (each job queued, holding where at which attempt, or ended;
  each hold standing, used, released or expired), which follows every step where its outcome is certain (an
  allocation stopped before its binding leaves the job queued at its attempt; a transition whose script ran
  applied) and reads Redis only where it is not (which pool a reservation found room in), checking that what it
  reads is one of the outcomes allowed;
- right after a sweep at `now` that was not stopped: nothing in a pending set whose lease ended before
  `now - MARGIN_MS`, nothing in the outbox older than `now - OUTBOX_AGE_MS`.

At the end, after the sweeper ran twice past every lease, margin and outbox age, the outbox and every pending set
are empty, every site's ledger is exactly its owners' (the jobs holding there, the holds standing there), the
audit finds nothing and the history checker no violation.

The written-out runs at the end are failures the machine found (and that are fixed), minimal, through the same
gated store.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, replace
from importlib import resources
from typing import Any, ClassVar, TypeVar, cast

import orjson
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from redis.asyncio.client import Pipeline

from broker.model.job import JobSpec
from broker.model.records import Placement, Refusal
from broker.state.audit import audit
from broker.state.base import SCRIPTS
from broker.state.history import check_history
from broker.state.holds import HoldOption
from broker.state.keys import Keys
from broker.state.ledger import HOLD_OWNER, LEASE_MS, MARGIN_MS, OUTBOX_AGE_MS, Reserved, hold_owner
from broker.state.store import Store
from common.errors import HoldNotStanding
from common.protocol import Capacity
from suanwang.servers import RedisServer
from tests.integration.test_state_machine import SitePlan

T = TypeVar("T")

# --------------------------------------------------------------------------- the world


A100, H800 = "A100-80G", "H800"
SITES = (
    SitePlan("g1", "guizhou", "guian", 10.0, {A100: 8, H800: 4}),
    SitePlan("g2", "guizhou", "guian", 9.0, {A100: 4}),
    SitePlan("n1", "neimenggu", "horinger", 8.0, {A100: 4, H800: 8}),
)
PLAN = {s.id: s for s in SITES}
HUBS = tuple(sorted({s.hub for s in SITES}))
POOLS = tuple((s.id, m) for s in SITES for m in s.pools)  # (site, model)
TENANTS = ("t1", "t2", "t3")
LIMITS = {"t2": 8}  # most devices t2 may hold at once
RANK = {"high": 0, "normal": 1, "low": 2}
HOLDING = ("assigned", "running")
T0 = 1_700_000_000_000
ACCEPT_TIMEOUT_MS = 3_600_000
HOLD_TTL_MS = 3_600_000  # a quote's hold: standing until the run expires it (by a `now` it is told)
GRACE_MS = 3_600_000  # a preemption's hold: the same
MAX_PREEMPTIONS = 2
MAX_ATTEMPTS = 5  # the store's default: a job requeued at this attempt fails instead

JOBS = st.tuples(st.sampled_from(TENANTS), st.sampled_from([(A100,), (H800,), (A100, H800)]),
                 st.sampled_from([2, 4]), st.sampled_from(["high", "normal", "low"]), st.booleans())  # fmt: skip
JobAsk = tuple[str, tuple[str, ...], int, str, bool]


@dataclass(frozen=True)
class Stop:
    """Where the next operation stops: after `after` of its round trips reached Redis; with `lose`, the reply of the
    last of them is lost (it ran, the broker never learnt it)."""

    after: int
    lose: bool
    script: str = ""  # else: right after the round trip that carries this script, its reply kept (`after` unused)

    def __str__(self) -> str:
        if self.script:
            return f"after {self.script}"
        return f"after {self.after} round trip(s){' (its reply lost)' if self.lose and self.after else ''}"


def right_after(script: str) -> Stop:
    return Stop(0, False, script)


# A transition's or a hold's end: the job shard's script, then the site shard's step, then its outbox entry removed.
# Stopped before the script, after it (its reply lost, or kept: the step not sent), after the step (the same).
BETWEEN_STEPS = (None, Stop(0, False), Stop(1, True), Stop(1, False), Stop(2, True), Stop(2, False))


def stops(trips: int) -> st.SearchStrategy[Stop | None]:
    """No stop, or a stop after any of an operation's `trips` round trips (after 0: before its first; after its last
    with the reply kept: none)."""
    return st.one_of(st.none(), st.builds(Stop, after=st.integers(0, trips), lose=st.booleans()))


def job_spec(name: str, ask: JobAsk) -> JobSpec:
    tenant, models, count, priority, preemptible = ask
    return JobSpec.model_validate({
        "name": name, "tenant": tenant, "resources": {"arch": "GPU", "models": list(models), "count": count},
        "origin": "shanghai", "duration_hours": 1, "priority": priority,
        **({"preemptible": True, "grace_s": 0} if preemptible else {}),
    })  # fmt: skip


def capacity(site: SitePlan) -> Capacity:
    return Capacity.model_validate({
        "schema": "suanwang.capacity/1", "site": site.id, "hub": site.hub, "cluster": site.cluster, "seq": 1,
        "pools": [{"arch": "GPU", "model": model, "memory_gb": 80, "total": total, "in_use_external": 0,
                   "per_node": 8, "price_cny_per_hour": site.price} for model, total in site.pools.items()],
    })  # fmt: skip


def offer(site: str, model: str) -> dict[str, Any]:
    return {"site": site, "hub": PLAN[site].hub, "model": model, "est_hours": 1.0}


def option(site: str, model: str, count: int) -> HoldOption:
    return HoldOption(site, PLAN[site].hub, model, "GPU", count, PLAN[site].price, 20.0, offer(site, model))


# --------------------------------------------------------------------------- stopping the broker


class Stopped(Exception):
    """The broker stopped here (the test's own: nothing in the store catches it)."""


class Gate:
    """Counts an operation's round trips to Redis and stops the broker where it is armed to; records what each round
    trip carried (a script by its name), so the test knows which steps ran."""

    def __init__(self) -> None:
        lua = resources.files("broker.state") / "lua"
        self.names = {hashlib.sha1((lua / f"{n}.lua").read_text().encode()).hexdigest(): n for n in SCRIPTS}
        self.left: int | None = None  # round trips still let through (None: not armed)
        self.until = ""  # or: the script after whose round trip nothing more goes through
        self.lose = False
        self.trips: list[tuple[str, ...]] = []

    def arm(self, stop: Stop | None) -> None:
        self.trips = []
        self.until = stop.script if stop is not None else ""
        self.left = stop.after if stop is not None and not stop.script else None
        self.lose = stop is not None and stop.lose

    def what(self, commands: Sequence[Sequence[Any]]) -> tuple[str, ...]:
        out = []
        for args in commands:
            name = str(args[0]).upper()
            out.append(self.names.get(str(args[1]), "?") if name == "EVALSHA" else name.lower())
        return tuple(out)

    async def trip(self, commands: Sequence[Sequence[Any]], send: Callable[[], Awaitable[T]]) -> T:
        what = self.what(commands)
        if self.left == 0:
            raise Stopped(f"stopped before {what}")
        if self.left is not None:
            self.left -= 1
        reply = await send()
        self.trips.append(what)
        if self.until and self.until in what:
            self.left = 0
        elif self.left == 0 and self.lose:
            raise Stopped(f"stopped with the reply of {what} lost")
        return reply

    def ran(self, script: str) -> bool:
        return any(script in trip for trip in self.trips)

    def last(self) -> str:
        return "+".join(self.trips[-1]) if self.trips else "nothing"


async def load_scripts(redis: aioredis.Redis) -> None:
    """The store's scripts loaded before the first step: no NOSCRIPT round trip (and reload) in the counts."""
    for name in SCRIPTS:
        await redis.script_load((resources.files("broker.state") / "lua" / f"{name}.lua").read_text())


class GatedPipeline(Pipeline):
    gate: Gate

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        send = super().execute
        return await self.gate.trip([args for args, _options in self.command_stack], lambda: send(raise_on_error))


class GatedRedis(aioredis.Redis):
    """A real client whose every round trip (a command, a pipeline, a transaction) passes the gate first."""

    gate: Gate

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        send = super().execute_command
        return await self.gate.trip([args], lambda: send(*args, **options))

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> Pipeline:
        pipe = GatedPipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)
        pipe.gate = self.gate
        return pipe


# --------------------------------------------------------------------------- the model


@dataclass
class JobModel:
    tenant: str
    models: tuple[str, ...]
    count: int
    priority: str
    preemptible: bool
    state: str = "queued"
    attempt: int = 0
    site: str = ""
    model: str = ""
    preemptions: int = 0
    preempting: str = ""
    last_site: str = ""  # where it was before it was requeued


@dataclass
class HoldModel:
    tenant: str
    site: str
    model: str
    count: int
    expires: int
    spec: JobSpec | None  # the job it was quoted for (None: a preemption's hold)
    for_job: str = ""
    state: str = "held"
    job: str = ""


Entry = tuple[int, str, int]  # a ledger entry: attempt, model, count


@dataclass
class World:
    """One read of everything the checks look at, at one moment."""

    jobs: dict[str, dict[str, str]]
    holds: dict[str, dict[str, str]]
    capacity: dict[str, dict[str, int]]
    ledger: dict[str, dict[str, Entry]]  # site -> owner -> entry
    pending: dict[tuple[str, str, int], int]  # (site, owner, attempt) -> the end of its lease
    outbox: dict[str, int]  # step -> when
    usage: dict[str, int]
    strays: list[str]  # jobs and holds that must never have been stored, found stored

    def moving(self) -> set[tuple[str, str]]:
        """(site, owner) named by a step in the outbox: its owner, and a merge's sources."""
        out = set()
        for step in self.outbox:
            op, _hub, site, *rest = step.split("\t")
            out.add((site, rest[0]))
            if op == "merge":
                out.update((site, rest[i]) for i in range(3, len(rest), 2))
        return out

    def owner_entry(self, owner: str) -> tuple[str, Entry] | None:
        """Where the owner is expected: a job holding devices, or a standing hold (None: it holds nothing)."""
        if owner.startswith(HOLD_OWNER):
            h = self.holds.get(owner[len(HOLD_OWNER) :])
            if h is None or h.get("state") != "held":
                return None
            return h["site"], (0, h["model"], int(h["count"]))
        j = self.jobs.get(owner)
        if j is None or j.get("state") not in HOLDING:
            return None
        return j["site"], (int(j["attempt"]), j["model"], int(j["count"]))

    def owners(self) -> dict[str, tuple[str, Entry]]:
        found = {job: self.owner_entry(job) for job in self.jobs}
        found.update({hold_owner(h): self.owner_entry(hold_owner(h)) for h in self.holds})
        return {owner: at for owner, at in found.items() if at is not None}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _pool(p: Placement, i: int) -> tuple[str, str]:
    """Pool i of a placement (0 the chosen one) as (site, model)."""
    return (p.site, p.model) if i == 0 else (p.alternatives[i - 1][0], p.alternatives[i - 1][2])


class TwoStepBroker(RuleBasedStateMachine):
    redis_url: ClassVar[str] = ""
    # whether the run passes devices from owner to owner (preemptions, hand-overs, jobs submitted onto holds: the
    # ledger's merge step); without, only reservations, bindings and releases
    merges: ClassVar[bool] = True
    # whether a job may ask for either of two models (else the first it names only)
    either_model: ClassVar[bool] = True

    def __init__(self) -> None:
        super().__init__()
        self.failed = False
        self.runner = asyncio.Runner()
        self.keys = Keys(f"ts{uuid.uuid4().hex[:10]}")
        self.gate = Gate()
        self.reader = aioredis.Redis.from_url(self.redis_url)  # the checks' own client, never stopped
        self.store = self.new_store()
        self.jobs: dict[str, JobModel] = {}
        self.holds: dict[str, HoldModel] = {}
        self.never_stored: list[str] = []  # jobs refused at submission
        self.never_held: list[str] = []  # holds refused
        self.held_ids = 0
        self.run(self._start())

    # ------------------------------------------------------------------ plumbing

    def new_store(self) -> Store:
        client = cast(GatedRedis, GatedRedis.from_url(self.redis_url))
        client.gate = self.gate
        return Store(client, self.keys)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        try:
            return self.runner.run(coro)
        except BaseException:
            self.failed = True
            raise

    async def _start(self) -> None:
        await load_scripts(self.reader)
        for tenant, limit in LIMITS.items():
            await self.store.set_tenant_limit(tenant, limit)
        for site in SITES:
            assert await self.store.apply_capacity(capacity(site))

    def act(self, what: str, stop: Stop | None, call: Callable[[Store], Awaitable[T]]) -> tuple[bool, T | None]:
        """Run one operation of the store, stopped where `stop` says; (whether it ran to its end, its result). After a
        stop, a fresh store takes over."""

        async def go() -> tuple[bool, T | None]:
            self.gate.arm(stop)
            try:
                return True, await call(self.store)
            except Stopped:
                old, self.store = self.store, self.new_store()
                await old.close()
                return False, None
            finally:
                self.gate.left = None  # what ran stays in `trips` for the step to read

        done, result = self.run(go())
        event(f"{what}: {'ran to its end' if done else f'stopped {stop}, last {self.gate.last()}'}")
        return done, result

    async def _clock(self) -> int:
        seconds, micros = await self.reader.time()
        return int(seconds) * 1000 + int(micros) // 1000

    def usage(self, tenant: str) -> int:
        """What the model says the tenant holds: its jobs holding devices and its standing holds."""
        return sum(j.count for j in self.jobs.values() if j.tenant == tenant and j.state in HOLDING) + sum(
            h.count for h in self.holds.values() if h.tenant == tenant and h.state == "held"
        )

    def fits(self, tenant: str, count: int, freed: int = 0) -> bool:
        return tenant not in LIMITS or self.usage(tenant) - freed + count <= LIMITS[tenant]

    def in_state(self, *states: str) -> list[str]:
        return sorted(j for j, m in self.jobs.items() if m.state in states)

    def bound(self, job: str, site: str, model: str, attempt: int) -> None:
        j = self.jobs[job]
        j.state, j.site, j.model, j.attempt = "assigned", site, model, attempt

    async def _rows(self, jobs: Sequence[str]) -> list[dict[str, str]]:
        pipe = self.reader.pipeline(transaction=True)
        for job in jobs:
            pipe.hgetall(self.keys.only.job(job))
        return [{_text(k): _text(v) for k, v in raw.items()} for raw in await pipe.execute()]

    async def _hold_row(self, hold: str) -> dict[str, str]:
        return {_text(k): _text(v) for k, v in (await self.reader.hgetall(self.keys.only.hold(hold))).items()}

    # ------------------------------------------------------------------ rules: jobs

    @initialize(asks=st.lists(JOBS, min_size=2, max_size=5))
    def submit_first(self, asks: list[JobAsk]) -> None:
        self.submit(asks)

    @rule(asks=st.lists(JOBS, min_size=1, max_size=2))
    def submit(self, asks: list[JobAsk]) -> None:
        for ask in asks:
            if not self.either_model:
                ask = (ask[0], ask[1][:1], *ask[2:])
            name = f"j{len(self.jobs) + len(self.never_stored) + 1:02d}"
            _, created = self.run(self.store.submit(name, job_spec(name, ask), at_ms=T0 + len(self.jobs)))
            assert created
            tenant, models, count, priority, preemptible = ask
            self.jobs[name] = JobModel(tenant, models, count, priority, preemptible)

    @precondition(lambda self: bool(self.in_state("queued")))
    @rule(data=st.data(), stop=stops(6))
    def allocate(self, data: st.DataObject, stop: Stop | None) -> None:
        """Store.allocate of one or two queued jobs, each at a pool and maybe a runner-up (perhaps on the other hub):
        reserve, bind, then settle or release."""
        jobs = data.draw(st.lists(st.sampled_from(self.in_state("queued")), min_size=1, max_size=2, unique=True))
        placements = []
        for job in jobs:
            fitting = [p for p in POOLS if p[1] in self.jobs[job].models]
            pools = data.draw(st.lists(st.sampled_from(fitting), min_size=1, max_size=2, unique=True), label=job)
            placements.append(self.placement(job, pools))
        self._allocate(placements, stop)

    def requeued(self) -> list[str]:
        return [j for j in self.in_state("queued") if self.jobs[j].last_site]

    @precondition(lambda self: bool(self.requeued()))
    @rule(data=st.data(), stop=stops(6))
    def allocate_again(self, data: st.DataObject, stop: Stop | None) -> None:
        """A requeued job placed again at the site it left (the next pass, the site still there): where the release
        of its last attempt may still be on its way, and must not take the new one's devices when it comes."""
        job = data.draw(st.sampled_from(self.requeued()), label="job")
        j = self.jobs[job]
        pools = [p for p in POOLS if p[0] == j.last_site and p[1] in j.models]
        self._allocate([self.placement(job, pools[:1])], stop)

    def placement(self, job: str, pools: Sequence[tuple[str, str]]) -> Placement:
        """The job at the first of `pools`, the others its runners-up."""
        count = self.jobs[job].count
        options = [(s, PLAN[s].hub, m, count, PLAN[s].price, 20.0, "GPU") for s, m in pools]
        record = orjson.dumps({"chosen": offer(*pools[0]), "runners_up": [offer(*p) for p in pools[1:]]})
        site, hub, model, count, price, latency, arch = options[0]
        return Placement(job, site, hub, model, count, price, latency, arch=arch, decision=record.decode(),
                         alternatives=tuple(options[1:]))  # fmt: skip

    def _allocate(self, placements: Sequence[Placement], stop: Stop | None) -> None:
        over = {p.job: not self.fits(self.jobs[p.job].tenant, p.count) for p in placements}
        done, commits = self.act("allocate", stop, lambda s: s.allocate(placements, ACCEPT_TIMEOUT_MS))
        if done:
            assert commits is not None
            for p, commit in zip(placements, commits, strict=True):
                j = self.jobs[p.job]
                if commit.ok:
                    assert commit.attempt == j.attempt + 1, (p.job, commit, j)
                    assert not over[p.job], f"{p.job} bound beyond its tenant's limit: {commit}"
                    self.bound(p.job, *_pool(p, commit.choice), commit.attempt)
                else:
                    assert commit.refusal in (Refusal.STALE_VIEW, Refusal.TENANT_LIMIT), (p.job, commit)
            return
        if not self.gate.ran("bind"):
            return  # nothing bound: every job is still queued at its attempt (the model, which the checks compare)
        # the binding ran, its reply perhaps lost: each job is bound at one of its placement's pools, or still queued
        for p, row in zip(placements, self.run(self._rows([p.job for p in placements])), strict=True):
            j = self.jobs[p.job]
            if row["state"] == "queued":
                continue
            pools = [_pool(p, i) for i in range(1 + len(p.alternatives))]
            assert row["state"] == "assigned" and int(row["attempt"]) == j.attempt + 1, (p.job, row, j)
            assert (row["site"], row["model"]) in pools, (p.job, row, pools)
            self.bound(p.job, row["site"], row["model"], int(row["attempt"]))

    @rule(data=st.data(), who=st.sampled_from(["job", "hold"]),
          then=st.sampled_from(["release", "leave it", "sweep first"]))  # fmt: skip
    def second_step_after_the_lease(self, data: st.DataObject, who: str, then: str) -> None:
        """A broker reserves devices (for a queued job's next attempt, or a quote's new hold), then takes the job
        shard's step only once the lease is over (it was slow): the binding, or the hold's take, is refused (-7) and
        nothing changes there. The entry is released at once, or left to the sweeper; or (`sweep first`) the sweeper
        ran past the lease before the step came, found the owner unbound and released the entry: the race the fence
        is for."""
        store = self.store
        site, model = data.draw(st.sampled_from(POOLS), label="pool")
        hub, price = PLAN[site].hub, PLAN[site].price
        if who == "job":
            jobs = [j for j in self.in_state("queued") if model in self.jobs[j].models]
            if not jobs:
                return
            owner = job = data.draw(st.sampled_from(jobs), label="job")
            j = self.jobs[job]
            attempt, count, tenant = j.attempt + 1, j.count, j.tenant
        else:
            self.held_ids += 1
            hold_id = f"q{self.held_ids:02d}"
            owner, attempt = hold_owner(hold_id), 0
            tenant, count = data.draw(st.sampled_from(TENANTS)), data.draw(st.sampled_from([2, 4]))
        (got,) = self.run(store.run_scripts([store.reserve_call(hub, owner, attempt, [(site, model, count)])]))
        event(f"{who}'s step after the lease: reserve {'took' if isinstance(got, list) else int(got)}")
        if not isinstance(got, list):
            return
        if then == "sweep first":
            now = int(got[2]) + MARGIN_MS + 1
            self.run(store.sweep_ledger(now))
            self.swept(self.run(self._read()), now)
        over = int(got[2]) - LEASE_MS - 1  # the end of the lease as it stood, over now
        if who == "job":
            p = Placement(job, site, hub, model, count, price, 20.0, arch="GPU")
            late = Reserved(int(got[0]), int(got[1]), over)
            call = store._bind_call(p, (site, hub, model, count, price, 20.0, "GPU"), ACCEPT_TIMEOUT_MS, attempt, late)
        else:
            self.never_held.append(hold_id)
            spec = job_spec("quoted", (tenant, (model,), count, "normal", False))
            call = (
                store._hold,
                [self.keys.only.hold(hold_id), self.keys.prefix + ":"],
                [
                    "take",
                    hold_id,
                    tenant,
                    HOLD_TTL_MS,
                    "",
                    spec.placement_hash(),
                    store.events_maxlen,
                    "",
                    "",
                    over,
                    site,
                    hub,
                    model,
                    "GPU",
                    count,
                    price,
                    20.0,
                    orjson.dumps(offer(site, model)).decode(),
                ],
            )
        (reply,) = self.run(store.run_scripts([call]))
        assert int(reply) == -7, f"{who} {owner}'s step after its lease was not refused: {reply}"
        if then == "release":
            self.run(store.run_scripts([store.ledger_call(hub, "release", site, owner, attempt)]))

    @precondition(lambda self: bool(self.in_state("queued", *HOLDING)))
    @rule(data=st.data(), action=st.sampled_from(["running", "completed", "failed", "cancel"]),
          stale=st.sampled_from([False, False, False, True]), stop=st.sampled_from(BETWEEN_STEPS))  # fmt: skip
    def transition(self, data: st.DataObject, action: str, stale: bool, stop: Stop | None) -> None:
        """A site's report or a user's cancel: the job shard's script, then the release its outbox step stands for.
        With `stale`, it names the attempt before the job's own: nothing changes."""
        self._transition(data, action, stale, stop)

    @precondition(lambda self: bool(self.in_state(*HOLDING)))
    @rule(data=st.data(), stale=st.sampled_from([False, False, False, True]), stop=st.sampled_from(BETWEEN_STEPS))
    def requeue(self, data: st.DataObject, stale: bool, stop: Stop | None) -> None:
        """A job taken back from its site (the site lost, the assignment not accepted in time) to the queue, or to
        failed once it has had its attempts."""
        self._transition(data, "requeue", stale, stop)

    def _transition(self, data: st.DataObject, action: str, stale: bool, stop: Stop | None) -> None:
        applies = {"running": ("assigned",), "cancel": ("queued", *HOLDING)}.get(action, HOLDING)
        jobs = self.in_state(*applies)
        if not jobs:
            return
        job = data.draw(st.sampled_from(jobs), label="job")
        j = self.jobs[job]
        stale = stale and j.attempt > 0
        attempt = j.attempt - 1 if stale else j.attempt
        done, states = self.act(f"transition {action}", stop,
                                lambda s: s.transitions([(job, action, j.site, attempt, "by the test")]))  # fmt: skip
        if action == "requeue":
            expected = "failed" if j.attempt >= MAX_ATTEMPTS else "queued"
        else:
            expected = {"running": "running", "cancel": "cancelled"}.get(action, action)
        if done:
            assert states == ["" if stale else expected], (job, action, attempt, states, j)
        if stale or not (done or self.gate.ran("transition")):
            return
        j.state = expected
        if expected == "queued":
            j.site, j.model, j.last_site = "", "", j.site

    # ------------------------------------------------------------------ rules: holds

    @rule(data=st.data(), ask=JOBS, stop=stops(5))
    def take_hold(self, data: st.DataObject, ask: JobAsk, stop: Stop | None) -> None:
        """A quote's hold: devices reserved at the first of one or two options that can take them, then the hold on
        the job shard, then settled (or released when refused)."""
        tenant, _, count, _, _ = ask
        pools = data.draw(st.lists(st.sampled_from(POOLS), min_size=1, max_size=2, unique=True), label="options")
        self.held_ids += 1
        hold_id = f"q{self.held_ids:02d}"
        spec = job_spec("quoted", (tenant, tuple(sorted({m for _, m in pools})), count, ask[3], ask[4]))
        options = [option(s, m, count) for s, m in pools]
        over = not self.fits(tenant, count)
        done, taken = self.act("take_hold", stop, lambda s: s.take_hold(hold_id, tenant, options, HOLD_TTL_MS,
                                                                        spec.placement_hash()))  # fmt: skip
        if done:
            assert taken is not None
            if taken.hold is None:
                assert taken.refusal in (Refusal.STALE_VIEW, Refusal.TENANT_LIMIT), taken
                assert not self.run(self._hold_row(hold_id)), f"{hold_id} refused, yet stored"
                return
            assert not over, f"{hold_id} held beyond its tenant's limit"
            assert (taken.hold.site, taken.hold.model) == pools[taken.choice], (taken, pools)
        row = self.run(self._hold_row(hold_id))
        if not done and not self.gate.ran("hold"):
            assert not row, f"{hold_id} stored though its take never ran: {row}"
            return
        if not row:
            return  # refused
        assert row["state"] == "held" and (row["site"], row["model"]) in pools and not over, (row, pools)
        self.holds[hold_id] = HoldModel(tenant, row["site"], row["model"], count, int(row["expires"]), spec)

    @precondition(lambda self: bool(self.holds))
    @rule(data=st.data(), stop=st.sampled_from(BETWEEN_STEPS))
    def release_hold(self, data: st.DataObject, stop: Stop | None) -> None:
        """The hold's tenant releases it: the job shard's step, then the release of its ledger entry."""
        hold_id = data.draw(st.sampled_from(sorted(self.holds)), label="hold")
        h = self.holds[hold_id]
        done, released = self.act("release_hold", stop, lambda s: s.release_hold(hold_id, h.tenant))
        standing = h.state == "held"
        if done:
            assert released == standing, (hold_id, h, released)
        if standing and (done or self.gate.ran("hold")):
            h.state = "released"

    @precondition(lambda self: bool(self.holds))
    @rule(data=st.data(), due=st.booleans(), stop=st.sampled_from(BETWEEN_STEPS))
    def expire_hold(self, data: st.DataObject, due: bool, stop: Stop | None) -> None:
        """The sweeper's expiry of a hold, told the time: its expiry (`due`) or a millisecond before."""
        hold_id = data.draw(st.sampled_from(sorted(self.holds)), label="hold")
        h = self.holds[hold_id]
        now = h.expires if due else h.expires - 1
        done, ended = self.act("expire_holds", stop, lambda s: s.expire_holds([hold_id], now))
        expires = due and h.state == "held"
        if done:
            assert ended == [expires], (hold_id, h, ended, now)
        if expires and (done or self.gate.ran("hold")):
            h.state = "expired"

    @precondition(lambda self: self.merges and any(h.spec is not None for h in self.holds.values()))
    @rule(data=st.data(), stop=stops(6))
    def submit_held(self, data: st.DataObject, stop: Stop | None) -> None:
        """A job submitted onto a quote's hold: stored and bound to the hold's devices in one transaction, then the
        hold's ledger entry merged into the job's. A hold no longer standing refuses it, and nothing is stored."""
        hold_id = data.draw(st.sampled_from(sorted(h for h, m in self.holds.items() if m.spec is not None)))
        h = self.holds[hold_id]
        assert h.spec is not None
        name = f"j{len(self.jobs) + len(self.never_stored) + 1:02d}"
        spec = h.spec.model_copy(update={"name": name, "hold": hold_id})
        standing = h.state == "held"
        done, outcome = self.act("submit_held", stop, lambda s: s.submit_held(name, spec, ACCEPT_TIMEOUT_MS))
        if done:
            if standing:
                assert isinstance(outcome, tuple), outcome
                _record, created, commit = outcome
                assert created and commit is not None and commit.ok and commit.attempt == 1, outcome
            else:
                assert isinstance(outcome, HoldNotStanding), outcome
        if not standing or not (done or self.gate.ran("submit")):
            self.never_stored.append(name)
            return
        self.jobs[name] = JobModel(h.tenant, spec.resources.models, h.count, spec.priority.value, spec.preemptible)
        self.bound(name, h.site, h.model, 1)
        h.state, h.job = "used", name

    def _preemptions(self) -> list[tuple[str, str, str, list[str]]]:
        """(beneficiary, site, model, possible victims) of every preemption that could be asked now."""
        out = []
        for b, j in sorted(self.jobs.items()):
            preempting = self.holds.get(j.preempting)
            if j.state != "queued" or j.preemptions or (preempting is not None and preempting.state == "held"):
                continue
            for site, model in POOLS:
                victims = [v for v, m in sorted(self.jobs.items()) if m.state in HOLDING and m.site == site
                           and m.model == model and m.preemptible and RANK[m.priority] > RANK[j.priority]]  # fmt: skip
                if model in j.models and victims:
                    out.append((b, site, model, victims))
        return out

    @precondition(lambda self: self.merges and bool(self._preemptions()))
    @rule(data=st.data(), stop=stops(5))
    def preempt(self, data: st.DataObject, stop: Stop | None) -> None:
        """Lower-priority preemptible jobs at a pool give way to a queued job: devices beyond theirs reserved first,
        then the victims requeued and a hold taken for the job (one script), then the victims' entries merged into
        the hold's."""
        b, site, model, possible = data.draw(st.sampled_from(self._preemptions()), label="preemption")
        victims = data.draw(st.lists(st.sampled_from(possible), min_size=1, unique=True), label="victims")
        j = self.jobs[b]
        self.held_ids += 1
        hold_id = f"p{self.held_ids:02d}"
        freed = sum(self.jobs[v].count for v in victims)
        own = sum(self.jobs[v].count for v in victims if self.jobs[v].tenant == j.tenant)
        fits = self.fits(j.tenant, j.count, own)
        attempts = [(v, self.jobs[v].attempt) for v in victims]
        done, result = self.act("preempt", stop, lambda s: s.preempt(b, hold_id, option(site, model, j.count),
                                                                     GRACE_MS, MAX_PREEMPTIONS, attempts))  # fmt: skip
        row = self.run(self._hold_row(hold_id))
        if not done and not self.gate.ran("preempt"):
            assert not row, f"{hold_id} stored though its preemption never ran: {row}"
            return
        if done:
            assert result is not None
            assert (result[0] > 0) == bool(row), (result, row)
            if freed >= j.count and fits:
                assert result[1] is None, f"a preemption of {victims} for {b} refused: {result[1]}"
        if not row:
            assert freed < j.count or not fits or not (done or self.gate.ran("preempt")), (b, victims)
            return
        assert fits and (row["state"], row["for"], row["site"], row["model"]) == ("held", b, site, model), row
        for v in victims:
            m = self.jobs[v]
            m.state, m.site, m.model = "queued", "", ""
            m.preemptions += 1
            m.preemptible = m.preemptible and m.preemptions < MAX_PREEMPTIONS
        j.preempting = hold_id
        self.holds[hold_id] = HoldModel(j.tenant, site, model, j.count, int(row["expires"]), None, for_job=b)

    @precondition(lambda self: self.merges and any(h.for_job and h.state == "held" for h in self.holds.values()))
    @rule(data=st.data(), stop=stops(6))
    def hand_over(self, data: st.DataObject, stop: Stop | None) -> None:
        """A preemption's hold given to the job it is for (commit_hold): bound with the hold, then the hold's entry
        merged into the job's; refused when the job is no longer queued."""
        hold_id = data.draw(
            st.sampled_from(sorted(h for h, m in self.holds.items() if m.for_job and m.state == "held"))
        )
        h = self.holds[hold_id]
        j = self.jobs[h.for_job]
        waiting = j.state == "queued"
        done, handed = self.act("commit_hold", stop, lambda s: s.commit_hold(hold_id, ACCEPT_TIMEOUT_MS))
        if done:
            assert handed is not None
            assert handed[2].ok == waiting, (hold_id, handed, j)
        if waiting and (done or self.gate.ran("bind")):
            self.bound(h.for_job, h.site, h.model, j.attempt + 1)
            h.state, h.job = "used", h.for_job

    # ------------------------------------------------------------------ rules: the sweeper

    @rule(ahead=st.sampled_from([0, OUTBOX_AGE_MS + 1, LEASE_MS + MARGIN_MS + 1]), stop=stops(7))
    def sweep(self, ahead: int, stop: Stop | None) -> None:
        """The sweeper at Redis's clock now, or as if later: past the outbox's age, or past the leases and margin."""
        now = self.run(self._clock()) + ahead
        done, _moved = self.act("sweep_ledger", stop, lambda s: s.sweep_ledger(now))
        if done:
            self.swept(self.run(self._read()), now)

    # ------------------------------------------------------------------ checks

    async def _read(self) -> World:
        k, redis = self.keys, self.reader
        pipe = redis.pipeline(transaction=True)
        for job in self.jobs:
            pipe.hgetall(k.only.job(job))
        for hold in self.holds:
            pipe.hgetall(k.only.hold(hold))
        for site in SITES:
            pipe.hgetall(k.hub(site.hub).capacity(site.id))
            pipe.hgetall(k.hub(site.hub).held(site.id))
        for hub in HUBS:
            pipe.zrange(k.hub(hub).pending, 0, -1, withscores=True)
        pipe.zrange(k.only.outbox, 0, -1, withscores=True)
        pipe.hgetall(k.only.tenant_usage)
        for job in self.never_stored:
            pipe.exists(k.only.job(job))
        for hold in self.never_held:
            pipe.exists(k.only.hold(hold))
        raw = iter(await pipe.execute())

        def decoded(row: dict[Any, Any]) -> dict[str, str]:
            return {_text(a): _text(b) for a, b in row.items()}

        jobs = {job: decoded(next(raw)) for job in self.jobs}
        holds = {hold: decoded(next(raw)) for hold in self.holds}
        capacity: dict[str, dict[str, int]] = {}
        ledger: dict[str, dict[str, Entry]] = {}
        for site in SITES:
            capacity[site.id] = {a: int(b) for a, b in decoded(next(raw)).items()}
            ledger[site.id] = {}
            for owner, value in decoded(next(raw)).items():
                attempt, model, count, _seq = value.split(" ")
                ledger[site.id][owner] = (int(attempt), model, int(count))
        pending: dict[tuple[str, str, int], int] = {}
        for _hub in HUBS:
            for member, score in next(raw):
                at, owner, attempt = _text(member).split("\t")
                pending[(at, owner, int(attempt))] = int(score)
        outbox = {_text(m): int(s) for m, s in next(raw)}
        usage = {a: int(b) for a, b in decoded(next(raw)).items()}
        strays = [job for job in self.never_stored if next(raw)] + [hold for hold in self.never_held if next(raw)]
        return World(jobs, holds, capacity, ledger, pending, outbox, usage, strays)

    def check(self, w: World) -> None:
        moving = w.moving()
        owners = w.owners()
        for site in SITES:
            cap, entries = w.capacity[site.id], w.ledger[site.id]
            for model, total in site.pools.items():
                counted = sum(c for _a, m, c in entries.values() if m == model)
                allocated = cap.get(f"a:{model}", 0)
                assert counted == allocated, f"{site.id}/{model}: a:{model} is {allocated}, its ledger counts {counted}"
                assert allocated <= total, f"{site.id}/{model} over-allocated: {allocated} of {total}"
            for owner, entry in entries.items():
                if owners.get(owner) == (site.id, entry):
                    continue
                on_lease = (site.id, owner, entry[0]) in w.pending
                assert on_lease or (site.id, owner) in moving, (
                    f"{site.id}'s ledger has {owner} {entry}, which holds {owners.get(owner)}, neither on a lease nor "
                    f"with a step on its way: pending {sorted(w.pending)}, outbox {sorted(w.outbox)}"
                )
        for owner, (site_id, entry) in owners.items():
            found = w.ledger[site_id].get(owner)
            assert found == entry or (site_id, owner) in moving, (
                f"{owner} holds {entry} at {site_id}, whose ledger has {found}; outbox {sorted(w.outbox)}"
            )
        for site_id, owner, attempt in w.pending:
            found = w.ledger[site_id].get(owner)
            assert found is not None and found[0] == attempt, f"pending {site_id} {owner} {attempt}, ledger {found}"
        for tenant in TENANTS:
            held = sum(e[2] for o, (_s, e) in owners.items() if self._tenant_of(w, o) == tenant)
            assert w.usage.get(tenant, 0) == held == self.usage(tenant), (
                f"{tenant}: its usage counter is {w.usage.get(tenant, 0)}, its jobs and holds hold {held}, the model "
                f"says {self.usage(tenant)}"
            )
            assert tenant not in LIMITS or held <= LIMITS[tenant], f"{tenant} holds {held}, over its limit"
        assert not w.strays, f"refused, yet stored: {w.strays}"
        self.agrees(w)

    @staticmethod
    def _tenant_of(w: World, owner: str) -> str:
        if owner.startswith(HOLD_OWNER):
            return w.holds[owner[len(HOLD_OWNER) :]]["tenant"]
        return w.jobs[owner]["tenant"]

    def agrees(self, w: World) -> None:
        """The job shard against the model."""
        for job, m in self.jobs.items():
            row = w.jobs[job]
            have = (row.get("state"), int(row.get("attempt", "-1")))
            assert have == (m.state, m.attempt), f"{job} is {have} in Redis, the model says {(m.state, m.attempt)}"
            if m.state in HOLDING:
                assert (row["site"], row["model"], int(row["count"])) == (m.site, m.model, m.count), (job, row, m)
            assert int(row.get("preemptions", "0")) == m.preemptions and row.get("preempting", "") == m.preempting, (
                job, row, m)  # fmt: skip
        for hold, h in self.holds.items():
            row = w.holds[hold]
            stored = (
                row["state"],
                row["site"],
                row["model"],
                int(row["count"]),
                row.get("for", ""),
                row.get("job", ""),
            )
            assert stored == (h.state, h.site, h.model, h.count, h.for_job, h.job), (hold, row, h)

    def swept(self, w: World, now: int) -> None:
        """Right after a sweep at `now` that ran to its end: nothing left that it had to do."""
        due = {p: end for p, end in w.pending.items() if end <= now - MARGIN_MS}
        assert not due, f"the sweep at {now} left entries whose lease was long over: {due}"
        old = {s: at for s, at in w.outbox.items() if at <= now - OUTBOX_AGE_MS}
        assert not old, f"the sweep at {now} left old outbox steps: {old}"

    @invariant()
    def consistent(self) -> None:
        self.check(self.run(self._read()))

    # ------------------------------------------------------------------ the end

    def settle_everything(self) -> None:
        """The sweeper twice, past every lease, its margin and the outbox's age: then nothing is on its way, every
        ledger is exactly its owners', and the audit and the history checker find nothing."""
        w = self.run(self._read())
        # past every step's time too: an expiry the run told a time to wrote its step at that time
        latest = max([self.run(self._clock()), *w.outbox.values(), *w.pending.values()])
        now = latest + LEASE_MS + MARGIN_MS + OUTBOX_AGE_MS + 1
        for _ in range(2):
            self.run(self.store.sweep_ledger(now))
        w = self.run(self._read())
        self.check(w)
        assert not w.outbox and not w.pending, f"still on its way: outbox {w.outbox}, pending {w.pending}"
        ledgers = {(site, owner, entry) for site, entries in w.ledger.items() for owner, entry in entries.items()}
        owners = {(site, owner, entry) for owner, (site, entry) in w.owners().items()}
        assert ledgers == owners, (
            f"ledgers but not owners: {ledgers - owners}; owners but not ledgers: {owners - ledgers}"
        )
        findings = self.run(audit(self.store))
        assert findings == [], [f.as_dict() for f in findings]
        report = self.run(check_history(self.store))
        assert report.ok, [v.as_dict() for v in report.violations]

    def teardown(self) -> None:
        try:
            if not self.failed:
                self.settle_everything()
        finally:
            self.run(self._close())
            self.runner.close()

    async def _close(self) -> None:
        prefixes = [self.keys.prefix, *(self.keys.hub(hub).prefix for hub in HUBS)]
        keys = [key for prefix in prefixes async for key in self.reader.scan_iter(match=f"{prefix}:*", count=1000)]
        if keys:
            await self.reader.unlink(*keys)
        await self.store.close()
        await self.reader.aclose()


# No shrinking: a failure is reported as found, the first one, well within the time limit (shrinking a run of real
# round trips can take minutes); the written-out runs below are the known failures, minimal.
SETTINGS = settings(max_examples=100, stateful_step_count=30, deadline=None, database=None,
                    phases=[Phase.explicit, Phase.generate], report_multiple_bugs=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])  # fmt: skip


@pytest.mark.timeout(240)
def test_a_broker_stopped_between_any_two_round_trips_loses_no_device(redis_server: RedisServer) -> None:
    """Allocations (jobs of one model or either of two), transitions, holds taken, released, expired and submitted
    onto, preemptions and their hand-over, and sweeps, each maybe stopped after any of its round trips and carried
    on by a fresh store: no pool over-allocated, every owner's devices in its site's ledger and every entry its
    owner's or on its way, after every step; nothing left over once the sweeper has run."""
    machine = type("Broker", (TwoStepBroker,), {"redis_url": redis_server.url})
    run_state_machine_as_test(machine, settings=SETTINGS)


# --------------------------------------------------------------------------- written-out runs
# Stops the random search reaches now and then, one step after another, through the gated store: each is a
# failure of the protocol found by the machine above.


class Run:
    """One namespace, the sites' capacity applied, and a gated store that a fresh one replaces after each stop."""

    def __init__(self, url: str, namespace: str) -> None:
        self.url, self.keys, self.gate = url, Keys(namespace), Gate()
        self.store = self.fresh()

    def fresh(self) -> Store:
        client = cast(GatedRedis, GatedRedis.from_url(self.url))
        client.gate = self.gate
        return Store(client, self.keys)

    async def start(self) -> Run:
        await load_scripts(self.store.redis)
        for site in SITES:
            await self.store.apply_capacity(capacity(site))
        return self

    async def stopped(self, stop: Stop, call: Callable[[Store], Awaitable[Any]]) -> None:
        """`call` stopped where `stop` says; a fresh store takes over."""
        self.gate.arm(stop)
        with pytest.raises(Stopped):
            await call(self.store)
        self.gate.arm(None)
        old, self.store = self.store, self.fresh()
        await old.close()

    async def submit(self, job: str, ask: JobAsk) -> None:
        await self.store.submit(job, job_spec(job, ask), at_ms=T0)

    async def allocate(self, job: str, site: str, model: str, count: int = 2) -> int:
        p = Placement(job, site, PLAN[site].hub, model, count, PLAN[site].price, 20.0, arch="GPU")
        (commit,) = await self.store.allocate([p], ACCEPT_TIMEOUT_MS)
        assert commit.ok, commit
        return commit.attempt

    async def settle(self) -> None:
        """The sweeper twice, past every lease, margin and outbox age."""
        now = await self.store.clock_ms() + LEASE_MS + MARGIN_MS + OUTBOX_AGE_MS + 1
        for _ in range(2):
            await self.store.sweep_ledger(now)

    async def ledger(self, site: str) -> dict[str, Entry]:
        raw = await self.store.redis.hgetall(self.keys.hub(PLAN[site].hub).held(site))
        out = {}
        for owner, value in raw.items():
            attempt, model, count, _seq = _text(value).split(" ")
            out[_text(owner)] = (int(attempt), model, int(count))
        return out

    async def allocated(self, site: str, model: str) -> int:
        return int(await self.store.redis.hget(self.keys.hub(PLAN[site].hub).capacity(site), f"a:{model}") or 0)

    async def close(self) -> None:
        prefixes = [self.keys.prefix, *(self.keys.hub(hub).prefix for hub in HUBS)]
        redis = self.store.redis
        keys = [key for prefix in prefixes async for key in redis.scan_iter(match=f"{prefix}:*", count=1000)]
        if keys:
            await redis.unlink(*keys)
        await self.store.close()


LOW = ("t1", (H800,), 2, "low", True)  # a preemptible job, the victim
HIGH = ("t1", (H800,), 2, "high", False)  # the job it gives way to


async def _preempted(run: Run) -> None:
    """v runs at g1; a preemption of it for b is stopped after its job-shard step (v requeued, hold p1 taken for b):
    the merge of v's entry into the hold's is left in the outbox."""
    await run.submit("v", LOW)
    assert await run.allocate("v", "g1", H800) == 1
    await run.submit("b", HIGH)
    await run.stopped(right_after("preempt"), lambda s: s.preempt("b", "p1", option("g1", H800, 2), GRACE_MS, 2,
                                                                [("v", 1)]))  # fmt: skip
    assert (await run.store.get_job("v") or {})["state"] == "queued"
    assert (await run.ledger("g1")) == {"v": (1, H800, 2)}


@pytest.mark.timeout(60)
async def test_a_preemptions_hold_released_before_its_merge_is_done_gives_its_devices_back(
    redis_server: RedisServer, namespace: str
) -> None:
    """The hold's release runs its own ledger step at once: the hold has no entry yet, so it frees nothing. The merge
    the sweeper does afterwards makes the entry of a hold that has ended: no sweep ever frees those devices."""
    run = await Run(redis_server.url, namespace).start()
    try:
        await _preempted(run)
        assert await run.store.release_hold("p1", "t1")
        await run.settle()
        assert await run.ledger("g1") == {} and await run.allocated("g1", H800) == 0, await run.ledger("g1")
        assert await audit(run.store) == []
    finally:
        await run.close()


@pytest.mark.timeout(60)
async def test_a_preemptions_hold_handed_over_before_its_merge_is_done_passes_its_devices_to_the_job(
    redis_server: RedisServer, namespace: str
) -> None:
    """The hand-over's merge (hold -> job) runs at once and finds no hold entry yet: it does nothing, and is removed
    from the outbox. The earlier merge (victim -> hold) then makes the entry of a used hold, and the job holds its
    devices with no entry of its own."""
    run = await Run(redis_server.url, namespace).start()
    try:
        await _preempted(run)
        handed = await run.store.commit_hold("p1", ACCEPT_TIMEOUT_MS)
        assert handed is not None and handed[2].ok and handed[2].attempt == 1, handed
        await run.settle()
        assert await run.ledger("g1") == {"b": (1, H800, 2)}
        assert await audit(run.store) == []
    finally:
        await run.close()


@pytest.mark.timeout(60)
async def test_a_hold_handed_to_a_job_with_a_stale_reservation_of_its_attempt_in_another_model_is_counted_right(
    redis_server: RedisServer, namespace: str
) -> None:
    """A broker reserved A100 devices at g1 for b's first attempt and stopped before binding. Within the lease, a
    preemption's hold of H800 devices at g1 is handed to b, which becomes its attempt 1: the merge (hold -> b) finds
    b's entry of attempt 1 with another model, answers -1, and run_steps takes that answer as done and drops the
    step. The sweeper then settles the stale A100 reservation as b's (b is assigned at g1, attempt 1): b holds H800
    devices, the ledger counts A100 ones for it, and the hold's H800 entry stays for good."""
    run = await Run(redis_server.url, namespace).start()
    try:
        await run.submit("v", LOW)
        assert await run.allocate("v", "g1", H800) == 1
        await run.submit("b", ("t1", (A100, H800), 2, "high", False))
        p = Placement("b", "g1", "guizhou", A100, 2, PLAN["g1"].price, 20.0, arch="GPU")
        await run.stopped(right_after("reserve"), lambda s: s.allocate([p], ACCEPT_TIMEOUT_MS))  # not bound
        assert (await run.ledger("g1"))["b"] == (1, A100, 2)
        expires, refusal = await run.store.preempt("b", "p1", option("g1", H800, 2), GRACE_MS, 2, [("v", 1)])
        assert expires and refusal is None
        handed = await run.store.commit_hold("p1", ACCEPT_TIMEOUT_MS)
        assert handed is not None and handed[2].ok and handed[2].attempt == 1, handed
        await run.settle()
        assert await run.ledger("g1") == {"b": (1, H800, 2)}
        assert (await run.allocated("g1", A100), await run.allocated("g1", H800)) == (0, 2)
    finally:
        await run.close()


@pytest.mark.timeout(60)
async def test_the_audit_leaves_alone_a_hold_whose_merge_into_its_job_is_in_the_outbox(
    redis_server: RedisServer, namespace: str
) -> None:
    """A job submitted onto a hold, the broker stopped after the transaction that stored and bound it: the hold's
    entry passes to the job by the merge in the outbox, on its way, which the audit must not report (its reading
    of a merge's sources is one field off: it takes their attempts for them)."""
    run = await Run(redis_server.url, namespace).start()
    try:
        spec = job_spec("quoted", ("t1", (A100,), 2, "normal", False))
        taken = await run.store.take_hold("q1", "t1", [option("g1", A100, 2)], HOLD_TTL_MS, spec.placement_hash())
        assert taken.hold is not None
        held = spec.model_copy(update={"name": "j1", "hold": "q1"})
        await run.stopped(right_after("submit"), lambda s: s.submit_held("j1", held, ACCEPT_TIMEOUT_MS))
        assert (await run.store.get_job("j1") or {})["state"] == "assigned"
        assert await run.ledger("g1") == {"hold:q1": (0, A100, 2)}
        assert [f.as_dict() for f in await audit(run.store)] == []
        await run.settle()
        assert await run.ledger("g1") == {"j1": (1, A100, 2)}
        assert await audit(run.store) == []
    finally:
        await run.close()


@pytest.mark.timeout(60)
async def test_a_job_reserved_in_one_model_and_then_placed_in_another_at_the_same_site_is_counted_right(
    redis_server: RedisServer, namespace: str
) -> None:
    """A broker reserved A100 devices at g1 for j's first attempt and stopped before binding. Within the lease another
    places j at g1 in H800 (it asks for either): reserve.lua finds j's entry of attempt 1 at g1 and answers it as the
    H800 pool's (its idempotent path compares the attempt only, not the model or the count), and j is bound to H800
    devices that were never taken: the ledger counts A100 ones for it, and the pool's four H800 devices are given
    to k as well."""
    run = await Run(redis_server.url, namespace).start()
    try:
        await run.submit("j", ("t1", (A100, H800), 4, "normal", False))
        p = Placement("j", "g1", "guizhou", A100, 4, PLAN["g1"].price, 20.0, arch="GPU")
        await run.stopped(right_after("reserve"), lambda s: s.allocate([p], ACCEPT_TIMEOUT_MS))  # not bound
        assert await run.ledger("g1") == {"j": (1, A100, 4)}
        await run.store.allocate([replace(p, model=H800)], ACCEPT_TIMEOUT_MS)
        await run.submit("k", ("t2", (H800,), 4, "normal", False))
        await run.store.allocate([replace(p, job="k", model=H800)], ACCEPT_TIMEOUT_MS)
        await run.settle()
        holding = {}
        for job in ("j", "k"):
            row = await run.store.get_job(job) or {}
            if row["state"] in HOLDING:
                holding[job] = (int(row["attempt"]), row["model"], int(row["count"]))
        in_use = sum(count for _attempt, model, count in holding.values() if model == H800)
        assert in_use <= PLAN["g1"].pools[H800], f"{in_use} H800 devices in use at g1, which has 4: {holding}"
        assert await run.ledger("g1") == holding
    finally:
        await run.close()


@pytest.mark.timeout(60)
async def test_a_hand_overs_merge_done_after_its_job_moved_on_to_a_new_attempt_leaves_that_attempt_its_devices(
    redis_server: RedisServer, namespace: str
) -> None:
    """A preemption's hold handed to b (attempt 1), the broker stopped after the binding: the merge (hold -> b,
    attempt 1) is in the outbox. b is requeued (stopped again: its release of attempt 1 in the outbox too) and
    placed again at g1 (attempt 2, its own reservation). The sweeper does the steps in order: the merge finds b's
    entry of attempt 2 and takes it over as attempt 1 (it compares no attempt), then the release of attempt 1
    deletes it: b runs attempt 2 with no entry, its devices counted nowhere."""
    run = await Run(redis_server.url, namespace).start()
    try:
        await run.submit("v", LOW)
        assert await run.allocate("v", "g1", H800) == 1
        await run.submit("b", HIGH)
        expires, refusal = await run.store.preempt("b", "p1", option("g1", H800, 2), GRACE_MS, 2, [("v", 1)])
        assert expires and refusal is None
        await run.stopped(right_after("bind"), lambda s: s.commit_hold("p1", ACCEPT_TIMEOUT_MS))  # not merged
        assert (await run.store.get_job("b") or {})["attempt"] == "1"
        await run.stopped(right_after("transition"), lambda s: s.transitions([("b", "requeue", "g1", 1, "lost")]))
        assert await run.allocate("b", "g1", H800) == 2
        await run.settle()
        assert await run.ledger("g1") == {"b": (2, H800, 2)}
        assert await run.allocated("g1", H800) == 2
    finally:
        await run.close()
