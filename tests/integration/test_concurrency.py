"""Two broker processes racing for too little capacity: nothing over-allocated, lost or assigned twice.

Both `suanwang serve` replicas share one Redis namespace and one Mosquitto; three hand-driven sites with
20 devices each accept every assignment and never finish, so 300 jobs wanting about 600 devices leave
most of them queued. Once the system is quiet, Redis, the HTTP API and the sites' own records must
agree.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from adapters.site import SiteLink
from broker.state.connection import redis_client
from broker.state.keys import Keys
from common.config import MqttTarget
from common.protocol import Assignment, Assignments
from suanwang.servers import MosquittoServer, RedisClusterGroup, RedisServer, free_port

REPO = Path(__file__).resolve().parents[2]
# on one Redis and on a real three-master Redis Cluster (tests/conftest.py `redis_target`)
pytestmark = pytest.mark.parametrize("redis_kind", ["redis", "cluster"])
MODEL, DEVICES, JOBS = "A100-80G", 20, 300
TENANT = "race"
# each site on a hub of its own, so that on the cluster their keys are on the hubs' shards, apart from the jobs'
PLACES = {"race-1": ("guizhou", "guian"), "race-2": ("neimenggu", "horinger"), "race-3": ("yangtze", "wuhu")}
WAIT = 30.0


class RecordingSite:
    """A site that accepts and starts every assignment and never finishes one, recording what it got."""

    def __init__(self, mqtt: MosquittoServer, site: str) -> None:
        pool = {"arch": "GPU", "model": MODEL, "memory_gb": 80, "total": DEVICES, "in_use_external": 0,
                "per_node": 4, "price_cny_per_hour": 10.0}  # fmt: skip
        hub, cluster = PLACES[site]
        self.link = SiteLink(MqttTarget.from_url(mqtt.url), site, hub, [pool], cluster=cluster,
                             on_assignments=self.on_assignments, interval=2.0)  # fmt: skip
        self.runs: Counter[tuple[str, int]] = Counter()
        self.counts: dict[tuple[str, int], int] = {}
        self.cancelled: set[tuple[str, int]] = set()

    def on_assignments(self, batch: Assignments) -> None:
        for item in batch.assignments:
            self._one(item)

    def _one(self, item: Assignment) -> None:
        key = (item.job, item.attempt)
        if item.action == "cancel":
            self.cancelled.add(key)
            return
        self.runs[key] += 1
        self.counts[key] = item.count
        self.link.emit(item.job, item.attempt, "accepted")
        self.link.emit(item.job, item.attempt, "running")

    def holding(self) -> dict[tuple[str, int], int]:
        """What the site believes it runs: every attempt it was given and not told to cancel."""
        return {key: count for key, count in self.counts.items() if key not in self.cancelled}


@asynccontextmanager
async def recording_sites(mqtt: MosquittoServer) -> AsyncIterator[dict[str, RecordingSite]]:
    sites = {site: RecordingSite(mqtt, site) for site in PLACES}
    tasks = [asyncio.create_task(s.link.run()) for s in sites.values()]
    try:
        async with asyncio.timeout(WAIT):
            for site in sites.values():
                await site.link.connected.wait()
        yield sites
    finally:
        for site in sites.values():
            site.link.stop()
        await asyncio.wait(tasks, timeout=5)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@pytest.fixture
def replicas(redis_target: RedisServer | RedisClusterGroup, own_mosquitto: MosquittoServer, namespace: str,
             tmp_path: Path) -> Iterator[list[str]]:  # fmt: skip
    """Two `suanwang serve` processes on one Redis namespace and one MQTT broker; their base URLs."""
    procs: list[subprocess.Popen[bytes]] = []
    urls: list[str] = []
    try:
        for i in range(2):
            port = free_port()
            with (tmp_path / f"replica-{i}.log").open("wb") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "suanwang.cli", "serve", "--redis", redis_target.url,
                     "--mqtt", own_mosquitto.url, "--http", f"127.0.0.1:{port}", "--namespace", namespace,
                     "--auth", "off", "--log-level", "warning"],
                    cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                ))  # fmt: skip
            urls.append(f"http://127.0.0.1:{port}")
        yield urls
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for i, proc in enumerate(procs):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log_text = (tmp_path / f"replica-{i}.log").read_text(errors="replace")
            if "Traceback" in log_text:
                print(f"--- replica {i} log ---\n{log_text[-4000:]}")


async def healthy(session: aiohttp.ClientSession, url: str) -> None:
    async with asyncio.timeout(WAIT):
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{url}/healthz") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.1)


async def sites_online(session: aiohttp.ClientSession, url: str, sites: list[str]) -> None:
    async with asyncio.timeout(WAIT):
        while True:
            async with session.get(f"{url}/v1/sites") as response:
                listed = {s["id"]: s for s in (await response.json())["sites"]}
            if all(listed.get(s, {}).get("status") == "online" for s in sites):
                return
            await asyncio.sleep(0.1)


async def submit(session: aiohttp.ClientSession, url: str, count: int) -> str:
    body = {"name": f"race-{count}", "resources": {"arch": "GPU", "models": [MODEL], "count": count},
            "origin": "guiyang", "duration_hours": 100}  # fmt: skip
    async with session.post(
        f"{url}/v1/jobs",
        data=orjson.dumps(body),
        headers={"Content-Type": "application/json", "X-Suanwang-Tenant": TENANT},
    ) as response:
        payload = await response.json()
        assert response.status == 202, payload
    return str(payload["id"])


async def quiet(redis: aioredis.Redis, keys: Keys, sites: list[str]) -> None:
    """Wait until every job is queued or held, none awaits acceptance, and the event log stops growing."""
    previous: tuple[int, ...] | None = None
    stable = 0
    async with asyncio.timeout(WAIT):
        while stable < 3:
            pipe = redis.pipeline(transaction=False)
            pipe.zcard(keys.only.queue)
            pipe.zcard(keys.only.assigned)
            pipe.xlen(keys.only.events)
            for site in sites:
                pipe.hlen(keys.hub(PLACES[site][0]).held(site))
            queued, assigned, logged, *held = await pipe.execute()
            snapshot = (queued, assigned, logged, *held)
            settled = queued + sum(held) == JOBS and assigned == 0
            stable = stable + 1 if settled and snapshot == previous else 0
            previous = snapshot
            await asyncio.sleep(0.4)


async def test_two_replicas_never_over_allocate_lose_or_duplicate_jobs(
    replicas: list[str], own_mosquitto: MosquittoServer, redis_target: RedisServer | RedisClusterGroup, namespace: str
) -> None:
    """300 jobs submitted concurrently to two replicas end up placed within capacity or queued, each exactly once."""
    keys = Keys(namespace)
    redis = redis_client(redis_target.url, decode_responses=True)
    try:
        async with aiohttp.ClientSession() as session, recording_sites(own_mosquitto) as sites:
            for url in replicas:
                await healthy(session, url)
            for url in replicas:
                await sites_online(session, url, list(sites))
            counts = [i % 3 + 1 for i in range(JOBS)]
            submitted = await asyncio.gather(*(submit(session, replicas[i % 2], c) for i, c in enumerate(counts)))
            assert len(set(submitted)) == JOBS
            await quiet(redis, keys, list(sites))

            # --- what users see: every job, once, in a state that matches where it is
            jobs: dict[str, dict[str, Any]] = {}
            for url in replicas:
                async with session.get(f"{url}/v1/jobs", params={"limit": "1000"},
                                       headers={"X-Suanwang-Tenant": TENANT}) as response:  # fmt: skip
                    listed = (await response.json())["jobs"]
                assert sorted(j["id"] for j in listed) == sorted(submitted), "jobs lost or duplicated"
                jobs = {j["id"]: j for j in listed}
            states = Counter(j["state"] for j in jobs.values())
            assert set(states) <= {"queued", "assigned", "running"}, states
            assert states["queued"] > 0 and states["running"] > 0, states

            # --- what Redis holds
            queue = set(await redis.zrange(keys.only.queue, 0, -1))
            # each site's ledger: owner -> "attempt model count seq" (no holds in this test: every owner a job)
            ledgers = {site: await redis.hgetall(keys.hub(PLACES[site][0]).held(site)) for site in sites}
            held_at = {site: set(ledger) for site, ledger in ledgers.items()}
            capacity = {site: await redis.hgetall(keys.hub(PLACES[site][0]).capacity(site)) for site in sites}
            placed: Counter[str] = Counter()
            for job_id, job in jobs.items():
                holders = [site for site, held in held_at.items() if job_id in held]
                if job["state"] == "queued":
                    assert job_id in queue and not holders, (job_id, holders)
                    assert job["allocation"] is None
                else:
                    assert job_id not in queue
                    site = job["allocation"]["site"]
                    assert holders == [site], (job_id, site, holders)
                    attempt, model, count, _seq = str(ledgers[site][job_id]).split(" ")
                    assert (int(attempt), model, int(count)) == (job["attempts"], MODEL, job["resources"]["count"])
                    assert job["allocation"]["model"] == MODEL
                    assert job["allocation"]["devices"] == job["resources"]["count"]
                    placed[site] += job["allocation"]["devices"]
            for site, cap in capacity.items():
                total, external, allocated = (int(cap.get(f"{k}:{MODEL}", 0)) for k in ("t", "x", "a"))
                assert allocated <= total - external, (site, cap)
                assert allocated == placed[site], (site, allocated, placed[site])
                # Work-conserving: with 1-device jobs still queued, no device may stay free.
                assert allocated == total - external, (site, cap, states)

            # --- what the sites saw: each (job, attempt) once, on one site, and never more than they have
            duplicates = {site: [k for k, n in s.runs.items() if n > 1] for site, s in sites.items()}
            assert not any(duplicates.values()), duplicates
            owners = Counter(key for s in sites.values() for key in s.runs)
            assert not [k for k, n in owners.items() if n > 1], "one attempt sent to two sites"
            for site, recorder in sites.items():
                holding = recorder.holding()
                assert sum(holding.values()) <= DEVICES, (site, holding)
                expected = {(j, jobs[j]["attempts"]) for j in held_at[site]}
                assert set(holding) == expected, (site, set(holding) ^ expected)
    finally:
        await redis.aclose()
