"""Faults under load: the harness of the fault suite (tests/faults) and `suanwang bench --soak`.

Every part runs as its own process (broker replicas, one simulated-site process per hub, and, unless
URLs are given, redis-server with AOF and mosquitto), so any part can be killed with SIGKILL and
started again. `Client` plays careful users: every job carries an Idempotency-Key and a submission
that meets a connection error, a 5xx or a 429 (after its Retry-After) is retried with the same key.
`Wire` listens to the sites' MQTT traffic as an operator would. After the faults, `settle` waits until the
system is quiet and `examine` compares what Redis holds with what users were told, and reads the event log
back as a history (broker.state.history).

`run_soak` keeps a steady load while it kills a site process every few seconds and, at moments spread over
the run (`fault_plan`), one broker replica, redis-server (restarted on its port from its AOF, written with
`appendfsync always`, so no acknowledged job may be missing) and Mosquitto (restarted on its port), the two
servers only when the soak started them. After each kill it times the recovery (every replica answering 2xx,
the next placement, the whole cluster healthy); at the end it reports lost jobs, double allocations, the audit
and the history check, any 5xx but a 503 while Redis was down, and attempts a site accepted (seen on MQTT)
that the broker then expired as never accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import aiohttp
import aiomqtt
import orjson

from adapters.fleet import sites_for_hub
from broker.state.audit import audit
from broker.state.connection import StreamEntries, text, translated
from broker.state.history import HistoryReport, check_history
from broker.state.store import Store
from common import topics
from common.config import MqttTarget
from common.errors import StoreUnavailable
from suanwang.servers import MosquittoServer, RedisServer, ServerError, free_port

HUBS = ("guizhou", "gansu", "ningxia")
MODEL = "Ascend-910B"  # in the first three seeded sites of each of HUBS
ORIGINS = ("guiyang", "lanzhou", "yinchuan")
FINAL = ("completed", "failed", "cancelled")
HOLDING = ("assigned", "running")
RETRY_LIMIT = "gave up after"
TENANT = "soak"


def job_body(rng: random.Random, model: str = MODEL, arch: str = "ASIC", hours: tuple[float, float] = (1.0, 3.0)
             ) -> dict[str, Any]:  # fmt: skip
    """A small job any of the sites can run; at time scale 3600 it lasts `hours` seconds."""
    return {
        "name": "soak", "workload": "batch", "origin": rng.choice(ORIGINS),
        "resources": {"arch": arch, "models": [model], "count": rng.randint(1, 8)},
        "duration_hours": round(rng.uniform(*hours), 2),
    }  # fmt: skip


# ------------------------------------------------------------------------------------------ processes


@dataclass
class Proc:
    """One child process that can be killed (SIGKILL) and started again with the same arguments."""

    name: str
    args: list[str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None
    port: int = 0

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def start(self) -> None:
        if self.alive:
            return
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen([sys.executable, "-m", *self.args], stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True)  # fmt: skip

    def kill(self) -> float:
        """SIGKILL, as a crash would; returns the wall time of the kill."""
        at = time.time()
        if self.popen is not None and self.alive:
            os.kill(self.popen.pid, signal.SIGKILL)
            self.popen.wait()
        return at

    def freeze(self, frozen: bool = True) -> None:
        """SIGSTOP (or SIGCONT): the process hangs with its connections open, as a stuck host would."""
        if self.popen is not None and self.alive:
            os.kill(self.popen.pid, signal.SIGSTOP if frozen else signal.SIGCONT)

    def stop(self) -> None:
        if self.popen is not None and self.alive:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


@dataclass
class Cluster:
    """Broker replicas `broker-N` and simulated-site processes `sim-<hub>` on one Redis and one MQTT."""

    redis_url: str
    mqtt_url: str
    workdir: Path
    namespace: str = field(default_factory=lambda: f"soak{uuid.uuid4().hex[:8]}")
    brokers: int = 2
    hubs: tuple[str, ...] = HUBS
    sites_per_hub: int = 3
    time_scale: float = 3600.0
    site_ttl_s: float = 3.0
    accept_timeout_s: float = 3.0
    heartbeat_s: float = 1.0
    serve_args: tuple[str, ...] = ()  # more `suanwang serve` options for every broker replica
    procs: dict[str, Proc] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for i in range(self.brokers):
            port = free_port()
            self.procs[f"broker-{i}"] = Proc(f"broker-{i}", [
                "suanwang.cli", "serve", "--redis", self.redis_url, "--mqtt", self.mqtt_url,
                "--http", f"127.0.0.1:{port}", "--namespace", self.namespace, "--site-ttl", str(self.site_ttl_s),
                "--accept-timeout", str(self.accept_timeout_s), "--log-level", "warning", "--auth", "off",
                *self.serve_args,
            ], self.workdir / f"broker-{i}.log", port=port)  # fmt: skip
        for hub in self.hubs:
            self.procs[f"sim-{hub}"] = Proc(f"sim-{hub}", [
                "adapters.sim", "--mqtt", self.mqtt_url, "--hub", hub, "--sites", str(self.sites_per_hub),
                "--time-scale", str(self.time_scale), "--interval", str(self.heartbeat_s), "--log-level", "warning",
            ], self.workdir / f"sim-{hub}.log")  # fmt: skip

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p.port}" for p in self.procs.values() if p.port]

    @property
    def broker_names(self) -> list[str]:
        return [name for name, p in self.procs.items() if p.port]

    def sites(self, hub: str | None = None) -> list[str]:
        return [s.id for h in ([hub] if hub else self.hubs) for s in sites_for_hub(h, self.sites_per_hub)]

    async def start(self, timeout: float = 60.0) -> None:
        for proc in self.procs.values():
            proc.start()
        await self.ready(timeout)

    async def ready(self, timeout: float = 30.0) -> None:
        """Every live broker healthy and every site of a live hub online."""
        want = {s for h in self.hubs if self.procs[f"sim-{h}"].alive for s in self.sites(h)}
        deadline = time.monotonic() + timeout
        last = "nothing asked yet"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            while time.monotonic() < deadline:
                try:
                    for name in self.broker_names:
                        if self.procs[name].alive:
                            url = f"http://127.0.0.1:{self.procs[name].port}"
                            async with session.get(f"{url}/healthz") as response:
                                if response.status != 200:
                                    raise RuntimeError(f"{name}: {await response.text()}")
                            async with session.get(f"{url}/v1/sites") as response:
                                online = {s["id"] for s in (await response.json())["sites"] if s["status"] == "online"}
                            if not want <= online:
                                raise RuntimeError(f"{name}: sites not online: {sorted(want - online)}")
                    return
                except (aiohttp.ClientError, TimeoutError, RuntimeError) as exc:
                    last = str(exc) or type(exc).__name__
                await asyncio.sleep(0.2)
        raise TimeoutError(f"the cluster did not come up in {timeout}s: {last}")

    def close(self) -> None:
        for proc in self.procs.values():
            proc.stop()


@dataclass
class Servers:
    """Redis (AOF) and Mosquitto of our own, unless URLs are given."""

    redis: RedisServer | None = None
    mqtt: MosquittoServer | None = None

    @classmethod
    def start(cls, redis_url: str | None, mqtt_url: str | None, appendfsync: str = "everysec"
              ) -> tuple[Servers, str, str]:  # fmt: skip
        own = cls()
        if not redis_url:
            own.redis = RedisServer(appendonly=True, appendfsync=appendfsync)
            own.redis.start()
            redis_url = own.redis.url
        if not mqtt_url:
            own.mqtt = MosquittoServer()
            own.mqtt.start()
            mqtt_url = own.mqtt.url
        return own, redis_url, mqtt_url

    def cleanup(self) -> None:
        for server in (self.redis, self.mqtt):
            if server is not None:
                server.cleanup()


# ------------------------------------------------------------------------------------------ users


@dataclass(frozen=True)
class Ack:
    job: str
    status: int  # 202 created, 200 an idempotent replay
    at: float  # wall time the answer arrived


class Client:
    """Submits jobs as a careful user: with an Idempotency-Key, retrying errors with the same key."""

    def __init__(self, urls: list[str], give_up_s: float = 90.0) -> None:
        self.urls = urls
        self.give_up_s = give_up_s
        self.acks: dict[str, Ack] = {}  # idempotency key -> what the API answered
        self.retries: Counter[str] = Counter()  # by cause
        self.refused: dict[str, str] = {}  # key -> the 4xx answer (a bug in the test or the API)
        self.unanswered: list[str] = []
        self.unavailable: list[tuple[float, str]] = []  # 503 answers (expected while Redis is down): time, body
        self.server_errors: list[tuple[float, int, str]] = []  # any other 5xx: (wall time, status, body)
        self._turn = 0

    async def submit(self, session: aiohttp.ClientSession, key: str, body: dict[str, Any]) -> Ack | None:
        payload = orjson.dumps(body)
        headers = {"Content-Type": "application/json", "Idempotency-Key": key, "X-Suanwang-Tenant": TENANT}
        deadline, pause = time.monotonic() + self.give_up_s, 0.1
        while time.monotonic() < deadline:
            self._turn += 1
            url = self.urls[self._turn % len(self.urls)]
            wait = pause
            try:
                async with session.post(f"{url}/v1/jobs", data=payload, headers=headers) as response:
                    status, answer = response.status, await response.read()
                    retry_after = response.headers.get("Retry-After", "")
                if status in (200, 202):
                    ack = Ack(orjson.loads(answer)["id"], status, time.time())
                    self.acks[key] = ack
                    return ack
                if status == 429:  # a rate or queue limit: a careful user waits as told, then tries again
                    wait = min(float(retry_after), 5.0) if retry_after.isdigit() else 1.0
                elif status < 500:
                    self.refused[key] = f"{status} {answer[:300]!r}"
                    return None
                elif status == 503:
                    self.unavailable.append((time.time(), answer[:300].decode(errors="replace")))
                else:
                    self.server_errors.append((time.time(), status, answer[:300].decode(errors="replace")))
                self.retries[f"http_{status}"] += 1
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.retries[type(exc).__name__] += 1
            await asyncio.sleep(wait)
            pause = min(pause * 2, 1.0)
        self.unanswered.append(key)
        return None

    async def load(self, bodies: list[dict[str, Any]], rate: float, prefix: str = "") -> None:
        """Submit `bodies` at a steady `rate` per second (each submission retried on its own)."""
        prefix = prefix or uuid.uuid4().hex[:8]
        started = time.monotonic()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            tasks = []
            for i, body in enumerate(bodies):
                await asyncio.sleep(max(0.0, started + i / rate - time.monotonic()))
                tasks.append(asyncio.create_task(self.submit(session, f"{prefix}-{i}", body)))
            await asyncio.gather(*tasks)

    @property
    def jobs(self) -> dict[str, Ack]:
        return {ack.job: ack for ack in self.acks.values()}


class Wire:
    """The sites' MQTT traffic as an operator sees it: events and reconcile messages, with arrival times."""

    def __init__(self, mqtt_url: str, assignments: bool = True) -> None:
        self.target = MqttTarget.from_url(mqtt_url)
        self.assignments = assignments  # also listen to what sites are told (for reconcile messages)
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.reconciles: list[tuple[float, str, list[dict[str, Any]]]] = []
        self.connected = asyncio.Event()

    async def run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client(self.target.host, self.target.port,
                                          identifier=f"wire-{uuid.uuid4().hex[:6]}") as client:  # fmt: skip
                    await client.subscribe(f"{topics.ROOT}/sites/+/events", qos=1)
                    if self.assignments:
                        await client.subscribe(f"{topics.ROOT}/sites/+/assignments", qos=1)
                    self.connected.set()
                    async for message in client.messages:
                        body = orjson.loads(message.payload)  # type: ignore[arg-type]
                        if str(message.topic).endswith("/events"):
                            self.events.append((time.time(), body))
                        elif body.get("reconcile"):
                            self.reconciles.append((time.time(), body["site"], body["assignments"]))
            except (aiomqtt.MqttError, orjson.JSONDecodeError):
                self.connected.clear()
                await asyncio.sleep(0.3)


# ------------------------------------------------------------------------------------------ checks


async def settle(store: Store, jobs: list[str], timeout: float = 60.0, quiet_s: float = 3.0) -> float:
    """Wait until every job is final, or the event log has stood still for `quiet_s` with no assignment
    past its accept timeout; returns the seconds waited (`timeout` if it never settled)."""
    started = time.monotonic()
    last: tuple[int, int] | None = None
    still_since = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            rows = await store.get_jobs(jobs, "state")
            logged = sum([int(await store.redis.xlen(sk.events)) for sk in store.keys.each_shard])
            overdue = len(await store.overdue_assignments(int(time.time() * 1000)))
        except (StoreUnavailable, OSError, Exception):  # Redis may still be loading its AOF
            await asyncio.sleep(0.3)
            continue
        if all(state in FINAL for (state,) in rows):
            return time.monotonic() - started
        now = (logged, overdue)
        if now != last:
            last, still_since = now, time.monotonic()
        elif overdue == 0 and time.monotonic() - still_since >= quiet_s:
            return time.monotonic() - started
        await asyncio.sleep(0.25)
    return timeout


def intervals(history: list[dict[str, Any]]) -> list[tuple[int, float, int, str]]:
    """Per attempt: (start, end, attempt, site) from allocation to the event that ended it (inf if none)."""
    out = []
    for i, entry in enumerate(history):
        if entry.get("event") != "allocated":
            continue
        end = next((e["ts"] for e in history[i + 1 :] if e.get("attempt") == entry["attempt"]
                    and e.get("event") in ("completed", "failed", "requeued", "cancelled")), float("inf"))  # fmt: skip
        out.append((entry["ts"], end, entry["attempt"], entry["site"]))
    return sorted(out)


@dataclass
class Findings:
    """What Redis holds, compared with what users were told."""

    jobs: int
    states: Counter[str]
    lost: list[str]  # acknowledged, not in Redis
    violations: list[dict[str, str]]  # from the auditor
    unfinished: dict[str, str]  # job -> why it is neither completed, correctly queued nor out of retries
    overlaps: list[str]  # a job held by two sites at once
    history_gaps: list[str]  # attempts missing from a job's history
    failed_reasons: Counter[str]
    retried: int = 0  # jobs placed more than once (requeued after a fault)
    history: HistoryReport | None = None  # the event log checked as every job's history

    @property
    def history_violations(self) -> list[dict[str, str]]:
        return [v.as_dict() for v in self.history.violations] if self.history is not None else []

    def problems(self, may_lose: set[str] | frozenset[str] = frozenset()) -> list[str]:
        out = [f"lost {job}" for job in self.lost if job not in may_lose]
        out += [f"audit {v['kind']} {v['subject']}: {v['detail']}" for v in self.violations]
        out += [f"unfinished {job}: {why}" for job, why in self.unfinished.items()]
        out += [f"history {v['kind']} {v['job']}: {v['detail']}" for v in self.history_violations]
        return out + self.overlaps + self.history_gaps

    @property
    def double_allocations(self) -> int:
        kinds = ("over_allocated", "allocation_mismatch", "negative_allocation", "placement")
        doubles = sum(1 for v in self.history_violations if v["kind"] == "double_live")
        return len(self.overlaps) + doubles + sum(1 for v in self.violations if v["kind"] in kinds)


async def examine(store: Store, jobs: list[str]) -> Findings:
    violations = [v.as_dict() for v in await audit(store)]
    rows = await store.get_jobs(jobs, "state", "site", "attempt", "reason")
    states: Counter[str] = Counter()
    lost, unfinished, failed_reasons, retried = [], {}, Counter[str](), 0
    overlaps, gaps = [], []
    for job, (state, site, attempt, reason) in zip(jobs, rows, strict=True):
        if state is None:
            lost.append(job)
            continue
        states[state] += 1
        if state == "failed":
            failed_reasons[(reason or "")[:40]] += 1
            if not (reason or "").startswith(RETRY_LIMIT):
                unfinished[job] = f"failed: {reason}"
        elif state in HOLDING:
            unfinished[job] = f"still {state} at {site} (attempt {attempt}) after the system settled"
        elif state not in ("completed", "queued"):
            unfinished[job] = state
        retried += int(attempt or 0) > 1
        history = await store.history(job)
        spans = intervals(history)
        if [a for _, _, a, _ in spans] != list(range(1, int(attempt or 0) + 1)):
            gaps.append(f"history of {job} lists attempts {[a for _, _, a, _ in spans]}, the job has {attempt}")
        for (_s1, e1, a1, site1), (s2, _e2, a2, site2) in itertools.pairwise(spans):
            if s2 < e1:
                overlaps.append(f"{job} attempt {a1} at {site1} until {e1} overlaps attempt {a2} at {site2} "
                                f"from {s2}")  # fmt: skip
    return Findings(len(jobs), states, lost, violations, unfinished, overlaps, gaps, failed_reasons, retried,
                    await check_history(store))  # fmt: skip


# ------------------------------------------------------------------------------------------ soak

SERVER_FAULTS = ("redis_kill", "broker_kill", "mosquitto_kill")  # taken in turn by `fault_plan`
GRACE_503_S = 1.0  # a 503 this long after every replica answered again still counts as the outage's
EXPIRED = "did not accept the assignment in time"  # the reason the broker gives when an accept timeout passes


@dataclass
class SoakOptions:
    redis_url: str | None = None
    mqtt_url: str | None = None
    seconds: float = 60.0
    rate: float = 20.0
    brokers: int = 2
    sites_per_hub: int = 3
    churn_s: tuple[float, float] = (3.0, 6.0)  # pause between site kills
    down_s: tuple[float, float] = (1.0, 3.0)  # how long a killed site or broker process stays down
    broker_kill: bool = True
    # SIGKILLs of the soak's own redis-server (restarted on its port from its AOF, written with `appendfsync
    # always`) and of its own Mosquitto (restarted on its port); None: once in a run shorter than two minutes,
    # else twice. Servers given by URL are never killed.
    redis_kills: int | None = None
    mosquitto_kills: int | None = None
    server_down_s: tuple[float, float] = (1.0, 3.0)  # how long a killed server stays down
    recovery_timeout_s: float = 45.0
    seed: int = 7

    def kills(self, redis_ours: bool, mosquitto_ours: bool) -> dict[str, int]:
        """How many times each server or broker fault comes in this run."""
        default = 1 if self.seconds < 120 else 2
        redis = default if self.redis_kills is None else self.redis_kills
        mosquitto = default if self.mosquitto_kills is None else self.mosquitto_kills
        return {"redis_kill": redis if redis_ours else 0, "broker_kill": int(self.broker_kill),
                "mosquitto_kill": mosquitto if mosquitto_ours else 0}  # fmt: skip


def fault_plan(seconds: float, kills: Mapping[str, int], rng: random.Random) -> list[tuple[float, str]]:
    """When each server or broker fault comes (seconds into the run), kinds taken in turn: the middle 80% of
    the run is cut into one slot per fault, and each fault comes within a tenth of a slot of its slot's middle,
    so faults are spread out and each has time to recover before the next."""
    left = Counter({kind: kills.get(kind, 0) for kind in SERVER_FAULTS})
    kinds: list[str] = []
    while +left:
        for kind in SERVER_FAULTS:
            if left[kind] > 0:
                kinds.append(kind)
                left[kind] -= 1
    slot = 0.8 * seconds / max(len(kinds), 1)
    return [(0.1 * seconds + (i + 0.5 + rng.uniform(-0.1, 0.1)) * slot, kind) for i, kind in enumerate(kinds)]


@dataclass
class Outage:
    """One SIGKILL of Redis, Mosquitto or a broker replica, and how long the system took to recover."""

    fault: str
    at_s: float  # into the run
    killed: float  # wall time of the kill
    target: str = ""
    down_s: float = 0.0  # until it was started again
    api_2xx_s: float | None = None  # from the kill until every replica answered 2xx
    next_placement_s: float | None = None  # from the kill until the first allocation once it was back
    healthy_s: float | None = None  # from the kill until every broker is healthy and every site online
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"fault": self.fault, "target": self.target, "at_s": self.at_s, "down_s": self.down_s,
                "api_2xx_s": self.api_2xx_s, "next_placement_s": self.next_placement_s,
                "healthy_s": self.healthy_s, **({"error": self.error} if self.error else {})}  # fmt: skip


@dataclass
class FaultLog:
    """Every fault injected, when, and what recovered how fast."""

    started: float = field(default_factory=time.time)
    counts: Counter[str] = field(default_factory=Counter)
    recovery: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    outages: list[Outage] = field(default_factory=list)
    timeline: list[tuple[float, str]] = field(default_factory=list)  # wall time, which fault
    http_errors: list[str] = field(default_factory=list)  # 5xx other than 503, seen by the recovery probe
    skipped: dict[str, str] = field(default_factory=dict)

    def add(self, outage: Outage) -> None:
        self.outages.append(outage)
        self.counts[outage.fault] += 1
        for what in ("api_2xx_s", "next_placement_s", "healthy_s"):
            value = getattr(outage, what)
            if value is not None:
                self.recovery[f"{outage.fault}_to_{what}"].append(value)
        if outage.fault == "broker_kill" and outage.healthy_s is not None:
            self.recovery["broker_restart_to_healthy_s"].append(round(outage.healthy_s - outage.down_s, 3))

    def before(self, wall: float) -> str | None:
        """The last fault injected before `wall`, and how long before."""
        earlier = [(at, what) for at, what in self.timeline if at <= wall]
        return f"{earlier[-1][1]} {wall - earlier[-1][0]:.2f}s before" if earlier else None


def _history_summary(report: HistoryReport | None) -> dict[str, Any] | None:
    """The history check in the soak's report: what was read, and the first violations."""
    if report is None:
        return None
    return {"events": report.events, "jobs": report.jobs, "trimmed": report.trimmed,
            "partial_jobs": report.partial_jobs, "live_jobs": report.live_jobs, "violations": len(report.violations),
            "first_violations": [v.as_dict() for v in report.violations[:20]]}  # fmt: skip


def _summary(values: list[float], digits: int = 2) -> dict[str, float] | None:
    """Count, median and maximum (and the 99th percentile of 100 values or more)."""
    if not values:
        return None
    out = {"n": len(values), "p50": round(statistics.median(values), digits)}
    if len(values) >= 100:
        out["p99"] = round(sorted(values)[int(len(values) * 0.99)], digits)
    return out | {"max": round(max(values), digits)}


async def _site_recovery(store: Store, held: list[tuple[str, int]], sites: set[str], timeout: float = 30.0
                         ) -> tuple[float | None, float | None]:  # fmt: skip
    """Seconds until none of the `held` (job, attempt) is held at `sites` any more, and until each has
    been placed again (a later attempt) or is final."""
    started, requeued = time.monotonic(), None
    jobs = [job for job, _ in held]
    while held and time.monotonic() - started < timeout:
        with contextlib.suppress(StoreUnavailable):
            rows = await store.get_jobs(jobs, "state", "site", "attempt")
            if requeued is None and not any(s in HOLDING and site in sites for s, site, _ in rows):
                requeued = time.monotonic() - started
            olds = [old for _, old in held]
            moved = [s in FINAL or (s in HOLDING and int(a or 0) > o) for (s, _, a), o in zip(rows, olds, strict=True)]
            if requeued is not None and all(moved):
                return requeued, time.monotonic() - started
        await asyncio.sleep(0.1)
    return requeued, None


async def _placement_resumed(store: Store, after_ms: int, since_ms: int, timeout: float = 30.0) -> float | None:
    """Seconds from `since_ms` to the first allocation logged after `after_ms` (by the time Redis gave it)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        with contextlib.suppress(StoreUnavailable):
            async with translated():
                entries = [e for sk in store.keys.each_shard
                           for e in cast(StreamEntries, await store.redis.xrevrange(sk.events, count=500))]
            times = [int(raw.get(b"ts", 0)) for _id, raw in entries if raw.get(b"type") == b"allocated"]
            later = [ts for ts in times if ts > after_ms]
            if later:
                return round((min(later) - since_ms) / 1000, 3)
        await asyncio.sleep(0.05)
    return None


async def _api_answers(urls: list[str], since: float, timeout: float, errors: list[str]) -> float | None:
    """Seconds from `since` (wall time) until every replica has answered 2xx to a read of the jobs list;
    a 5xx other than 503 on the way is a finding, kept in `errors`."""
    waiting = set(urls)
    headers = {"X-Suanwang-Tenant": TENANT}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while waiting and time.time() - since < timeout:
            for url in sorted(waiting):
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(f"{url}/v1/jobs?limit=1", headers=headers) as response:
                        body = await response.read()
                    if 200 <= response.status < 300:
                        waiting.discard(url)
                    elif response.status >= 500 and response.status != 503:
                        errors.append(f"GET {url}/v1/jobs {response.status} at {time.time() - since:.2f}s after "
                                      f"the kill: {body[:200].decode(errors='replace')}")  # fmt: skip
            if waiting:
                await asyncio.sleep(0.05)
    return None if waiting else round(time.time() - since, 3)


async def _healthy(cluster: Cluster, since: float, timeout: float) -> float | None:
    try:
        await cluster.ready(timeout)
    except TimeoutError:
        return None
    return round(time.time() - since, 3)


async def _outage(fault: str, cluster: Cluster, servers: Servers, store: Store, options: SoakOptions,
                  rng: random.Random, log: FaultLog) -> Outage:  # fmt: skip
    """SIGKILL Redis, Mosquitto or one broker replica, start it again on its port a moment later (Redis
    replays its AOF), and time the recovery: the API answering 2xx, the next placement, the cluster healthy."""
    server = servers.redis if fault == "redis_kill" else servers.mqtt if fault == "mosquitto_kill" else None
    broker = rng.choice(cluster.broker_names) if fault == "broker_kill" else ""
    killed = time.time()
    if server is not None:
        server.kill()
    else:
        cluster.procs[broker].kill()
    target = broker if server is None else f"{fault.removesuffix('_kill')} :{server.port}"
    outage = Outage(fault, round(killed - log.started, 2), killed, target=target)
    log.timeline.append((killed, f"{fault} {outage.target}"))
    timeout = options.recovery_timeout_s
    api = asyncio.create_task(_api_answers(cluster.urls, killed, timeout, log.http_errors))  # from the kill on
    await asyncio.sleep(rng.uniform(*(options.down_s if broker else options.server_down_s)))
    back = time.time()
    outage.down_s = round(back - killed, 2)
    try:
        if server is not None:
            await asyncio.to_thread(server.start, 30.0)  # waits for its port: off the event loop
        else:
            cluster.procs[broker].start()
    except ServerError as exc:
        outage.error = str(exc)
        api.cancel()
        return outage
    # A surviving replica places work while a broker is down; nothing is placed while Redis or MQTT is.
    after_ms = int((killed if broker else back) * 1000)
    outage.api_2xx_s, outage.next_placement_s, outage.healthy_s = await asyncio.gather(
        api, _placement_resumed(store, after_ms, int(killed * 1000), timeout), _healthy(cluster, killed, timeout)
    )
    return outage


async def _site_kill(cluster: Cluster, store: Store, options: SoakOptions, rng: random.Random, log: FaultLog
                     ) -> asyncio.Task[None] | None:  # fmt: skip
    """Kill one hub's site process, start it again a moment later; returns the watch on its jobs' recovery."""
    hub = rng.choice(cluster.hubs)
    sites = set(cluster.sites(hub))
    try:  # just before the kill: what it loses
        jobs = [j for s in sites for j in await store.jobs_at(s)]
        held = [(j, int(a or 0)) for j, (a,) in zip(jobs, await store.get_jobs(jobs, "attempt"), strict=True)]
    except StoreUnavailable:
        held = []
    log.timeline.append((cluster.procs[f"sim-{hub}"].kill(), f"site_process_kill sim-{hub}"))
    log.counts["site_process_kill"] += 1
    log.counts["jobs_held_by_killed_sites"] += len(held)
    await asyncio.sleep(rng.uniform(*options.down_s))
    cluster.procs[f"sim-{hub}"].start()
    if not held:
        return None

    async def watch() -> None:
        requeued, replaced = await _site_recovery(store, held, sites)
        if requeued is not None:
            log.recovery["site_kill_to_requeued_s"].append(requeued)
        if replaced is not None:
            log.recovery["site_kill_to_replaced_s"].append(replaced)

    return asyncio.create_task(watch())


async def _faults(cluster: Cluster, servers: Servers, store: Store, options: SoakOptions, rng: random.Random,
                  until: float, log: FaultLog) -> None:  # fmt: skip
    """Kill a random hub's site process every few seconds and start it again; kill Redis, Mosquitto and one
    broker at the moments `fault_plan` gives, pausing the site kills until the system has recovered."""
    kills = options.kills(servers.redis is not None, servers.mqtt is not None)
    start = time.monotonic()
    plan = [(start + at, kind) for at, kind in fault_plan(options.seconds, kills, rng)]
    checks: list[asyncio.Task[None]] = []
    while time.monotonic() < until:
        next_site = time.monotonic() + rng.uniform(*options.churn_s)
        if plan and plan[0][0] <= next_site:
            at, fault = plan.pop(0)
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            log.add(await _outage(fault, cluster, servers, store, options, rng, log))
            continue
        await asyncio.sleep(max(0.0, next_site - time.monotonic()))
        if time.monotonic() >= until:
            break
        check = await _site_kill(cluster, store, options, rng, log)
        if check is not None:
            checks.append(check)
    for _at, fault in plan:
        log.skipped[fault] = "the run ended before its moment came"
    await asyncio.gather(*checks)


Stream = list[tuple[str, dict[str, str]]]  # the event log: (entry id, fields), oldest first


async def read_stream(store: Store) -> Stream:
    """The whole event stream (every job shard's, merged by id), a page at a time."""
    out: Stream = []
    for sk in store.keys.each_shard:
        after = "-"
        while True:
            async with translated():
                entries = cast(StreamEntries, await store.redis.xrange(sk.events, after, "+", count=5000))
            out += [(text(event_id), {text(k): text(v) for k, v in raw.items()}) for event_id, raw in entries]
            if len(entries) < 5000:
                break
            after = "(" + text(entries[-1][0])
    return sorted(out, key=lambda row: tuple(int(p) for p in row[0].split("-")))


def _ms(event_id: str) -> float:
    return int(event_id.split("-")[0]) / 1000


@dataclass
class Accepts:
    """The sites' `accepted` events as an extra MQTT subscriber saw them, against what the log made of them."""

    lags: list[float]  # seconds from the wire to the log, for every accept the log applied
    expired: list[dict[str, Any]]  # accepted on the wire before the broker expired them as not accepted
    during_recovery: int  # of those, while the system recovered from a Redis, Mosquitto or broker kill


def accepts(stream: Stream, wire: Wire, log: FaultLog) -> Accepts:
    """Compare each accept the sites sent with the log: when it was applied, or whether the attempt was
    expired as never accepted although the accept was already on its way."""
    seen: dict[tuple[str, int], float] = {}
    for at, body in wire.events:
        if body.get("event") == "accepted":
            seen.setdefault((str(body.get("job")), int(body.get("attempt") or 0)), at)
    windows = [(o.killed, o.killed + (o.healthy_s if o.healthy_s is not None else math.inf)) for o in log.outages]
    lags, expired, during = [], [], 0
    for event_id, fields in stream:
        key = (fields.get("job", ""), int(fields.get("attempt") or 0))
        sent, at = seen.get(key), _ms(event_id)
        if sent is None:
            continue
        if fields.get("type") == "accepted":
            lags.append(at - sent)
        elif fields.get("type") in ("requeued", "failed") and EXPIRED in fields.get("reason", "") and sent < at:
            if any(a <= at and sent <= b for a, b in windows):
                during += 1
            else:
                expired.append({"job": key[0], "attempt": key[1], "site": fields.get("site", ""),
                                "accepted_on_wire_s": round(sent - log.started, 2),
                                "expired_s": round(at - log.started, 2)})  # fmt: skip
    return Accepts(lags, expired, during)


def _repeats(wire: Wire) -> int:
    """Site events the wire saw more than once (the same job, attempt, kind and site time)."""
    seen = Counter((e.get("job"), e.get("attempt"), e.get("event"), e.get("ts")) for _, e in wire.events)
    return sum(n - 1 for n in seen.values())


async def _evidence(store: Store, stream: Stream, found: Findings, client: Client, log: FaultLog,
                    accepted: Accepts, limit: int = 5) -> dict[str, Any]:  # fmt: skip
    """For a few jobs of each kind of problem: the job's events from the stream and the fault before it."""
    acks = client.jobs
    gave_up = [job for job, reason in await _failed_jobs(store, list(acks)) if reason.startswith(RETRY_LIMIT)]
    groups = {"lost": found.lost[:limit], "unfinished": list(found.unfinished)[:limit], "gave_up": gave_up[:limit],
              "history": [v["job"] for v in found.history_violations][:limit],
              "accepted_but_expired": list(dict.fromkeys(e["job"] for e in accepted.expired))[:limit]}  # fmt: skip
    wanted = {job for jobs in groups.values() for job in jobs}
    shown = ("type", "attempt", "site", "reason")
    events: dict[str, list[dict[str, str]]] = defaultdict(list)
    for event_id, fields in stream:
        if fields.get("job") in wanted:
            events[fields["job"]].append({"id": event_id, **{k: v for k, v in fields.items() if k in shown and v}})
    out: dict[str, Any] = {}
    for group, jobs in groups.items():
        for job in jobs:
            # the fault before the first sign of trouble (a requeue or failure), else before the job's first event
            trouble = [e["id"] for e in events.get(job, []) if e.get("type") in ("requeued", "failed")]
            first = next(iter(trouble or [e["id"] for e in events.get(job, [])]), "")
            at = _ms(first) if first else acks[job].at if job in acks else None
            out.setdefault(group, []).append({
                "job": job, "acknowledged": acks[job].status if job in acks else None,
                "fault_before": log.before(at) if at is not None else None, "events": events.get(job, []),
            })  # fmt: skip
    return out


async def _failed_jobs(store: Store, jobs: list[str]) -> list[tuple[str, str]]:
    rows = await store.get_jobs(jobs, "state", "reason")
    return [(job, reason or "") for job, (state, reason) in zip(jobs, rows, strict=True) if state == "failed"]


def unexpected_503(client: Client, log: FaultLog) -> list[tuple[float, str]]:
    """503 answers to submissions outside every Redis outage (from its kill until every replica answered 2xx
    again, and a moment more)."""
    windows = [(o.killed, o.killed + (o.api_2xx_s if o.api_2xx_s is not None else math.inf) + GRACE_503_S)
               for o in log.outages if o.fault == "redis_kill"]  # fmt: skip
    return [(at, body) for at, body in client.unavailable if not any(a <= at <= b for a, b in windows)]


async def _appendfsync(store: Store) -> str | None:
    try:
        async with translated():
            return str((await store.redis.config_get("appendfsync"))["appendfsync"])
    except (StoreUnavailable, KeyError):  # CONFIG may be renamed or refused on a managed Redis
        return None


async def run_soak(options: SoakOptions) -> dict[str, Any]:
    """Sustained submissions with site churn and kills of Redis, Mosquitto and a broker for `options.seconds`,
    then settle and report."""
    servers, redis_url, mqtt_url = Servers.start(options.redis_url, options.mqtt_url, appendfsync="always")
    workdir = Path(tempfile.mkdtemp(prefix="suanwang-soak-"))
    cluster = Cluster(redis_url, mqtt_url, workdir, brokers=options.brokers, sites_per_hub=options.sites_per_hub)
    store = Store.from_url(redis_url, cluster.namespace)
    rng = random.Random(options.seed)
    log = FaultLog()
    if servers.redis is None:
        log.skipped["redis_kill"] = "Redis was given by URL: the soak kills only a redis-server it started"
    if servers.mqtt is None:
        log.skipped["mosquitto_kill"] = "MQTT was given by URL: the soak kills only a Mosquitto it started"
    wire = Wire(mqtt_url, assignments=False)  # what the sites said, to tell a slow site from a slow broker
    listening = asyncio.create_task(wire.run())
    try:
        await cluster.start()
        appendfsync = await _appendfsync(store)
        client = Client(cluster.urls)
        bodies = [job_body(rng) for _ in range(int(options.seconds * options.rate))]
        until = time.monotonic() + options.seconds
        log.started = time.time()
        await asyncio.gather(client.load(bodies, options.rate),
                             _faults(cluster, servers, store, options, rng, until, log))  # fmt: skip
        for server in (servers.redis, servers.mqtt):
            if server is not None:
                await asyncio.to_thread(server.start, 30.0)  # anything still down comes back before settling
        for proc in cluster.procs.values():
            proc.start()
        jobs = list(client.jobs)
        settle_s = await settle(store, jobs, timeout=90.0)
        found = await examine(store, jobs)
        stream = await read_stream(store)
        accepted = accepts(stream, wire, log)
        evidence = await _evidence(store, stream, found, client, log, accepted)
    finally:
        listening.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listening
        await store.close()
        cluster.close()
        servers.cleanup()
    odd = [f"{at - log.started:.2f}s: {body}" for at, body in unexpected_503(client, log)]
    other = [f"{at - log.started:.2f}s: {status} {body}" for at, status, body in client.server_errors]
    other += log.http_errors
    http = {"503_while_redis_down": len(client.unavailable) - len(odd), "503_with_redis_up": odd[:10],
            "other_5xx": other[:10]}  # fmt: skip
    problems = found.problems() + [f"503 with Redis up at {s}" for s in odd] + [f"5xx at {s}" for s in other]
    problems += [f"{o.fault}: {o.error}" for o in log.outages if o.error]
    problems += [f"{len(client.unanswered)} submissions never acknowledged"] if client.unanswered else []
    problems += [f"refused {key}: {why}" for key, why in list(client.refused.items())[:10]]
    if accepted.expired:
        first = accepted.expired[0]
        problems.append(f"{len(accepted.expired)} attempts accepted by their site (seen on MQTT) and then expired by "
                        f"the broker as not accepted, with no server or broker kill under way; the first: "
                        f"{first['job']} attempt {first['attempt']} at {first['site']}, accepted at "
                        f"{first['accepted_on_wire_s']}s, expired at {first['expired_s']}s")  # fmt: skip
    return {
        "seconds": options.seconds, "rate_per_s": options.rate, "brokers": options.brokers,
        "sites": len(cluster.sites()), "redis_appendfsync": appendfsync, "jobs_submitted": len(client.acks),
        "jobs_not_acknowledged": len(client.unanswered) + len(client.refused),
        "submit_retries": dict(client.retries), "http_5xx": http,
        "jobs": {s: found.states.get(s, 0) for s in ("completed", "failed", "queued", "assigned", "running")},
        "jobs_placed_more_than_once": found.retried, "failed_reasons": dict(found.failed_reasons),
        "lost_jobs": len(found.lost), "lost_job_ids": found.lost[:20], "double_allocations": found.double_allocations,
        "audit_violations": found.violations[:20], "history_violations": len(found.history_violations),
        "unfinished": dict(list(found.unfinished.items())[:20]), "history": _history_summary(found.history),
        "site_accepts": {"events_on_wire": len(wire.events), "repeats_on_wire": _repeats(wire),
                         "accept_to_applied_s": _summary(accepted.lags, 3),
                         "accepted_then_expired": len(accepted.expired),
                         "accepted_then_expired_during_recovery": accepted.during_recovery},
        "faults": dict(log.counts), "faults_skipped": log.skipped, "fault_log": [o.as_dict() for o in log.outages],
        "recovery": {name: _summary(values) for name, values in log.recovery.items()},
        "settle_s": round(settle_s, 2), "problems": problems[:40], "clean": not problems,
        "evidence": evidence, "logs": str(workdir),
    }  # fmt: skip
