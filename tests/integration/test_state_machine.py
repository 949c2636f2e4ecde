"""Two broker replicas and four sites, driven step by step by hypothesis against a real Redis.

Each replica has its own store, snapshot, scheduler and ingest over one key namespace. The sites are
plain models of an adapter's ledger (adapters/ledger.py): what (job, attempt) each holds, what it has
finished, and the events it has yet to send. Every assignments message a replica publishes is queued
per (site, replica), as MQTT keeps the order of one connection only, and a step delivers the next one of
a channel, so delivery is delayed and interleaved; a site's session is clean, so what is sent while it
is away is lost. Other steps submit, schedule, report site events (and repeat them late), redeliver a
message, cancel (the API's calls), take a site away (the Last Will) and bring it back (its reconcile list
maybe a few steps late), send capacity (fresh, replayed, after a restart with a new boot id) and sweep.

After every step the state in Redis is checked against itself (pools, queue, site ledgers, tenant
usage), against the capacity the sites reported and against the sites: work taken back from a site was
stopped there or the site was told; once every message on its way is delivered, a connected site holds
exactly what the broker counts there, and no job is live at two sites. At the end every site comes back,
everything is delivered and the same holds without simulation.

Nothing in a run may hang on the clock: sweeps read one moment of Redis's clock, heartbeats and
submissions are a millisecond apart, and what one step sends is ordered by content, so hypothesis can
replay and shrink a run exactly.
"""

from __future__ import annotations

import asyncio
import bisect
import copy
import uuid
from collections import defaultdict, deque
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

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

from broker.http.jobs import CANCEL_TRIES
from broker.matching import Request
from broker.matching.snapshot import Snapshot
from broker.metrics import Metrics
from broker.model.job import JobSpec, JobState
from broker.model.records import Refusal
from broker.scheduling.preemption import RANK, Preemptor
from broker.scheduling.scheduler import Scheduler
from broker.sites.assignments import held_assignment, publish_runs, tell_site_to_cancel
from broker.sites.ingest import Ingest
from broker.sites.lifecycle import reconcile_site, sweep
from broker.state.audit import audit
from broker.state.history import check_history
from broker.state.holds import HoldOption
from broker.state.keys import Keys
from broker.state.ledger import HOLD_OWNER
from broker.state.store import Store
from common import topics
from common.errors import Conflict, HoldNotStanding
from common.protocol import CAPACITY_SCHEMA, EVENT_SCHEMA, Assignments
from common.validation import parse
from regions import load_geography
from suanwang.servers import RedisServer

T = TypeVar("T")
Key = tuple[str, int]  # (job, attempt)

GEO = load_geography()
REPLICAS = ("a", "b")
# a's assignments expire at the first sweep unless accepted; b's never do within a run
ACCEPT_TIMEOUT_S = {"a": 0.001, "b": 3600.0}
HOLDING = ("assigned", "running")
ENDED_BY_SITE = ("completed", "failed", "rejected", "lost")
TENANTS = ("t1", "t2", "t3")
MODEL_CHOICES = (("A100-80G",), ("H800",), ("A100-80G", "H800"))
RESIDENCIES = ((), ("guizhou",), ("neimenggu", "yangtze"))
# a job's grace period in seconds when it is preemptible (None: it is not): over at once, or not within a run
# (its preemption's hold is not handed over); nothing in between, whose end a run's timing would decide
GRACES = (None, 0.0, 0.0, 3600.0)
JOBS = st.tuples(st.sampled_from(TENANTS), st.sampled_from(MODEL_CHOICES), st.sampled_from([2, 4, 8, 16]),
                 st.sampled_from(RESIDENCIES), st.sampled_from(["high", "normal", "low"]),
                 st.sampled_from(GRACES))  # fmt: skip
Job = tuple[str, tuple[str, ...], int, tuple[str, ...], str, float | None]
MAX_PREEMPTIONS = 2  # the replicas' setting: a job preempted this often is no longer preemptible
MAX_HOLDS = 3  # standing holds a tenant may have (the quote path's limit)
HOLD_TTLS_MS = (0, 3_600_000)  # a quote hold past its time at once, or not within a run (as GRACES)
HOLD_STATES = ("held", "used", "released", "expired")
SUBMISSIONS_WITH_A_HOLD = ("as quoted", "as quoted", "as quoted", "another tenant", "changed", "unknown id")
# Heartbeats this far apart by Redis's clock (no two in one millisecond), so that a sweep finds silent
# exactly the sites heard from last at or before a given one, whatever the timing of the run.
HEARTBEAT_GAP_MS = 1
STEP_LIMIT_S = 30.0  # no step waits this long: one that does is stuck


@dataclass(frozen=True)
class SitePlan:
    id: str
    hub: str
    cluster: str
    price: float
    pools: dict[str, int]  # model -> total devices


PLANS = (
    SitePlan("guian-1", "guizhou", "guian", 10.0, {"A100-80G": 16, "H800": 8}),
    SitePlan("guian-2", "guizhou", "guian", 9.0, {"A100-80G": 8}),
    SitePlan("horinger-1", "neimenggu", "horinger", 8.0, {"A100-80G": 8, "H800": 16}),
    SitePlan("wuhu-1", "yangtze", "wuhu", 12.0, {"H800": 8}),
)
SITE_IDS = tuple(p.id for p in PLANS)
HUB_OF = {p.id: p.hub for p in PLANS}  # each site's hub (its place): the site shard that holds its keys


# --------------------------------------------------------------------------- the sites


@dataclass
class Held:
    model: str
    count: int
    seq: int | None  # the run's place in the site's assignment sequence, when the broker sent one
    said: set[str] = field(default_factory=set)  # what the site has reported of it


def newer(held: Held, upto: int | None) -> bool:
    """As the ledger: a run assigned after a reconcile list stamped `upto` was read is kept."""
    return upto is not None and held.seq is not None and held.seq > upto


@dataclass
class SiteModel:
    """One adapter as its ledger behaves: holds runs that fit, ignores what it has handled, stops what it is
    told to. Local decisions (a rejection, a job it does not hold) wait in `outbox` until a step sends them."""

    plan: SitePlan
    external: dict[str, int]
    boot: str = "boot-1"
    boots: int = 1
    seq: int = 0
    connected: bool = True
    held: dict[Key, Held] = field(default_factory=dict)
    finished: set[Key] = field(default_factory=set)
    outbox: deque[tuple[Key, str, str]] = field(default_factory=deque)
    capacity_sent: list[tuple[str, int, dict[str, int], bytes]] = field(default_factory=list)  # boot, seq, x
    delivered: list[Assignments] = field(default_factory=list)  # on this connection: QoS 1 may repeat them
    events_sent: list[tuple[Key, str, str]] = field(default_factory=list)  # by this boot: it repeats outcomes

    def free(self, model: str) -> int | None:
        total = self.plan.pools.get(model)
        if total is None:
            return None
        return total - self.external[model] - sum(h.count for h in self.held.values() if h.model == model)

    def on_assignments(self, batch: Assignments) -> None:
        """adapters/ledger.py `Ledger.on_assignments`, step for step."""
        if batch.reconcile:
            upto = getattr(batch, "upto", None)
            listed = {(a.job, a.attempt) for a in batch.assignments}
            for key in [k for k, h in self.held.items() if k not in listed and not newer(h, upto)]:
                self._cancel(key)
            for key in sorted(listed):
                if key not in self.held and key not in self.finished:
                    self.finished.add(key)
                    self.outbox.append((key, "lost", "not held here"))
            return
        for item in batch.assignments:
            key = (item.job, item.attempt)
            if item.action in ("cancel", "preempt"):  # a preempted run checkpoints and stops: at once, here
                self._cancel(key)
                continue
            if key in self.held or key in self.finished:
                continue  # a redelivery, or a run for work already stopped
            free = self.free(item.model or "")
            if free is None or item.count < 1 or item.count > free:
                self.finished.add(key)
                self.outbox.append((key, "rejected", f"{free} free"))
                continue
            self.held[key] = Held(item.model or "", item.count, getattr(item, "seq", None))

    def _cancel(self, key: Key) -> None:
        """A cancel for attempt N also ends the job's older attempts; the attempt is remembered as handled."""
        for k in [k for k in self.held if k[0] == key[0] and k[1] <= key[1]]:
            del self.held[k]
            self.finished.add(k)
        self.finished.add(key)

    def restart(self) -> None:
        """The adapter process starts again: it holds nothing, remembers nothing, counts seq from a new boot."""
        self.held.clear()
        self.finished.clear()
        self.outbox.clear()
        self.events_sent.clear()
        self.boots += 1
        self.boot = f"boot-{self.boots}"
        self.seq = 0

    def capacity(self) -> bytes:
        """The next capacity message (seq + 1 within this boot), remembered for later replays."""
        self.seq += 1
        message = {
            "schema": CAPACITY_SCHEMA, "site": self.plan.id, "hub": self.plan.hub, "cluster": self.plan.cluster,
            "seq": self.seq, "boot": self.boot,
            "pools": [{"arch": "GPU", "model": model, "memory_gb": 80, "total": total,
                       "in_use_external": self.external[model], "per_node": 8,
                       "price_cny_per_hour": self.plan.price} for model, total in self.plan.pools.items()],
        }  # fmt: skip
        payload = orjson.dumps(message)
        self.capacity_sent.append((self.boot, self.seq, dict(self.external), payload))
        return payload


# --------------------------------------------------------------------------- the broker side


@dataclass(frozen=True)
class Sent:
    # (step, site, replica, content): the messages of a channel in the order of the steps that sent them.
    # Within a step, by site, replica and content: the order of what one step sends (a cancel per expired
    # assignment, in deadline order) can hang on the clock's millisecond ticks, and must not steer the run.
    index: tuple[int, str, str, str]
    replica: str
    batch: Assignments


class Recorder:
    """A replica's PublishAssignments: the message is decoded as a site decodes it and handed to the network."""

    def __init__(self, network: BrokerNetwork, replica: str) -> None:
        self.network = network
        self.replica = replica

    async def __call__(self, site: str, payload: bytes, /) -> None:
        self.network.published(self.replica, site, parse(Assignments, payload))


class ClockAt(Store):
    """A replica's store whose clock reads one moment of Redis's: a sweep through it finds due and silent
    exactly what was so at that moment, however long the sweep's own round trips take."""

    def __init__(self, store: Store, now_ms: int) -> None:
        super().__init__(store.redis, store.keys)
        self.now_ms = now_ms

    async def clock_ms(self) -> int:
        return self.now_ms


@dataclass
class Replica:
    store: Store
    scheduler: Scheduler
    ingest: Ingest
    publish: Recorder
    metrics: Metrics


@dataclass
class World:
    """One consistent read of everything the checks look at."""

    jobs: dict[str, dict[str, str | None]]
    history: dict[str, list[dict[str, Any]]]
    capacity: dict[str, dict[str, int]]
    site_jobs: dict[str, set[str]]  # the jobs in each site's ledger
    ledger: dict[str, dict[str, tuple[int, str, int]]]  # each site's ledger: owner -> (attempt, model, count)
    status: dict[str, str]
    queue: set[str]
    tenant_queues: dict[str, set[str]]  # what a pass may look at
    tenant_parked: dict[str, set[str]]  # queued jobs set aside as unplaceable until capacity may have grown
    assigned: set[str]
    usage: dict[str, int]
    holds: dict[str, dict[str, str]]  # every hold the run has seen, as stored
    standing: set[str]  # the index of standing holds (the sweeper's)
    tenant_holds: dict[str, set[str]]
    site_holds: dict[str, set[str]]  # the holds in each site's ledger (`hold:<id>` owners, by id)

    def holdings(self, site: str) -> set[Key]:
        """(job, attempt) the broker counts at `site`: its ledger's entries of jobs holding devices."""
        return {(job, self.ledger[site][job][0]) for job in self.site_jobs[site]
                if job in self.jobs and self.jobs[job]["state"] in HOLDING}  # fmt: skip

    def standing_holds(self) -> dict[str, dict[str, str]]:
        return {h: hold for h, hold in self.holds.items() if hold.get("state") == "held"}


JOB_FIELDS = ("state", "site", "attempt", "model", "count", "tenant", "accepted_at", "price", "hold", "priority",
              "preemptible", "preemptions", "preempting", "reason")  # fmt: skip


async def clock_reaches(store: Store, at_ms: int) -> int:
    """Wait until Redis's clock reads `at_ms` or later; returns what it reads then."""
    now = await store.clock_ms()
    while now < at_ms:
        await asyncio.sleep((at_ms - now) / 1000)
        now = await store.clock_ms()
    return now


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def job_spec(name: str, job: Job) -> JobSpec:
    tenant, models, count, hubs, priority, grace = job
    return JobSpec.model_validate({
        "name": name, "tenant": tenant, "resources": {"arch": "GPU", "models": list(models), "count": count},
        "residency": {"allow_hubs": list(hubs)}, "origin": "shanghai", "duration_hours": 1, "priority": priority,
        **({"preemptible": True, "grace_s": grace} if grace is not None else {}),
    })  # fmt: skip


def hold_offer(plan: SitePlan, model: str, count: int) -> HoldOption:
    """A quote's candidate as the quote path holds it (`offer_view` of a `Candidate`), at a price quoted below
    the site's price now: a job placed from the hold pays this one."""
    price = round(plan.price * 0.85, 2)
    offer = {"site": plan.id, "hub": plan.hub, "model": model, "arch": "GPU", "devices": count,
             "price_cny_per_hour": price, "unit_price_cny_per_hour": price, "cost_cny_per_hour": price * count,
             "latency_ms": 20.0, "est_hours": 1.0, "duration_hours": 1, "stack": None, "image": None}  # fmt: skip
    return HoldOption.of_offer(offer)


class BrokerNetwork(RuleBasedStateMachine):
    redis_url: ClassVar[str] = ""

    def __init__(self) -> None:
        super().__init__()
        self.failed = False
        self.runner = asyncio.Runner()
        self.keys = Keys(f"sm{uuid.uuid4().hex[:10]}")
        self.sites = {p.id: SiteModel(p, {m: 0 for m in p.pools}) for p in PLANS}
        self.pending: dict[tuple[str, str], list[Sent]] = {(s, r): [] for s in SITE_IDS for r in REPLICAS}
        self.sent: dict[str, list[Sent]] = {s: [] for s in SITE_IDS}
        self.runs: dict[Key, tuple[str, tuple[int, str, str, str], int | None]] = {}  # run sent: site, index, seq
        self.site_said: dict[str, set[Key]] = {s: set() for s in SITE_IDS}  # attempts a site ended itself
        self.applied: dict[str, tuple[str, int, dict[str, int]]] = {}  # what capacity.lua should hold: boot, seq, x
        self.step = 0  # steps taken (invariant checks): publications of one step share it
        self.last_heartbeat = 0  # Redis's clock just after the last capacity message was applied
        self.last_submit = 0  # and after the last job was submitted
        self.jobs: list[str] = []
        self.live: list[str] = []  # jobs not finished, as of the last check
        self.reconciles_due: list[tuple[str, str]] = []  # (replica, site): a reconcile list still to send
        self.counted: dict[str, set[Key]] = {s: set() for s in SITE_IDS}  # what the broker counted where, then
        self.quotes: dict[str, JobSpec] = {}  # quote hold -> the job it was quoted for
        self.hold_ids: list[str] = []  # every hold seen: the quotes' and the preemptions'
        self.world: World | None = None  # as of the last check
        self.replicas = self.run(self._start())
        for site in SITE_IDS:
            self.run(self._announce(site, status_first=True, first="a"))
        for site, sent in self._in_flight():  # the first reconcile lists, empty
            self.sites[site].on_assignments(sent.batch)
        for queue in self.pending.values():
            queue.clear()

    # ------------------------------------------------------------------ plumbing

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """One step's work on the machine's own event loop; a step still at it after `STEP_LIMIT_S` fails
        naming itself (every step waits at most for a short deadline of Redis's clock)."""
        name = getattr(coro, "__qualname__", "step")
        try:
            return self.runner.run(self._bounded(coro, name))
        except BaseException:
            self.failed = True
            raise

    @staticmethod
    async def _bounded(coro: Coroutine[Any, Any, T], name: str) -> T:
        try:
            return await asyncio.wait_for(coro, STEP_LIMIT_S)
        except TimeoutError:
            raise AssertionError(f"the step {name} did not end within {STEP_LIMIT_S}s") from None

    async def _start(self) -> dict[str, Replica]:
        replicas = {}
        for name in REPLICAS:
            store = Store(aioredis.Redis.from_url(self.redis_url), self.keys)
            publish = Recorder(self, name)
            metrics = Metrics()
            scheduler = Scheduler(store, Snapshot(GEO), publish, accept_timeout_s=ACCEPT_TIMEOUT_S[name],
                                  metrics=metrics, replica=name)  # fmt: skip
            ingest = Ingest(store, publish, asyncio.Event(), GEO, metrics)
            replicas[name] = Replica(store, scheduler, ingest, publish, metrics)
        return replicas

    def published(self, replica: str, site: str, batch: Assignments) -> None:
        sent = Sent((self.step, site, replica, batch.model_dump_json()), replica, batch)
        self.sent[site].append(sent)
        if not batch.reconcile:
            for item in batch.assignments:
                if item.action == "run":
                    self.runs[(item.job, item.attempt)] = (site, sent.index, getattr(item, "seq", None))
        if self.sites[site].connected:  # a site's MQTT session is clean: what is sent while it is away is lost
            bisect.insort(self.pending[(site, replica)], sent, key=lambda s: s.index)

    @staticmethod
    def order(first: str) -> tuple[str, ...]:
        return (first, *(r for r in REPLICAS if r != first))

    async def _handle_everywhere(self, first: str, topic: str, payload: bytes) -> None:
        """Status and capacity reach every replica (they are not in the shared subscription)."""
        for name in self.order(first):
            await self.replicas[name].ingest.handle(topic, payload)

    async def _send_capacity(self, site: str, first: str, payload: bytes | None = None) -> None:
        model = self.sites[site]
        if payload is None:
            payload = model.capacity()
        boot, seq, external, _ = next(c for c in model.capacity_sent if c[3] == payload)
        last = self.applied.get(site)
        if last is None or last[0] != boot or seq > last[1]:
            self.applied[site] = (boot, seq, external)
        store = self.replicas[first].store
        await clock_reaches(store, self.last_heartbeat + HEARTBEAT_GAP_MS)
        await self._handle_everywhere(first, topics.capacity(site), payload)
        self.last_heartbeat = await store.clock_ms()

    async def _announce(self, site: str, status_first: bool, first: str, defer: bool = False) -> None:
        """A site (re)connecting: `online` and a capacity message, each applied by every replica. With `defer`,
        the replica that sets the site online sends its reconcile list in a later step: other steps (a pass
        of the other replica) run in between, as they can while its ingest awaits."""
        self.sites[site].connected = True
        if status_first:
            await self._online(site, first, defer)
        await self._send_capacity(site, first)
        if not status_first:
            await self._online(site, first, defer)

    async def _online(self, site: str, first: str, defer: bool) -> None:
        if not defer:
            await self._handle_everywhere(first, topics.status(site), b"online")
            return
        for name in self.order(first):  # Ingest._status for `online`, its reconcile_site left for later
            if await self.replicas[name].store.set_site_status(site, "online"):
                self.reconciles_due.append((name, site))

    def away(self, site: str) -> bool:
        """Whether the site is disconnected, or back but not yet sent its reconcile list."""
        return not self.sites[site].connected or any(s == site for _, s in self.reconciles_due)

    async def _event(self, replica: str, site: str, key: Key, kind: str, reason: str = "") -> None:
        """A site event, handled by the one replica the shared subscription gives it to."""
        if kind in ENDED_BY_SITE:
            self.site_said[site].add(key)
        self.sites[site].events_sent.append((key, kind, reason))
        message = {"schema": EVENT_SCHEMA, "site": site, "job": key[0], "attempt": key[1], "event": kind,
                   "reason": reason or None}  # fmt: skip
        await self.replicas[replica].ingest.handle(topics.events(site), orjson.dumps(message))

    # ------------------------------------------------------------------ rules

    @initialize(jobs=st.lists(JOBS, min_size=1, max_size=6))
    def submit_first(self, jobs: list[Job]) -> None:
        """Work waiting before the first step."""
        self.submit(jobs)

    @rule(jobs=st.lists(JOBS, min_size=1, max_size=3))
    def submit(self, jobs: list[Job]) -> None:
        for job in jobs:
            name = f"j{len(self.jobs) + 1:03d}"
            assert self.run(self._submit(name, job_spec(name, job)))
            self.jobs.append(name)

    async def _submit(self, job: str, spec: JobSpec) -> bool:
        """Submit through replica a, a millisecond after the last submission: jobs of one priority then queue
        in the order they were submitted (in one millisecond, the tenant's name would decide)."""
        store = self.replicas["a"].store
        await clock_reaches(store, self.last_submit + 1)
        _, created = await store.submit(job, spec)
        self.last_submit = await store.clock_ms()
        return created

    # Hypothesis orders rules by their number of arguments and draws the first ones more often: the steps
    # that move work along (passes, deliveries, reports) take the fewest, outages and sweeps the most.
    @rule()
    def schedule_on_a(self) -> None:
        self.run(self.replicas["a"].scheduler.run_once())

    @rule()
    def schedule_on_b(self) -> None:
        self.run(self.replicas["b"].scheduler.run_once())

    def _deliver(self, site: str, replica: str) -> None:
        batch = self.pending[(site, replica)].pop(0).batch
        self.sites[site].on_assignments(batch)
        self.sites[site].delivered.append(batch)

    @precondition(lambda self: any(self.pending.values()))
    @rule()
    def deliver_oldest(self) -> None:
        """The oldest message on its way reaches its site."""
        site, sent = self._in_flight()[0]
        self._deliver(site, sent.replica)

    @precondition(lambda self: any(self.pending.values()))
    @rule(data=st.data())
    def deliver(self, data: st.DataObject) -> None:
        """The next message of a (site, replica) channel reaches the site, a few times over: messages of
        one channel arrive in order, those of different channels in any."""
        for _ in range(data.draw(st.integers(min_value=1, max_value=3), label="messages")):
            channels = sorted(c for c, q in self.pending.items() if q)
            if not channels:
                return
            site, replica = data.draw(st.sampled_from(channels), label="channel")
            self._deliver(site, replica)

    @precondition(lambda self: any(s.connected and s.delivered for s in self.sites.values()))
    @rule(data=st.data())
    def redeliver(self, data: st.DataObject) -> None:
        """A message a site already had arrives again (QoS 1 delivers at least once)."""
        site = data.draw(st.sampled_from(sorted(s for s, m in self.sites.items() if m.connected and m.delivered)))
        model = self.sites[site]
        model.on_assignments(data.draw(st.sampled_from(model.delivered), label="message"))

    @precondition(lambda self: any(s.connected and s.events_sent for s in self.sites.values()))
    @rule(data=st.data())
    def repeat_event(self, data: st.DataObject) -> None:
        """A site sends an event again, late (QoS 1 again, or an outcome repeated with its heartbeats)."""
        site = data.draw(st.sampled_from(sorted(s for s, m in self.sites.items() if m.connected and m.events_sent)))
        key, kind, reason = data.draw(st.sampled_from(self.sites[site].events_sent), label="event")
        self.run(self._event(data.draw(st.sampled_from(REPLICAS), label="replica"), site, key, kind, reason))

    @precondition(lambda self: any(s.connected and s.held for s in self.sites.values()))
    @rule(data=st.data())
    def report(self, data: st.DataObject) -> None:
        """A site reports on work it holds (it rejects only what it has not yet accepted), to either replica."""
        site = data.draw(st.sampled_from(sorted(s for s, m in self.sites.items() if m.connected and m.held)))
        model = self.sites[site]
        # work the broker has taken back from the site first: a report the site sends before it hears of it
        key = data.draw(st.sampled_from(sorted(model.held, key=lambda k: (k in self.counted[site], k))), label="job")
        kind = data.draw(st.sampled_from(["accepted", "running", "completed", "failed", "rejected"]), label="event")
        replica = data.draw(st.sampled_from(REPLICAS), label="replica")
        held = model.held[key]
        if kind == "rejected" and held.said:
            kind = "failed"
        if kind in ENDED_BY_SITE:
            del model.held[key]
            model.finished.add(key)
        else:
            held.said.add(kind)
        self.run(self._event(replica, site, key, kind))

    @precondition(lambda self: any(s.connected and s.outbox for s in self.sites.values()))
    @rule(data=st.data())
    def send_site_decision(self, data: st.DataObject) -> None:
        """A site sends the next rejection (no room) or `lost` (listed but not held) it decided on delivery."""
        site = data.draw(st.sampled_from(sorted(s for s, m in self.sites.items() if m.connected and m.outbox)))
        replica = data.draw(st.sampled_from(REPLICAS), label="replica")
        key, kind, reason = self.sites[site].outbox.popleft()
        self.run(self._event(replica, site, key, kind, reason))

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data(), replica=st.sampled_from(REPLICAS))
    def cancel(self, data: st.DataObject, replica: str) -> None:
        """A user cancels a job not yet finished (as of the last step)."""
        self.run(self._cancel(replica, data.draw(st.sampled_from(self.live), label="job")))

    async def _cancel(self, replica: str, job_id: str) -> None:
        """The store and site calls of DELETE /v1/jobs/{id} (broker/http/jobs.py `cancel_job`), in its order."""
        r = self.replicas[replica]
        job = await r.store.get_job(job_id)
        assert job is not None
        for _ in range(CANCEL_TRIES):
            site, attempt = job.get("site", ""), job.get("attempt", "0")
            if await r.store.transition(job_id, "cancel", site, attempt, "cancelled by the user"):
                break
            fresh = await r.store.get_job(job_id)
            assert fresh is not None
            if JobState(fresh["state"]).final:
                return
            job = fresh
        else:
            return
        if site:
            await tell_site_to_cancel(r.publish, site, [(job_id, int(attempt))])

    @precondition(lambda self: any(s.connected for s in self.sites.values()))
    @rule(data=st.data(), restart=st.booleans(), back=st.booleans(), first=st.sampled_from(REPLICAS))
    def go_offline(self, data: st.DataObject, restart: bool, back: bool, first: str) -> None:
        """A site's connection drops (with `restart`, its adapter also starts again, empty): the Last Will
        `offline` reaches every replica, and each gives the site's jobs back to the queue. With `back`, the
        site reconnects at once (`online`, then capacity), and is sent a reconcile list."""
        site = data.draw(st.sampled_from(sorted(s for s, m in self.sites.items() if m.connected)))
        model = self.sites[site]
        model.connected = False
        model.delivered.clear()
        for replica in REPLICAS:
            self.pending[(site, replica)].clear()
        if restart:
            model.restart()
        self.run(self._handle_everywhere(first, topics.status(site), b"offline"))
        if back:
            self.run(self._announce(site, status_first=True, first=first))

    @precondition(lambda self: any(not s.connected for s in self.sites.values()))
    @rule(data=st.data(), status_first=st.booleans(), first=st.sampled_from(REPLICAS), defer=st.booleans())
    def come_back(self, data: st.DataObject, status_first: bool, first: str, defer: bool) -> None:
        site = data.draw(st.sampled_from(sorted(s for s, m in self.sites.items() if not m.connected)))
        self.run(self._announce(site, status_first, first, defer))

    @precondition(lambda self: bool(self.reconciles_due))
    @rule()
    def reconcile(self) -> None:
        """A replica that set a site online sends it the reconcile list (read now, stamped now)."""
        replica, site = self.reconciles_due.pop(0)
        self.run(reconcile_site(self.replicas[replica].store, self.replicas[replica].publish, site))

    @precondition(lambda self: any(s.connected for s in self.sites.values()))
    @rule(data=st.data(), replay=st.booleans(), external=st.sampled_from([None, 0, 2, 4]),
          first=st.sampled_from(REPLICAS))  # fmt: skip
    def capacity(self, data: st.DataObject, replay: bool, external: int | None, first: str) -> None:
        """A capacity message: the next one (maybe with other use outside the broker), or an earlier one
        delivered again (a lower seq, or another boot's)."""
        site = data.draw(st.sampled_from(sorted(s for s, m in self.sites.items() if m.connected)))
        model = self.sites[site]
        payload = None
        if replay:
            payload = data.draw(st.sampled_from([c[3] for c in model.capacity_sent]), label="earlier message")
        elif external is not None:
            model.external[data.draw(st.sampled_from(sorted(model.plan.pools)), label="pool")] = external
        self.run(self._send_capacity(site, first, payload))

    @rule(data=st.data(), replica=st.sampled_from(REPLICAS))
    def sweep(self, data: st.DataObject, replica: str) -> None:
        """The sweeper, once every short accept deadline has passed by Redis's clock; it may also find sites
        silent, as if the clock had moved past the last heartbeat of `silent` and of those older."""
        silent = data.draw(st.one_of(st.none(), st.none(), st.none(), st.sampled_from(SITE_IDS)), label="silent since")
        self.run(self._sweep(replica, silent))

    async def _sweep(self, replica: str, silent: str | None) -> None:
        store = self.replicas[replica].store
        while True:
            now = await store.clock_ms()
            if not await store.redis.zrangebyscore(self.keys.only.assigned, f"({now}", now + 60_000):
                break
            await asyncio.sleep(0.001)
        ttl = 10**12
        if silent is not None:  # silent: `silent` and the sites heard from before it, not those after
            ttl = now - int(await store.redis.zscore(self.keys.hub(HUB_OF[silent]).seen, silent) or now)
        # a preemption's hold handed over here waits for its accept as the replica's own assignments do
        await sweep(ClockAt(store, now), self.replicas[replica].publish, ttl, int(ACCEPT_TIMEOUT_S[replica] * 1000))

    # ------------------------------------------------------------------ holds and preemption

    @rule(data=st.data(), job=JOBS, ttl_ms=st.sampled_from(HOLD_TTLS_MS), fallback=st.booleans())
    def take_hold(self, data: st.DataObject, job: Job, ttl_ms: int, fallback: bool) -> None:
        """POST /v1/quote?hold=true: a quote's candidates for a job, the first that can take it now held at the
        quoted price for `ttl_ms` (with `fallback`, the next candidate when the first cannot)."""
        _, models, count, hubs, _, _ = job
        pools = [(plan, model) for plan in PLANS for model in models
                 if model in plan.pools and (not hubs or plan.hub in hubs)]  # fmt: skip
        order = data.draw(st.permutations(pools), label="candidates")
        options = [hold_offer(plan, model, count) for plan, model in order[: 2 if fallback else 1]]
        hold_id = f"q{len(self.quotes) + 1:03d}"
        spec = job_spec("quoted", job)
        if self.run(self._take_hold(hold_id, spec, options, ttl_ms)):
            self.quotes[hold_id] = spec
            self.hold_ids.append(hold_id)

    async def _take_hold(self, hold_id: str, spec: JobSpec, options: list[HoldOption], ttl_ms: int) -> bool:
        """The take, and what it had to do by the state just before it: the tenant's limit of standing holds,
        then the first option whose site is online with the devices free; else the first option's refusal."""
        store = self.replicas["a"].store
        pipe = store.redis.pipeline(transaction=True)
        pipe.zcard(self.keys.only.tenant_holds(spec.tenant))
        for o in options:
            pipe.hget(self.keys.hub(HUB_OF[o.site]).site(o.site), "status")
            pipe.hmget(self.keys.hub(HUB_OF[o.site]).capacity(o.site), f"t:{o.model}", f"x:{o.model}", f"a:{o.model}")
        standing, *rows = await pipe.execute()
        codes = []
        for i, o in enumerate(options):
            status, (total, external, allocated) = _text(rows[2 * i] or b""), rows[2 * i + 1]
            free = int(total or 0) - int(external or 0) - int(allocated or 0)
            codes.append(Refusal.SITE_NOT_ONLINE if status != "online" else Refusal.STALE_VIEW if free < o.count
                         else None)  # fmt: skip
        taken = await store.take_hold(hold_id, spec.tenant, options, ttl_ms, spec.placement_hash(), max_holds=MAX_HOLDS)
        event(f"take_hold: {taken.refusal.value if taken.refusal else f'option {taken.choice}'}")
        if standing >= MAX_HOLDS:
            assert taken.hold is None and taken.refusal is Refusal.TOO_MANY_HOLDS, taken
            return False
        if None not in codes:
            assert taken.hold is None and taken.refusal is codes[0], f"expected {codes[0]}, got {taken}"
            return False
        hold, choice = taken.hold, codes.index(None)
        assert hold is not None and taken.choice == choice, f"expected option {choice} of {codes}, got {taken}"
        o = options[choice]
        assert (hold.state, hold.tenant, hold.site, hold.model, hold.count, hold.price, hold.for_job) == (
            "held", spec.tenant, o.site, o.model, o.count, o.price, ""), hold  # fmt: skip
        assert hold.expires_ms - hold.created_ms == ttl_ms and hold.resources == spec.placement_hash()
        return True

    @precondition(lambda self: bool(self.hold_ids))
    @rule(data=st.data(), who=st.sampled_from(["owner", "owner", "another tenant", "stale id"]))
    def release_hold(self, data: st.DataObject, who: str) -> None:
        """DELETE /v1/holds/{id} by the hold's tenant (a quote's hold, or a preemption's), or a release naming
        another tenant or a hold that never was: only a standing hold of the caller's tenant ends."""
        hold_id = data.draw(st.sampled_from(self.hold_ids), label="hold")
        self.run(self._release_hold(hold_id + ("x" if who == "stale id" else ""), who == "another tenant"))

    async def _release_hold(self, hold_id: str, stranger: bool) -> None:
        store = self.replicas["b"].store
        before = await store.get_hold(hold_id)
        owner = before.tenant if before is not None else TENANTS[0]
        tenant = next(t for t in TENANTS if t != owner) if stranger else owner
        released = await store.release_hold(hold_id, tenant, "released by the user")
        assert released == (before is not None and before.standing and not stranger), (hold_id, tenant, before)
        after = await store.get_hold(hold_id)
        if before is None:
            assert after is None
            return
        assert after is not None and after.state == ("released" if released else before.state), after
        if released:
            assert await store.release_hold(hold_id, owner) is False, "a hold ends once"

    @precondition(lambda self: bool(self.quotes))
    @rule(data=st.data(), past_ttl=st.booleans())
    def expire_holds(self, data: st.DataObject, past_ttl: bool) -> None:
        """The sweeper's expiry of quote holds, judged by Redis's clock now or (`past_ttl`) once the clock has
        moved past the latest of their times: each ends once, and only once its time is up."""
        holds = data.draw(st.lists(st.sampled_from(sorted(self.quotes)), min_size=1, max_size=3, unique=True))
        self.run(self._expire_holds(holds, past_ttl))

    async def _expire_holds(self, holds: list[str], past_ttl: bool) -> None:
        store = self.replicas["b"].store
        before = {h: hold for h in holds if (hold := await store.get_hold(h)) is not None}
        at: int | None = None  # None: Redis's clock
        if past_ttl:
            latest = max(hold.expires_ms for hold in before.values())
            if latest - await store.clock_ms() <= 100:
                await clock_reaches(store, latest)
            else:
                at = latest  # an hour on: the script is told the time instead of waiting for it
        t0 = at if at is not None else await store.clock_ms()
        ended = await store.expire_holds(holds, at)
        t1 = at if at is not None else await store.clock_ms()
        event(f"expire_holds: {sum(ended)} of {len(holds)} expired")
        for hold_id, expired in zip(holds, ended, strict=True):
            hold = before[hold_id]
            if not hold.standing or hold.expires_ms > t1:
                assert not expired, f"{hold_id} ({hold.state}, expires {hold.expires_ms}) expired at {t1}"
            elif hold.expires_ms <= t0:
                assert expired, f"{hold_id} standing, expires {hold.expires_ms}, not expired at {t0}"
            after = await store.get_hold(hold_id)
            assert after is not None and after.state == ("expired" if expired else hold.state), after
        assert not any(await store.expire_holds([h for h, e in zip(holds, ended, strict=True) if e], at)), (
            "a hold ends once"
        )

    @precondition(lambda self: bool(self.hold_ids))
    @rule(data=st.data(), replica=st.sampled_from(REPLICAS), how=st.sampled_from(SUBMISSIONS_WITH_A_HOLD))
    def submit_held(self, data: st.DataObject, replica: str, how: str) -> None:
        """POST /v1/jobs with a hold (broker/http/jobs.py `_submit_held`): the job quoted (or one changed since,
        or another tenant's, or naming a hold that never was), through either replica. It is placed exactly on
        the hold at the hold's price and its site told, or refused with the hold's state and nothing stored."""
        hold_id = data.draw(st.sampled_from(self.hold_ids), label="hold")
        spec = self.quotes.get(hold_id)
        if spec is None:  # a preemption's hold: its tenant's job, which a preemption's hold was never quoted for
            held = self.world.holds.get(hold_id, {}) if self.world is not None else {}
            spec = job_spec("quoted", (held.get("tenant") or TENANTS[0], ("A100-80G",), 2, (), "normal", None))
        if how == "another tenant":
            spec = spec.model_copy(update={"tenant": next(t for t in TENANTS if t != spec.tenant)})
        elif how == "changed":
            spec = spec.model_copy(update={"origin": "beijing"})
        elif how == "unknown id":
            hold_id += "x"
        name = f"j{len(self.jobs) + 1:03d}"
        if self.run(self._submit_held(replica, name, spec.model_copy(update={"name": name, "hold": hold_id}))):
            self.jobs.append(name)

    async def _submit_held(self, replica: str, name: str, spec: JobSpec) -> bool:
        r = self.replicas[replica]
        store = r.store
        assert spec.hold is not None
        await clock_reaches(store, self.last_submit + 1)
        before = await store.get_hold(spec.hold)
        status = _text(await store.redis.hget(self.keys.hub(HUB_OF[before.site]).site(before.site), "status")
                       or b"") if before else ""  # fmt: skip
        t0 = await store.clock_ms()
        outcome = await store.submit_held(name, spec, int(ACCEPT_TIMEOUT_S[replica] * 1000))
        t1 = self.last_submit = await store.clock_ms()
        after = await store.get_hold(spec.hold)
        # what submit.lua must answer, in its order: unknown (or another tenant's), expired, ended, mismatched
        expected: set[str] = set()
        if before is None or before.tenant != spec.tenant:
            expected.add("hold_unknown")
        elif not before.standing:
            expected.add(f"hold_{before.state}")
        else:
            if before.expires_ms <= t1:
                expected.add("hold_expired")
            if before.expires_ms > t0:
                expected.add("hold_mismatch" if before.resources != spec.placement_hash() else "stored")
        got = outcome.code if isinstance(outcome, Conflict) else "stored"
        event(f"submit_held: {got}")
        assert got in expected, f"{spec.hold} ({before}) for {name}: expected {expected}, got {outcome!r}"
        if isinstance(outcome, Conflict):
            assert isinstance(outcome, HoldNotStanding) or outcome.code == "hold_mismatch"
            assert await store.get_job(name) is None, "a job refused for its hold is not stored"
            assert after == before, f"a refused job changed its hold: {before} -> {after}"
            return False
        assert not isinstance(outcome, Exception) and before is not None and after is not None
        job, created, commit = outcome
        assert created and commit is not None
        if status != "online":  # the site went away since the hold was taken: the job waits like any other
            assert commit.refusal is Refusal.SITE_NOT_ONLINE, commit
            assert job["state"] == "queued" and after == before, (job, after)
            return True
        assert commit.ok, commit
        assert (job["state"], job["site"], job["model"], int(job["count"]), float(job["price"]), job["hold"]) == (
            "assigned", before.site, before.model, before.count, before.price, before.id), job  # fmt: skip
        assert (after.state, after.job) == ("used", name), after
        # and its site is told, as the HTTP path does
        offer = orjson.loads(job.get("decision") or "{}").get("chosen") or {}
        await publish_runs(r.publish, {job["site"]: [held_assignment(name, spec, offer, commit)]})
        return True

    def _queued_above_low(self) -> list[str]:
        w = self.world
        if w is None:
            return []
        return [j for j in self.jobs if w.jobs[j]["state"] == "queued" and w.jobs[j]["priority"] != "low"]

    def _preemptible_work(self) -> list[tuple[str, str, str]]:
        """(site, model, priority) of the preemptible jobs holding devices at online sites, as of the last check."""
        w = self.world
        if w is None:
            return []
        return sorted({(j["site"] or "", j["model"] or "", j["priority"] or "") for j in w.jobs.values()
                       if j["state"] in HOLDING and j["preemptible"] == "1" and j["priority"] != "high"
                       and w.status.get(j["site"] or "") == "online"})  # fmt: skip

    @precondition(lambda self: bool(self._preemptible_work()))
    @rule(data=st.data())
    def submit_urgent(self, data: st.DataObject) -> None:
        """A job of higher priority than preemptible work running somewhere, for that pool's hub and model and
        as many devices as the pool has: it fits there only if the work gives way (or elsewhere in the hub)."""
        site, model, priority = data.draw(st.sampled_from(self._preemptible_work()), label="pool")
        plan = next(p for p in PLANS if p.id == site)
        tenant = data.draw(st.sampled_from(TENANTS), label="tenant")
        urgent = "high" if priority == "normal" else data.draw(st.sampled_from(["high", "normal"]), label="priority")
        self.submit([(tenant, (model,), plan.pools[model], (plan.hub,), urgent, None)])

    @precondition(lambda self: bool(self._queued_above_low()))
    @rule(data=st.data(), replica=st.sampled_from(REPLICAS))
    def preempt(self, data: st.DataObject, replica: str) -> None:
        """A pass of `replica`, and for a high or normal job it left queued, its Preemptor (as the scheduler
        asks it for a job that fits nowhere): lower-priority preemptible work gives way if that makes room."""
        self.run(self.replicas[replica].scheduler.run_once())
        self._check(self._delivered())  # the pass is a step of its own: what the preemption finds is checked from it
        states = self.run(self.replicas[replica].store.get_jobs(self.jobs, "state", "priority"))
        waiting = [job for job, (state, priority) in zip(self.jobs, states, strict=True)
                   if state == "queued" and priority != "low"]  # fmt: skip
        if waiting:
            self.run(self._preempt(replica, data.draw(st.sampled_from(waiting), label="job")))

    async def _preempt(self, replica: str, job: str) -> None:
        r = self.replicas[replica]
        record = await r.store.get_job(job)
        assert record is not None
        req = Request.of(job, JobSpec.model_validate_json(record["spec"]))
        if record.get("last_site"):  # as the intake asks for it
            req = req.relaxed(avoid_sites=frozenset({record["last_site"]}))
        # a Preemptor as a pass has it (this job not yet tried), whose clock reads 0: the victims' lost work
        # weighs nothing, so which ones it picks does not hang on how long the steps took (the ordering itself
        # is tests/unit's), and its hold's name is the same in every replay but for its random tail
        frozen = ClockAt(r.store, 0)
        frozen.usage, frozen.limits = r.store.usage, r.store.limits
        preemptor = Preemptor(frozen, r.publish, r.metrics, MAX_PREEMPTIONS)
        sent = {site: len(self.sent[site]) for site in SITE_IDS}
        async with r.scheduler.view() as snapshot:
            note = await preemptor.consider(req, snapshot)
        after = await r.store.get_job(job)
        assert after is not None
        event(f"preempt: {'preempting' if note is not None else 'nothing to preempt'}")
        if note is None:
            assert after.get("preempting") == record.get("preempting"), f"{job} preempted, yet was told it did not"
            return
        hold = await r.store.get_hold(after["preempting"])
        assert hold is not None and hold.standing and hold.for_job == job and after["state"] == "queued", (after, hold)
        victims = []
        for name in self.jobs:
            for entry in map(orjson.loads, await r.store.redis.lrange(self.keys.only.job_history(name), 0, -1)):
                if entry.get("preempted_by") == job and entry.get("ts") == hold.created_ms:
                    victims.append((name, entry))
        assert victims, f"{job} preempting at {hold.site} with no victims"
        told = {(a.job, a.attempt) for s in sent for m in self.sent[s][sent[s]:] for a in m.batch.assignments
                if a.action == "preempt"}  # fmt: skip
        for victim, entry in victims:
            v = await r.store.get_job(victim)
            assert v is not None and v["state"] == "queued", f"{victim} preempted by {job} but {v}"
            assert v["reason"] == f"preempted by job {job} of tenant {after['tenant']}", v["reason"]
            assert entry["site"] == hold.site and (victim, entry["attempt"]) in told, (victim, entry, told)

    def _graces_ending(self) -> list[tuple[int, str]]:
        """(end, hold) of the standing preemptions' holds whose grace period ends within a run, in the order
        they were taken."""
        w = self.world
        if w is None:
            return []
        standing = w.standing_holds()
        return [(int(standing[h]["expires"]), h) for h in self.hold_ids if h in standing and standing[h].get("for")
                and int(standing[h]["expires"]) - int(standing[h]["created"]) <= 1000]  # fmt: skip

    @precondition(lambda self: bool(self._graces_ending()))
    @rule(replica=st.sampled_from(REPLICAS))
    def hand_over(self, replica: str) -> None:
        """The sweeper once the soonest preemption's grace period is over: it hands the hold to the job it was
        taken for, placed exactly there at the hold's price (lifecycle `hand_over`, `commit_hold`), or, when
        that job is no longer waiting for it or the site is away, lets the hold expire."""
        self.run(self._hand_over(replica, self._graces_ending()[0][1]))

    async def _hand_over(self, replica: str, hold_id: str) -> None:
        store = self.replicas[replica].store
        before = await store.get_hold(hold_id)
        assert before is not None and before.standing
        await clock_reaches(store, before.expires_ms)
        job = await store.get_job(before.for_job)
        assert job is not None
        status = _text(await store.redis.hget(self.keys.hub(HUB_OF[before.site]).site(before.site), "status") or b"")
        waiting = job["state"] == "queued" or (job["state"] == "assigned" and not job.get("accepted_at"))
        await self._sweep(replica, None)
        after, job = await store.get_hold(hold_id), await store.get_job(before.for_job)
        assert after is not None and job is not None
        event(f"hand_over: {after.state}")
        if after.state == "used":
            assert status == "online" and waiting, f"{hold_id} handed to {before.for_job}, which was {job}"
            assert (after.job, job["site"], job["model"], int(job["count"]), float(job["price"]), job["hold"]) == (
                before.for_job, before.site, before.model, before.count, before.price, hold_id), job  # fmt: skip
            assert job["state"] in HOLDING
        else:
            assert after.state == "expired", f"{hold_id} past its grace period, swept, and still {after.state}"
            assert status != "online" or job["state"] != "queued", f"{hold_id} expired, {before.for_job} waits"

    # ------------------------------------------------------------------ checks

    async def _read(self) -> World:
        k, redis = self.keys, self.replicas["a"].store.redis
        # the preemptions' holds (named at random by the replica that made them) are first seen standing:
        # nothing ends a hold in the step that takes it. In order of the job each is for, so that a replay
        # lists them in the same order.
        known = set(self.hold_ids)
        new = [h for h in map(_text, await redis.zrange(k.only.holds, 0, -1)) if h not in known]
        if new:
            fors = [_text(await redis.hget(k.only.hold(h), "for") or b"") for h in new]
            self.hold_ids += [h for _, h in sorted(zip(fors, new, strict=True))]
        pipe = redis.pipeline(transaction=True)
        for job in self.jobs:
            pipe.hmget(k.only.job(job), *JOB_FIELDS)
            pipe.lrange(k.only.job_history(job), 0, -1)
        for site in SITE_IDS:
            pipe.hgetall(k.hub(HUB_OF[site]).capacity(site))
            pipe.hgetall(k.hub(HUB_OF[site]).held(site))
            pipe.hget(k.hub(HUB_OF[site]).site(site), "status")
        pipe.zrange(k.only.queue, 0, -1)
        for tenant in TENANTS:
            pipe.zrange(k.only.tenant_queue(tenant), 0, -1)
            pipe.zrange(k.only.tenant_parked(tenant), 0, -1)
        pipe.zrange(k.only.assigned, 0, -1)
        pipe.hgetall(k.only.tenant_usage)
        for hold in self.hold_ids:
            pipe.hgetall(k.only.hold(hold))
        pipe.zrange(k.only.holds, 0, -1)
        for tenant in TENANTS:
            pipe.zrange(k.only.tenant_holds(tenant), 0, -1)
        raw = list(await pipe.execute())
        raw.reverse()
        jobs, history = {}, {}
        for job in self.jobs:
            jobs[job] = {f: (_text(v) if v is not None else None) for f, v in zip(JOB_FIELDS, raw.pop(), strict=True)}
            history[job] = [orjson.loads(item) for item in raw.pop()]
        capacity, status = {}, {}
        ledger: dict[str, dict[str, tuple[int, str, int]]] = {}
        for site in SITE_IDS:
            capacity[site] = {_text(f): int(v) for f, v in raw.pop().items()}
            ledger[site] = {}
            for owner, entry in raw.pop().items():
                attempt, model, count, _seq = _text(entry).split(" ")
                ledger[site][_text(owner)] = (int(attempt), model, int(count))
            status[site] = _text(raw.pop() or b"")
        site_jobs = {site: {o for o in entries if not o.startswith(HOLD_OWNER)} for site, entries in ledger.items()}
        site_holds = {site: {o.removeprefix(HOLD_OWNER) for o in entries if o.startswith(HOLD_OWNER)}
                      for site, entries in ledger.items()}  # fmt: skip
        queue = {_text(j) for j in raw.pop()}
        tenant_queues, tenant_parked = {}, {}
        for tenant in TENANTS:
            tenant_queues[tenant] = {_text(j) for j in raw.pop()}
            tenant_parked[tenant] = {_text(j) for j in raw.pop()}
        assigned = {_text(j) for j in raw.pop()}
        usage = {_text(t): int(v) for t, v in raw.pop().items()}
        holds = {hold: {_text(f): _text(v) for f, v in raw.pop().items()} for hold in self.hold_ids}
        standing = {_text(h) for h in raw.pop()}
        tenant_holds = {tenant: {_text(h) for h in raw.pop()} for tenant in TENANTS}
        return World(jobs, history, capacity, site_jobs, ledger, status, queue, tenant_queues, tenant_parked, assigned,
                     usage, holds, standing, tenant_holds, site_holds)  # fmt: skip

    def _check_pools(self, w: World) -> None:
        for plan in PLANS:
            cap = w.capacity[plan.id]
            boot, seq, external = self.applied[plan.id]
            for model in {f[2:] for f in cap} | set(plan.pools):
                total, allocated = cap.get(f"t:{model}", 0), cap.get(f"a:{model}", 0)
                where = f"{plan.id}/{model}"
                assert total == plan.pools.get(model, 0), f"{where}: total {total}, the site has {plan.pools}"
                assert cap.get(f"x:{model}", 0) == external.get(model, 0), (
                    f"{where}: in use outside {cap.get(f'x:{model}')}, last applicable message (boot {boot}, seq "
                    f"{seq}) said {external}"
                )
                assert 0 <= allocated <= total, f"{where} over-allocated: allocated {allocated} of {total}"
                held = sum(int(w.jobs[j]["count"] or 0) for j in w.site_jobs[plan.id]
                           if j in w.jobs and w.jobs[j]["model"] == model)  # fmt: skip
                on_hold = sum(int(h["count"]) for h in w.standing_holds().values()
                              if (h["site"], h["model"]) == (plan.id, model))  # fmt: skip
                assert allocated == held + on_hold, (
                    f"{where}: allocated counter {allocated}, its jobs hold {held} and its standing holds {on_hold}"
                )

    def _check_places(self, w: World) -> None:
        holders: dict[str, set[str]] = defaultdict(set)
        for site, members in w.site_jobs.items():
            for job in members:
                holders[job].add(site)
        assert set(holders) <= set(w.jobs), f"unknown jobs at sites: {set(holders) - set(w.jobs)}"
        assert w.queue <= set(w.jobs) and w.assigned <= set(w.jobs)
        usage: dict[str, int] = defaultdict(int)
        for job, j in w.jobs.items():
            state, tenant = j["state"], j["tenant"] or ""
            in_queue = (
                job in w.queue,
                job in w.tenant_queues.get(tenant, set()),
                job in w.tenant_parked.get(tenant, set()),
            )
            if state == "queued":
                assert in_queue in ((True, True, False), (True, False, True)), (
                    f"{job} queued, in (the queue, its tenant's queue, its tenant's parked jobs): {in_queue}"
                )
                assert not holders[job], f"{job} queued yet in the job sets of {holders[job]}"
                assert job not in w.assigned, f"{job} queued yet waiting for an accept"
            elif state in HOLDING:
                assert holders[job] == {j["site"]}, f"{job} {state} at {j['site']}, in the ledgers of {holders[job]}"
                entry = w.ledger[j["site"] or ""][job]
                assert entry == (int(j["attempt"] or 0), j["model"], int(j["count"] or 0)), (
                    f"{job} {state} at {j['site']} (attempt {j['attempt']}, {j['count']} {j['model']}), its ledger "
                    f"entry {entry}"
                )
                assert not any(in_queue), f"{job} {state} yet queued: {in_queue}"
                if state == "running" or j["accepted_at"]:
                    assert job not in w.assigned, f"{job} {state} (accepted) yet waiting for an accept"
                else:
                    assert job in w.assigned, f"{job} assigned, not accepted, with no accept deadline"
                usage[tenant] += int(j["count"] or 0)
            else:
                assert state in ("completed", "failed", "cancelled"), f"{job} in state {state!r}"
                assert not holders[job] and not any(in_queue) and job not in w.assigned, (
                    f"{job} {state} yet held by {holders[job]}, queued {in_queue} or waiting for an accept"
                )
        for h in w.standing_holds().values():
            usage[h["tenant"]] += int(h["count"])
        for tenant in set(usage) | set(w.usage):
            assert w.usage.get(tenant, 0) == usage[tenant], (
                f"tenant {tenant} counted as holding {w.usage.get(tenant, 0)}, its jobs and holds {usage[tenant]}"
            )

    def _check_holds(self, w: World) -> None:
        """Each hold is in one of its states and indexed as such; it ends once and never changes after; a used
        one placed exactly one job (the one it was for, if any) on its site, model and count, at its price."""
        standing = w.standing_holds()
        assert w.standing == set(standing), f"standing index {sorted(w.standing)}, standing holds {sorted(standing)}"
        for tenant in TENANTS:
            mine = {h for h, hold in standing.items() if hold["tenant"] == tenant}
            assert w.tenant_holds[tenant] == mine, f"{tenant}'s holds index {w.tenant_holds[tenant]}, standing {mine}"
        for site in SITE_IDS:
            here = {h for h, hold in standing.items() if hold["site"] == site}
            assert w.site_holds[site] == here, f"{site}'s holds index {w.site_holds[site]}, standing {here}"
        placed: dict[str, list[tuple[str, dict[str, Any]]]] = defaultdict(list)
        for job, entries in w.history.items():
            for entry in entries:
                if entry.get("event") == "allocated" and entry.get("hold"):
                    placed[entry["hold"]].append((job, entry))
        previous = self.world.holds if self.world is not None else {}
        for hold_id, hold in w.holds.items():
            state, was = hold.get("state"), previous.get(hold_id)
            assert state in HOLD_STATES, f"hold {hold_id} in state {state!r}"
            if was is not None and was["state"] != "held":
                assert hold == was, f"hold {hold_id} changed after it ended {was['state']}: {was} -> {hold}"
            uses = placed.pop(hold_id, [])
            if state == "used":
                assert [job for job, _ in uses] == [hold["job"]], f"hold {hold_id} used by {hold['job']}, placed {uses}"
                assert not hold.get("for") or hold["job"] == hold["for"], f"hold {hold_id} for {hold['for']}: {hold}"
            else:
                assert not uses, f"hold {hold_id} {state}, yet it placed {uses}"
            pool = (hold["site"], hold["model"], int(hold["count"]))
            for job, entry in uses:
                assert (entry["site"], entry["model"], int(entry["count"])) == pool, f"{job} placed {entry} by {hold}"
                j = w.jobs[job]
                if j["state"] in HOLDING and j["hold"] == hold_id:
                    assert (j["site"], j["model"], int(j["count"] or 0), float(j["price"] or 0)) == (
                        *pool, float(hold["price"])), f"{job} placed with {hold_id} ({hold}): {j}"  # fmt: skip
        assert not placed, f"jobs placed with holds never taken: {dict(placed)}"

    def _check_preemptions(self, w: World) -> None:
        """A victim was holding preemptible work of lower priority than its preemptor, at the preemption's site
        and attempt, went back to the queue and says who preempted it; it is preempted at most `MAX_PREEMPTIONS`
        times and is no longer preemptible then; a job that was preempted never preempts (preempt.lua's rule
        against cascades); each preemption holds its victims' pool for the job that preempted them."""
        prev = self.world
        victims: dict[tuple[str, int], int] = defaultdict(int)  # (preemptor, when) -> victims
        for job, entries in w.history.items():
            j = w.jobs[job]
            preempted = [i for i, e in enumerate(entries) if e.get("event") == "requeued" and e.get("preempted_by")]
            times = int(j["preemptions"] or 0)
            assert times == len(preempted) <= MAX_PREEMPTIONS, f"{job} preempted {times} times: {entries}"
            if times >= MAX_PREEMPTIONS:
                assert j["preemptible"] != "1", f"{job} preempted {times} times and still preemptible"
            if preempted:
                later = [e for e in entries[preempted[0] :] if e.get("event") == "preempting"]
                assert not later, f"{job} was preempted, then preempted others (a cascade): {later}"
            if preempted and preempted[-1] == len(entries) - 1:
                assert j["state"] == "queued", f"{job} preempted and requeued, yet {j['state']}"
            for i in preempted:
                victims[(entries[i]["preempted_by"], entries[i]["ts"])] += 1
            if prev is None:
                continue
            for entry in entries[len(prev.history.get(job, [])) :]:
                if entry.get("event") == "requeued" and entry.get("preempted_by"):
                    v, by = prev.jobs[job], prev.jobs[entry["preempted_by"]]
                    assert v["state"] in HOLDING and (v["site"], int(v["attempt"] or 0)) == (
                        entry["site"], entry["attempt"]), f"{job} preempted ({entry}) as it was {v}"  # fmt: skip
                    assert v["preemptible"] == "1", f"{job} preempted, but it was not preemptible: {v}"
                    assert RANK[v["priority"] or ""] > RANK[by["priority"] or ""], f"{job} ({v}) preempted by {by}"
                    assert by["state"] == "queued" and int(by["preemptions"] or 0) == 0, f"{job} preempted by {by}"
        for job, entries in w.history.items():
            for entry in entries:
                if entry.get("event") != "preempting":
                    continue
                hold = w.holds.get(entry["hold"])
                assert hold is not None and hold["for"] == job and hold["site"] == entry["site"], (job, entry, hold)
                assert victims[(job, entry["ts"])] == entry["victims"], f"{job} {entry}: {victims[(job, entry['ts'])]}"

    def _check_connections(self, w: World) -> None:
        for site, model in self.sites.items():
            expected = ("online", "stale") if model.connected else ("offline",)
            assert w.status[site] in expected, f"{site} connected={model.connected} but {w.status[site]!r}"

    def _told(self, site: str, key: Key) -> bool:
        """Whether `site` was told to stop (job, attempt), or stopped it itself."""
        if key in self.site_said[site]:
            return True
        run = self.runs.get(key)
        for sent in self.sent[site]:
            if sent.batch.reconcile:
                upto = getattr(sent.batch, "upto", None)
                listed = {(a.job, a.attempt) for a in sent.batch.assignments}
                after_run = run is not None and run[0] == site and sent.index > run[1]
                stamped = upto is None or run is None or run[2] is None or upto >= run[2]
                if after_run and stamped and key not in listed:
                    return True
            elif any(a.action in ("cancel", "preempt") and a.job == key[0] and a.attempt >= key[1]
                     for a in sent.batch.assignments):  # fmt: skip
                return True
        return False

    def _check_told(self, w: World) -> None:
        """Work the broker took back from a site was stopped there: a cancelled job's holder got a cancel for
        it; any other attempt taken back was ended by the site, or the site was told (a cancel, or a
        reconcile list without it), unless the site is away now (it gets a list when it is back)."""
        for job, entries in w.history.items():
            for entry in entries:
                site, attempt = entry.get("site"), int(entry.get("attempt") or 0)
                if not site or entry.get("event") not in ("requeued", "cancelled", "failed"):
                    continue
                key = (job, attempt)
                if entry["event"] == "cancelled":
                    assert any(a.action == "cancel" and a.job == job and a.attempt >= attempt
                               for sent in self.sent[site] for a in sent.batch.assignments), (
                        f"{job} attempt {attempt} was cancelled at {site}, which was never sent a cancel for it"
                    )  # fmt: skip
                elif not self.away(site) and w.status[site] == "online":
                    assert self._told(site, key), f"{job} attempt {attempt} taken back from {site} ({entry}), " \
                                                  "and the site was never told"  # fmt: skip

    def _check_sites(self, w: World, sites: dict[str, SiteModel]) -> None:
        """What connected sites hold agrees with the broker: no job live at two sites, and a site that is online
        holds exactly what the broker counts there, except what it has decided to give back."""
        live: dict[str, set[str]] = defaultdict(set)
        for site, model in sites.items():
            if self.away(site):
                continue  # its MQTT session is gone, or its reconcile list is still to come
            for job, _attempt in model.held:
                live[job].add(site)
            if w.status[site] != "online":
                continue
            held, counted = set(model.held), w.holdings(site)
            giving_back = {key for key, _, _ in model.outbox}
            assert held <= counted, f"{site} runs {sorted(held - counted)}, which the broker does not count there"
            assert counted <= held | giving_back, (
                f"the broker counts {sorted(counted - held - giving_back)} at {site}, which does not run them"
            )
        for job, where in live.items():
            assert len(where) <= 1, f"{job} is live at {sorted(where)}"

    def _delivered(self) -> dict[str, SiteModel]:
        """The sites as they will be once every message now on its way has arrived (in publication order)."""
        sites = copy.deepcopy(self.sites)
        for site, sent in self._in_flight():
            sites[site].on_assignments(sent.batch)
        return sites

    def _in_flight(self) -> list[tuple[str, Sent]]:
        """Every message on its way, with its site, in publication order."""
        return sorted(((site, sent) for (site, _), q in self.pending.items() for sent in q), key=lambda x: x[1].index)

    def _check(self, sites: dict[str, SiteModel]) -> None:
        world = self.run(self._read())
        self.live = [job for job in self.jobs if world.jobs[job]["state"] in ("queued", *HOLDING)]
        self.counted = {site: world.holdings(site) for site in SITE_IDS}
        try:
            self._check_pools(world)
            self._check_places(world)
            self._check_connections(world)
            self._check_told(world)
            self._check_sites(world, sites)
            self._check_holds(world)
            self._check_preemptions(world)
        except BaseException:
            self.failed = True
            raise
        self.world = world

    @invariant()
    def consistent(self) -> None:
        self.step += 1
        self._check(self._delivered())

    # ------------------------------------------------------------------ the end

    def _settle(self) -> None:
        """Every site back and heard from, then every message and site decision delivered until none is left."""
        for site, model in self.sites.items():
            if not model.connected:
                self.run(self._announce(site, status_first=True, first="a"))
        while self.reconciles_due:
            self.reconcile()
        world = self.run(self._read())
        for site in SITE_IDS:
            if world.status[site] == "stale":
                self.run(self._send_capacity(site, "a"))  # a fresh heartbeat revives it, and it is reconciled
        for _ in range(10):
            in_flight = self._in_flight()
            outboxes = [(s, m) for s, m in self.sites.items() if m.outbox]
            if not in_flight and not outboxes:
                return
            for queue in self.pending.values():
                queue.clear()
            for site, sent in in_flight:
                self.sites[site].on_assignments(sent.batch)
            for site, model in outboxes:
                while model.outbox:
                    key, kind, reason = model.outbox.popleft()
                    self.run(self._event("a", site, key, kind, reason))
        raise AssertionError("messages kept coming after every site was back")

    def teardown_checks(self) -> None:
        """The final check: once everything has arrived, every site runs exactly what the broker counts there."""
        self._settle()
        self._check(self.sites)
        world = self.run(self._read())
        for site, model in self.sites.items():
            assert set(model.held) == world.holdings(site), (
                f"{site} runs {sorted(model.held)}, the broker counts {sorted(world.holdings(site))} there"
            )
        store = self.replicas["a"].store
        report = self.run(check_history(store))  # the whole event log, every job's and every hold's history
        assert report.ok and report.trimmed is False, [v.as_dict() for v in report.violations]
        assert self.run(audit(store)) == []

    def expect_counted(self, site: str, keys: set[Key]) -> None:
        """For written-out runs: what the broker counts at `site` (as of the last check)."""
        assert self.counted[site] == keys, f"the broker counts {self.counted[site]} at {site}, not {keys}"

    def expect_held(self, site: str, keys: set[Key]) -> None:
        assert set(self.sites[site].held) == keys, f"{site} holds {set(self.sites[site].held)}, not {keys}"

    def teardown(self) -> None:
        try:
            if not self.failed:
                self.teardown_checks()
        finally:
            if hasattr(self, "replicas"):
                self.run(self._close())
            self.runner.close()

    async def _close(self) -> None:
        redis = self.replicas["a"].store.redis
        prefixes = [self.keys.prefix, *(self.keys.hub(hub).prefix for hub in sorted(set(HUB_OF.values())))]
        keys = [key for prefix in prefixes async for key in redis.scan_iter(match=f"{prefix}:*", count=1000)]
        if keys:
            await redis.unlink(*keys)
        for replica in self.replicas.values():
            await replica.store.close()


# No shrinking: each example drives real servers, and shrinking one failure can take longer than the test's
# time; the failing steps are printed as they ran (and a written-out run below replays them).
SETTINGS = settings(max_examples=60, stateful_step_count=30, deadline=None, database=None,
                    phases=[Phase.explicit, Phase.reuse, Phase.generate], report_multiple_bugs=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])  # fmt: skip


@pytest.mark.timeout(300)
def test_two_replicas_and_four_sites_agree_step_by_step(redis_server: RedisServer) -> None:
    """Interleaved submissions, passes of two replicas, delayed and reordered assignments, site events,
    cancels, outages, restarts, stale and replayed capacity and sweeps never over-allocate a pool, never
    lose a job or count it in two places, and leave every job run by at most the one site the broker
    counts it at."""
    network = type("Network", (BrokerNetwork,), {"redis_url": redis_server.url})
    run_state_machine_as_test(network, settings=SETTINGS)


# --------------------------------------------------------------------------- written-out interleavings
# The orders the random search reaches only now and then, replayed step by step through the same machine
# (and its checks after every step).


class Script:
    """Stands in for hypothesis's `data` in a written-out run: each draw is the next value given."""

    def __init__(self, *values: Any) -> None:
        self.values = list(values)

    def draw(self, strategy: Any, label: str | None = None) -> Any:
        return self.values.pop(0)


A100_X2 = ("t1", ("A100-80G",), 2, (), "normal", None)


@pytest.fixture
def network(redis_server: RedisServer) -> Iterator[BrokerNetwork]:
    machine = type("Network", (BrokerNetwork,), {"redis_url": redis_server.url})()
    machine.submit_first([A100_X2])
    machine.consistent()
    yield machine
    machine.failed = True  # the test's own end ran the final check, or failed
    machine.teardown()


def steps(network: BrokerNetwork, *calls: Callable[[], object]) -> None:
    """Each call, then the checks that follow every step; at the end, the final check."""
    for call in calls:
        call()
        network.consistent()
    network.teardown_checks()


def test_a_run_assigned_after_a_reconcile_list_was_read_outlives_the_list(network: BrokerNetwork) -> None:
    """A site back from an outage gets its reconcile list from replica a; replica b assigns it a job; the run
    arrives first. The list, stamped before the run was assigned, must not stop it."""
    n = network
    steps(
        n,
        lambda: n.go_offline(Script("horinger-1"), restart=False, back=True, first="a"),
        n.schedule_on_b,
        lambda: n.expect_counted("horinger-1", {("j001", 1)}),
        lambda: n.deliver(Script(1, ("horinger-1", "b"))),
        lambda: n.deliver(Script(1, ("horinger-1", "a"))),
        lambda: n.expect_held("horinger-1", {("j001", 1)}),
    )


def test_a_reconcile_list_naming_a_run_still_on_its_way_gives_the_job_back(network: BrokerNetwork) -> None:
    """A site comes back; before its replica reads the reconcile list, the other replica assigns it a job, so
    the list names it; the list arrives before the run. The site reports it does not hold the job, the broker
    queues it again, and the late run is ignored."""
    n = network
    steps(
        n,
        lambda: n.go_offline(Script("horinger-1"), restart=False, back=False, first="a"),
        lambda: n.come_back(Script("horinger-1"), status_first=True, first="a", defer=True),
        n.schedule_on_b,
        lambda: n.expect_counted("horinger-1", {("j001", 1)}),
        n.reconcile,
        lambda: n.deliver(Script(1, ("horinger-1", "a"))),
        lambda: n.send_site_decision(Script("horinger-1", "b")),
        lambda: n.expect_counted("horinger-1", set()),
        lambda: n.deliver(Script(1, ("horinger-1", "b"))),
        lambda: n.expect_held("horinger-1", set()),
    )


def test_a_report_on_an_attempt_taken_back_does_not_touch_the_next_one(network: BrokerNetwork) -> None:
    """An assignment of replica a expires unaccepted and the job goes to another site; the first site, not yet
    told, reports the old attempt completed. The job's new attempt at the other site is untouched."""
    n = network
    steps(
        n,
        n.schedule_on_a,
        lambda: n.expect_counted("horinger-1", {("j001", 1)}),
        n.deliver_oldest,
        lambda: n.sweep(Script(None), replica="b"),
        n.schedule_on_a,
        lambda: n.expect_counted("guian-2", {("j001", 2)}),
        lambda: n.deliver(Script(1, ("guian-2", "a"))),
        lambda: n.report(Script("horinger-1", ("j001", 1), "completed", "a")),
        lambda: n.expect_counted("guian-2", {("j001", 2)}),
    )
