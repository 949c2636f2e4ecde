"""`suanwang bench --memory SITES,QUEUED`: what a broker replica and Redis hold for a network of SITES sites
with QUEUED jobs waiting, for operators sizing a deployment.

Redis is filled through the store's own write paths (the capacity script for sites, `submit_many` for
jobs), with every pool fully in use so that no job can be placed and the queue stays as loaded. Then a
real broker process starts on it and is measured once it is ready: every site in its snapshot, and every
queued job looked at by its scheduler (each job found unplaceable is parked, so a parked count equal to
the queue means every job has been through a pass), or `ready_timeout_s` after its start, whichever comes
first; the report says how many jobs it had looked at, and how its RSS grew with them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import statistics
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import aiohttp

from adapters.fleet import all_sites
from broker.http.jobs import new_job_id
from broker.model.job import JobSpec
from broker.state.store import Store, Submission
from common.protocol import Capacity
from regions import load_geography
from suanwang.bench import _LOGS, BenchError, _spawn, _tail, _wait_healthy, start_servers
from suanwang.samples import sample_job
from suanwang.servers import MosquittoServer, RedisServer, free_port

MB = 1024 * 1024
SPEC_POOL = 4096  # distinct sample jobs, cycled over the queue (each job still has its own record)
SITE_WINDOW = 512  # capacity messages in flight at once while loading sites
JOB_CHUNK = 2000  # jobs per pipelined submit_many
JOBS_IN_FLIGHT = 3  # chunks being built or executed at once, so Python and Redis overlap


@dataclass
class MemoryOptions:
    sites: int
    queued: int
    redis_url: str | None = None
    mqtt_url: str | None = None
    tenants: int = 8
    seed: int = 7
    samples: int = 3  # RSS samples once ready, one a second
    # how long the broker has, from its start, to look at every queued job; past it the broker is measured as
    # it is (at 100,000 full sites a pass looks at 512 jobs in about 20 s, so 1,000,000 would take hours)
    ready_timeout_s: float = 240.0


def _capacities(n: int, seed: int) -> list[Capacity]:
    """`n` sites of the simulated fleet, each pool reported fully in use outside the broker: nothing fits."""
    per_hub = -(-n // len(load_geography().hubs))
    out = []
    for site in all_sites(per_hub, seed)[:n]:
        pools = [{**pool, "in_use_external": pool["total"]} for pool in site.pools]  # validation copies them
        out.append(Capacity.model_validate({"schema": "suanwang.capacity/1", "site": site.id, "hub": site.hub,
                                            "cluster": site.cluster, "seq": 1, "pools": pools,
                                            "energy": dict(site.energy), "boot": "bench-memory"}))  # fmt: skip
    if len(out) < n:
        raise BenchError(f"the simulated fleet gave {len(out)} sites, not {n}")
    return out


async def load_sites(store: Store, capacities: list[Capacity]) -> float:
    """Apply every site's capacity message as ingest does (the capacity script), `SITE_WINDOW` in flight at
    once over the store's connection pool; returns the seconds it took."""
    started = time.perf_counter()
    for i in range(0, len(capacities), SITE_WINDOW):
        await asyncio.gather(*(store.apply_capacity(cap) for cap in capacities[i : i + SITE_WINDOW]))
    return time.perf_counter() - started


def _specs(tenants: int, seed: int) -> list[JobSpec]:
    rng = random.Random(seed)
    return [JobSpec.model_validate(sample_job(rng, tenant=f"mem-t{i % tenants}")) for i in range(SPEC_POOL)]


def _submissions(specs: list[JobSpec], queued: int) -> Iterator[list[Submission]]:
    for start in range(0, queued, JOB_CHUNK):
        yield [Submission(new_job_id(), specs[i % len(specs)]) for i in range(start, min(start + JOB_CHUNK, queued))]


async def load_jobs(store: Store, queued: int, tenants: int, seed: int) -> tuple[float, int]:
    """Submit `queued` sample jobs with `Store.submit_many`, `JOB_CHUNK` a pipeline and `JOBS_IN_FLIGHT`
    pipelines at once; returns (seconds, jobs created)."""
    specs = _specs(tenants, seed)
    chunks = _submissions(specs, queued)
    created = 0
    started = time.perf_counter()

    async def worker() -> None:
        nonlocal created
        for chunk in chunks:  # one shared iterator: each chunk is taken by one worker
            outcomes = await store.submit_many(chunk)
            bad = [o for o in outcomes if isinstance(o, Exception)]
            if bad:
                raise BenchError(f"{len(bad)} of {len(chunk)} submissions failed, first: {bad[0]}")
            created += len(outcomes)

    await asyncio.gather(*(worker() for _ in range(JOBS_IN_FLIGHT)))
    return time.perf_counter() - started, created


async def _redis_memory(store: Store) -> dict[str, int]:
    info = await store.redis.info("memory")
    return {"used": int(info["used_memory"]), "peak": int(info["used_memory_peak"]),
            "rss": int(info["used_memory_rss"]), "keys": int(await store.redis.dbsize())}  # fmt: skip


async def _queue_state(store: Store, tenants: int) -> tuple[int, int]:
    """(jobs in the queue, jobs parked by the scheduler as unplaceable), read in one round trip."""
    k = store.keys
    pipe = store.redis.pipeline(transaction=False)
    for i in range(tenants):
        pipe.zcard(k.for_tenant(f"mem-t{i}").tenant_parked(f"mem-t{i}"))
    parked = await pipe.execute()
    return await store.queue_length(), sum(int(n) for n in parked)


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise BenchError(f"no {field} in /proc/{pid}/status")


def process_memory(pid: int) -> tuple[int, int]:
    """(resident bytes now, peak resident bytes) of a process: psutil when installed, else /proc; the peak
    (VmHWM) is only in /proc."""
    try:
        import psutil
    except ImportError:
        rss = _status_kb(pid, "VmRSS") * 1024
    else:
        rss = int(psutil.Process(pid).memory_info().rss)
    return rss, _status_kb(pid, "VmHWM") * 1024


async def _snapshot_devices(session: aiohttp.ClientSession, url: str) -> float:
    """Devices in the broker's snapshot, from the capacity gauges `/metrics` computes from it."""
    async with session.get(f"{url}/metrics") as response:
        if response.status != 200:
            return -1.0
        body = await response.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
               if line.startswith("suanwang_capacity_devices{") and 'kind="total"' in line)  # fmt: skip


@dataclass
class _Ready:
    healthy_s: float = -1.0
    sites_s: float = -1.0  # every site in the snapshot
    first_pass_s: float = -1.0  # the first jobs parked
    queue_s: float = -1.0  # every queued job parked (-1: not within the time allowed)
    end_s: float = 0.0  # when the wait ended
    parked: int = 0


async def _wait_ready(url: str, proc: subprocess.Popen[bytes], store: Store, options: MemoryOptions,
                      devices: int, timeline: list[list[float]]) -> _Ready:  # fmt: skip
    """Wait until the broker answers, holds every site in its snapshot and has parked every queued job (or
    `ready_timeout_s` has passed), sampling its RSS every few seconds into `timeline` as
    [seconds, MB, jobs parked]."""
    started = time.monotonic()
    ready = _Ready()
    problem = await _wait_healthy(url, 120)
    if problem is not None:
        raise BenchError(f"the broker did not come up (exit {proc.poll()}): {problem}\n{_tail(proc)}")
    ready.healthy_s = time.monotonic() - started
    deadline = started + options.ready_timeout_s
    last_sample = -10.0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        while True:
            if proc.poll() is not None:
                raise BenchError(f"the broker exited with {proc.returncode}:\n{_tail(proc)}")
            if ready.sites_s < 0 and await _snapshot_devices(session, url) >= devices:
                ready.sites_s = time.monotonic() - started
            _, ready.parked = await _queue_state(store, options.tenants)
            now = time.monotonic() - started
            if ready.first_pass_s < 0 and ready.parked:
                ready.first_pass_s = now
            if now - last_sample >= 5:
                timeline.append([round(now, 1), round(process_memory(proc.pid)[0] / MB, 1), ready.parked])
                last_sample = now
            ready.end_s = now
            done = ready.sites_s >= 0 and ready.parked >= options.queued
            if done or time.monotonic() >= deadline:
                if ready.sites_s < 0 or not ready.parked:
                    raise BenchError(f"the broker was not serving after {options.ready_timeout_s:.0f} s: snapshot "
                                     f"loaded at {ready.sites_s:.1f} s (-1: not yet), {ready.parked} jobs parked")
                ready.queue_s = now if done else -1.0
                timeline.append([round(now, 1), round(process_memory(proc.pid)[0] / MB, 1), ready.parked])
                return ready
            await asyncio.sleep(0.5)


async def _clear_namespace(store: Store) -> None:
    """Remove every key of the namespace (on a Redis this run did not start)."""
    batch: list[bytes] = []
    async for key in store.redis.scan_iter(match=store.keys.prefix + ":*", count=10_000):
        batch.append(key)
        if len(batch) >= 10_000:
            await store.redis.unlink(*batch)
            batch.clear()
    if batch:
        await store.redis.unlink(*batch)


async def run_memory(options: MemoryOptions) -> dict[str, Any]:
    """Load Redis, start a broker on it, wait until it is ready, and report its memory and Redis's."""
    own: list[RedisServer | MosquittoServer] = []
    proc: subprocess.Popen[bytes] | None = None
    store: Store | None = None
    try:
        redis_url, mqtt_url = start_servers(options.redis_url, options.mqtt_url, cast(list[Any], own))
        namespace = f"mem{uuid.uuid4().hex[:6]}"
        store = Store.from_url(redis_url, namespace)
        redis = {"base": await _redis_memory(store)}
        capacities = _capacities(options.sites, options.seed)
        devices = sum(pool.total for cap in capacities for pool in cap.pools)
        sites_s = await load_sites(store, capacities)
        del capacities
        redis["sites"] = await _redis_memory(store)
        jobs_s, created = await load_jobs(store, options.queued, options.tenants, options.seed)
        redis["jobs"] = await _redis_memory(store)
        queued, _ = await _queue_state(store, options.tenants)
        if queued != options.queued:
            raise BenchError(f"Redis holds {queued} queued jobs after loading {options.queued}")

        env = {**os.environ, "SUANWANG_REDIS_URL": redis_url, "SUANWANG_MQTT_URL": mqtt_url,
               "SUANWANG_NAMESPACE": namespace,
               # no adapter heartbeats here: sites must not turn stale (and be swept) while measured
               "SUANWANG_SITE_TTL": "86400"}  # fmt: skip
        port = free_port()
        timeline: list[list[float]] = []
        proc = _spawn(["suanwang.cli", "serve", "--http", f"127.0.0.1:{port}", "--auth", "off", "--log-level",
                       "error"], env)  # fmt: skip
        ready = await _wait_ready(f"http://127.0.0.1:{port}", proc, store, options, devices, timeline)
        rss = []
        for i in range(options.samples):
            if i:
                await asyncio.sleep(1.0)
            rss.append(process_memory(proc.pid)[0])
        peak = process_memory(proc.pid)[1]
        redis["final"] = await _redis_memory(store)
        queued, parked = await _queue_state(store, options.tenants)
        if options.redis_url:  # a Redis this run did not start keeps nothing of it
            await _clear_namespace(store)
        return _report(options, created, sites_s, jobs_s, ready, rss, peak, redis, queued, parked, timeline)
    finally:
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if store is not None:
            await store.close()
        for server in own:
            server.cleanup()


async def measure(sites: int, queued: int, redis_url: str | None = None, **options: Any) -> dict[str, Any]:
    """The memory report for `sites` sites and `queued` waiting jobs (a private redis-server when no URL)."""
    return await run_memory(MemoryOptions(sites, queued, redis_url, **options))


def _per_job_looked_at(timeline: list[list[float]]) -> float | None:
    """The broker's RSS growth per job its scheduler has looked at (bytes), from the first sample after its
    first pass to the last; None when too few jobs were looked at for the slope to rise above the noise."""
    seen = [point for point in timeline if point[2] > 0]
    if len(seen) < 2 or seen[-1][2] - seen[0][2] < 10_000:
        return None
    return (seen[-1][1] - seen[0][1]) * MB / (seen[-1][2] - seen[0][2])


def _report(options: MemoryOptions, created: int, sites_s: float, jobs_s: float, ready: _Ready, rss: list[int],
            peak: int, redis: dict[str, dict[str, int]], queued: int, parked: int, timeline: list[list[float]]
            ) -> dict[str, Any]:  # fmt: skip
    site_bytes = redis["sites"]["used"] - redis["base"]["used"]
    job_bytes = redis["jobs"]["used"] - redis["sites"]["used"]
    final = redis["final"]
    looking_s = ready.end_s - max(ready.first_pass_s, 0.0)
    per_job = _per_job_looked_at(timeline)
    return {
        "mode": "memory",
        "sites": options.sites,
        "queued_loaded": created,
        "queued_in_redis": queued,  # after the measurement: nothing was placed
        "tenants": options.tenants,
        "load_sites_s": round(sites_s, 2),
        "load_sites_per_s": round(options.sites / max(sites_s, 1e-9)),
        "load_jobs_s": round(jobs_s, 2),
        "load_jobs_per_s": round(created / max(jobs_s, 1e-9)),
        "broker_healthy_s": round(ready.healthy_s, 2),
        "broker_snapshot_loaded_s": round(ready.sites_s, 2),
        "broker_first_pass_s": round(ready.first_pass_s, 2),
        "broker_ready_s": round(ready.queue_s, 2),  # every queued job looked at; -1: not within ready_timeout_s
        "jobs_looked_at": parked,  # parked as unplaceable by the broker's passes
        "looked_at_per_s": round(parked / max(looking_s, 1e-9), 1),
        "broker_rss_mb": round(statistics.median(rss) / MB, 1),
        "broker_rss_samples_mb": [round(r / MB, 1) for r in rss],
        "broker_peak_rss_mb": round(peak / MB, 1),
        "broker_bytes_per_job_looked_at": None if per_job is None else round(per_job),
        "redis_used_memory_mb": round(final["used"] / MB, 1),
        "redis_used_memory_after_load_mb": round(redis["jobs"]["used"] / MB, 1),
        "redis_used_memory_peak_mb": round(final["peak"] / MB, 1),
        "redis_rss_mb": round(final["rss"] / MB, 1),
        "redis_keys": final["keys"],
        "redis_bytes_per_site": round(site_bytes / max(options.sites, 1)),
        "redis_bytes_per_queued_job": round(job_bytes / max(created, 1)),
        "broker_rss_timeline": timeline,  # [seconds since the broker started, MB, jobs looked at], every 5 s
        "cpu_count": os.cpu_count(),
        "logs": str(_LOGS),
    }
