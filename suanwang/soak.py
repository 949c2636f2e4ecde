"""Faults under load: the harness of the fault suite (tests/faults) and `suanwang bench --soak`.

Every part runs as its own process (broker replicas, one simulated-site process per hub, and, unless
URLs are given, redis-server with AOF and mosquitto), so any part can be killed with SIGKILL and
started again. `Client` plays careful users: every job carries an Idempotency-Key and a submission
that meets a connection error or a 5xx is retried with the same key. `Wire` listens to the sites'
MQTT traffic as an operator would. After the faults, `settle` waits until the system is quiet and
`examine` compares what Redis holds with what users were told, and reads the event log back as a history
(broker.state.history).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import orjson

from adapters.fleet import sites_for_hub
from broker.state.audit import audit
from broker.state.connection import translated
from broker.state.history import HistoryReport, check_history
from broker.state.store import Store
from common import topics
from common.config import MqttTarget
from common.errors import StoreUnavailable
from suanwang.servers import MosquittoServer, RedisServer, free_port

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
    procs: dict[str, Proc] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for i in range(self.brokers):
            port = free_port()
            self.procs[f"broker-{i}"] = Proc(f"broker-{i}", [
                "suanwang.cli", "serve", "--redis", self.redis_url, "--mqtt", self.mqtt_url,
                "--http", f"127.0.0.1:{port}", "--namespace", self.namespace, "--site-ttl", str(self.site_ttl_s),
                "--accept-timeout", str(self.accept_timeout_s), "--log-level", "warning", "--auth", "off",
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
    def start(cls, redis_url: str | None, mqtt_url: str | None) -> tuple[Servers, str, str]:
        own = cls()
        if not redis_url:
            own.redis = RedisServer(appendonly=True)
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
        self._turn = 0

    async def submit(self, session: aiohttp.ClientSession, key: str, body: dict[str, Any]) -> Ack | None:
        payload = orjson.dumps(body)
        headers = {"Content-Type": "application/json", "Idempotency-Key": key, "X-Suanwang-Tenant": TENANT}
        deadline, pause = time.monotonic() + self.give_up_s, 0.1
        while time.monotonic() < deadline:
            self._turn += 1
            url = self.urls[self._turn % len(self.urls)]
            try:
                async with session.post(f"{url}/v1/jobs", data=payload, headers=headers) as response:
                    answer = await response.read()
                    if response.status in (200, 202):
                        ack = Ack(orjson.loads(answer)["id"], response.status, time.time())
                        self.acks[key] = ack
                        return ack
                    if response.status < 500:
                        self.refused[key] = f"{response.status} {answer[:300]!r}"
                        return None
                    self.retries[f"http_{response.status}"] += 1
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.retries[type(exc).__name__] += 1
            await asyncio.sleep(pause)
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

    def __init__(self, mqtt_url: str) -> None:
        self.target = MqttTarget.from_url(mqtt_url)
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.reconciles: list[tuple[float, str, list[dict[str, Any]]]] = []
        self.connected = asyncio.Event()

    async def run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client(self.target.host, self.target.port,
                                          identifier=f"wire-{uuid.uuid4().hex[:6]}") as client:  # fmt: skip
                    await client.subscribe(f"{topics.ROOT}/sites/+/events", qos=1)
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
            logged = int(await store.redis.xlen(store.keys.events))
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


@dataclass
class SoakOptions:
    redis_url: str | None = None
    mqtt_url: str | None = None
    seconds: float = 60.0
    rate: float = 20.0
    brokers: int = 2
    sites_per_hub: int = 3
    churn_s: tuple[float, float] = (3.0, 6.0)  # pause between site kills
    down_s: tuple[float, float] = (1.0, 3.0)  # how long a killed site process stays down
    broker_kill: bool = True
    seed: int = 7


def _history_summary(report: HistoryReport | None) -> dict[str, Any] | None:
    """The history check in the soak's report: what was read, and the first violations."""
    if report is None:
        return None
    return {"events": report.events, "jobs": report.jobs, "trimmed": report.trimmed,
            "partial_jobs": report.partial_jobs, "live_jobs": report.live_jobs, "violations": len(report.violations),
            "first_violations": [v.as_dict() for v in report.violations[:20]]}  # fmt: skip


def _summary(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"n": len(values), "p50": round(statistics.median(values), 2), "max": round(max(values), 2)}


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


async def _placement_resumed(store: Store, after_ms: int, timeout: float = 30.0) -> float | None:
    """Seconds from `after_ms` until an allocation is logged after it."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        with contextlib.suppress(StoreUnavailable):
            async with translated():
                entries = await store.redis.xrevrange(store.keys.events, count=200) or []
            for _id, raw in entries:
                fields = raw or {}
                if fields.get(b"type") == b"allocated" and int(fields.get(b"ts", 0)) > after_ms:
                    return round((time.time() * 1000 - after_ms) / 1000, 3)
        await asyncio.sleep(0.05)
    return None


async def _churn(cluster: Cluster, store: Store, options: SoakOptions, rng: random.Random, until: float,
                 faults: Counter[str], recovery: dict[str, list[float]]) -> None:  # fmt: skip
    """Kill a random hub's site process every few seconds and start it again; kill one broker once."""
    checks: list[asyncio.Task[None]] = []
    broker_at = time.monotonic() + (until - time.monotonic()) * 0.4 if options.broker_kill else float("inf")

    async def watch_sites(held: list[tuple[str, int]], sites: set[str]) -> None:
        requeued, replaced = await _site_recovery(store, held, sites)
        if requeued is not None:
            recovery["site_kill_to_requeued_s"].append(requeued)
        if replaced is not None:
            recovery["site_kill_to_replaced_s"].append(replaced)

    async def watch_broker(killed_ms: int) -> None:
        resumed = await _placement_resumed(store, killed_ms)
        if resumed is not None:
            recovery["broker_kill_to_next_placement_s"].append(resumed)

    async def watch_restart(started: float) -> None:
        with contextlib.suppress(TimeoutError):
            await cluster.ready(timeout=30)
            recovery["broker_restart_to_healthy_s"].append(round(time.monotonic() - started, 3))

    while time.monotonic() < until:
        await asyncio.sleep(rng.uniform(*options.churn_s))
        if time.monotonic() >= until:
            break
        if time.monotonic() >= broker_at:
            broker_at = float("inf")
            name = rng.choice(cluster.broker_names)
            killed = cluster.procs[name].kill()
            faults["broker_kill"] += 1
            checks.append(asyncio.create_task(watch_broker(int(killed * 1000))))
            await asyncio.sleep(rng.uniform(*options.down_s))
            cluster.procs[name].start()
            checks.append(asyncio.create_task(watch_restart(time.monotonic())))
            continue
        hub = rng.choice(cluster.hubs)
        sites = set(cluster.sites(hub))
        jobs = [j for s in sites for j in await store.jobs_at(s)]  # just before the kill: what it loses
        held = [(j, int(a or 0)) for j, (a,) in zip(jobs, await store.get_jobs(jobs, "attempt"), strict=True)]
        cluster.procs[f"sim-{hub}"].kill()
        faults["site_process_kill"] += 1
        faults["jobs_held_by_killed_sites"] += len(held)
        if held:
            checks.append(asyncio.create_task(watch_sites(held, sites)))
        await asyncio.sleep(rng.uniform(*options.down_s))
        cluster.procs[f"sim-{hub}"].start()
    await asyncio.gather(*checks)


async def run_soak(options: SoakOptions) -> dict[str, Any]:
    """Sustained submissions with site churn for `options.seconds`, then settle and report."""
    servers, redis_url, mqtt_url = Servers.start(options.redis_url, options.mqtt_url)
    workdir = Path(tempfile.mkdtemp(prefix="suanwang-soak-"))
    cluster = Cluster(redis_url, mqtt_url, workdir, brokers=options.brokers, sites_per_hub=options.sites_per_hub)
    store = Store.from_url(redis_url, cluster.namespace)
    rng = random.Random(options.seed)
    faults: Counter[str] = Counter()
    recovery: dict[str, list[float]] = defaultdict(list)  # seconds, by what recovered after which fault
    try:
        await cluster.start()
        client = Client(cluster.urls)
        bodies = [job_body(rng) for _ in range(int(options.seconds * options.rate))]
        until = time.monotonic() + options.seconds
        await asyncio.gather(client.load(bodies, options.rate),
                             _churn(cluster, store, options, rng, until, faults, recovery))  # fmt: skip
        for proc in cluster.procs.values():
            proc.start()  # anything still down comes back before the system settles
        jobs = list(client.jobs)
        settle_s = await settle(store, jobs, timeout=90.0)
        found = await examine(store, jobs)
    finally:
        await store.close()
        cluster.close()
        servers.cleanup()
    return {
        "seconds": options.seconds, "rate_per_s": options.rate, "brokers": options.brokers,
        "sites": len(cluster.sites()), "jobs_submitted": len(client.acks),
        "jobs_not_acknowledged": len(client.unanswered) + len(client.refused),
        "submit_retries": dict(client.retries),
        "jobs": {s: found.states.get(s, 0) for s in ("completed", "failed", "queued", "assigned", "running")},
        "jobs_placed_more_than_once": found.retried, "failed_reasons": dict(found.failed_reasons),
        "lost_jobs": len(found.lost), "double_allocations": found.double_allocations,
        "audit_violations": found.violations[:20], "unfinished": dict(list(found.unfinished.items())[:20]),
        "history": _history_summary(found.history),
        "faults": dict(faults),
        "recovery": {name: _summary(values) for name, values in recovery.items()},
        "settle_s": round(settle_s, 2),
    }  # fmt: skip
