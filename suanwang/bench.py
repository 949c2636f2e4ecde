"""`suanwang bench`: the real system under load, measured from the outside.

Broker replicas and simulated sites run as their own processes; this process plays the users (HTTP
submitters) and an operator (the SSE stream), so the numbers include every hop a real job takes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import aiohttp
import orjson
from rich.console import Console
from rich.table import Table

from common.errors import SuanwangError
from regions import load_geography
from suanwang.samples import sample_job
from suanwang.servers import MosquittoServer, RedisClusterGroup, RedisServer, free_port


class BenchError(SuanwangError):
    code = "bench"


@dataclass
class BenchOptions:
    redis_url: str | None = None
    mqtt_url: str | None = None
    sites: int = 1000
    jobs: int = 5000
    concurrency: int = 32
    brokers: int = 1
    time_scale: float = 3600.0
    heartbeat_s: float = 10.0
    settle_s: float = 5.0
    seed: int = 11
    rate: float | None = None  # open loop: offer this many jobs a second at a constant pace (None: closed loop)
    batch: int = 0  # jobs per POST /v1/jobs:batch (0: one POST /v1/jobs per job)
    tokens: bool = False  # authentication on: submits with a user token, the stream with an operator's
    durable: int = 0  # durable accept: the brokers wait for this many replicas (of a Redis started here)
    shards: int = 0  # a Redis Cluster of this many masters started here (0: one redis-server)
    job_shards: int = 1  # the brokers' job shards (serve --job-shards)
    tenants: int = 1  # jobs spread round-robin over this many tenants (without --tokens; a token has one)


@dataclass
class _Run:
    submitted_at: dict[str, float] = field(default_factory=dict)
    allocated_at: dict[str, float] = field(default_factory=dict)  # seen on the stream by this client
    committed_ms: dict[str, int] = field(default_factory=dict)  # the allocation's own timestamp
    first_submit: float = 0.0
    last_submit: float = 0.0
    errors: int = 0
    error_statuses: Counter[str] = field(default_factory=Counter)  # HTTP status (or "connection") -> count
    node_cpu_s: dict[str, float] = field(default_factory=dict)  # each Redis node's CPU over the run
    refusals: dict[str, float] = field(default_factory=dict)  # the brokers' refused commits, by reason
    submit_headers: dict[str, str] = field(default_factory=dict)  # Authorization for submits
    operator_headers: dict[str, str] = field(default_factory=dict)  # Authorization for the stream, sites, metrics
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds used by the brokers, sites, Redis, client


def _percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


_LOGS = Path(tempfile.gettempdir()) / "suanwang-bench"


def _spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    """A child process whose output goes to its own log file, so a failed start can say why."""
    _LOGS.mkdir(exist_ok=True)
    path = _LOGS / f"{args[0]}-{uuid.uuid4().hex[:6]}.log"
    with path.open("wb") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen([sys.executable, "-m", *args], env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    _LOG_OF[proc.pid] = path
    return proc


_LOG_OF: dict[int, Path] = {}


def _tail(proc: subprocess.Popen[bytes], lines: int = 8) -> str:
    path = _LOG_OF.get(proc.pid)
    if path is None or not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


async def _wait_healthy(url: str, timeout: float) -> str | None:
    """None once the broker answers /healthz with 200; otherwise what it last said."""
    deadline, last = time.monotonic() + timeout, "no answer"
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(f"{url}/healthz") as response:
                    if response.status == 200:
                        return None
                    last = f"{response.status} {(await response.text())[:200]}"
            except aiohttp.ClientError as exc:
                last = f"{type(exc).__name__}: {exc}"
            await asyncio.sleep(0.2)
    return last


async def _wait_sites(url: str, n: int, timeout: float, headers: dict[str, str] | None = None) -> int:
    deadline = time.monotonic() + timeout
    seen = 0
    async with aiohttp.ClientSession(headers=headers) as session:
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{url}/v1/sites") as response:
                    if response.status == 200:
                        seen = len((await response.json())["sites"])
                        if seen >= n:
                            return seen
            await asyncio.sleep(0.5)
    return seen


async def _listen(url: str, run: _Run, ready: asyncio.Event) -> None:
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    async with (
        aiohttp.ClientSession(timeout=timeout, headers=run.operator_headers) as session,
        session.get(f"{url}/v1/allocations/stream") as response,
    ):
        ready.set()
        async for raw in response.content:
            if raw.startswith(b"data: ") and b'"allocated"' in raw:
                event = orjson.loads(raw[6:])
                if event.get("type") == "allocated" and event["job"] not in run.allocated_at:
                    run.allocated_at[event["job"]] = time.monotonic()
                    run.committed_ms[event["job"]] = event.get("ts", 0)


def _cpu_s(pid: int) -> float:
    """CPU seconds (user and system) a process has used so far; 0 where /proc cannot tell."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _tokens(redis_url: str, namespace: str) -> tuple[dict[str, str], dict[str, str]]:
    """Authorization headers for a user token of tenant `bench` (submits) and an operator token (the
    stream, the sites, the metrics), made in the namespace's token store."""
    from broker.state.connection import redis_client
    from broker.state.keys import Keys
    from broker.state.tokens import Tokens

    client = redis_client(redis_url, max_connections=2)
    try:
        tokens = Tokens(client, Keys(namespace))
        user, _ = await tokens.create("user", "bench", "bench submitter")
        operator, _ = await tokens.create("operator", "bench", "bench operator")
    finally:
        await client.aclose()
    return {"Authorization": f"Bearer {user}"}, {"Authorization": f"Bearer {operator}"}


async def _cpu_now(procs: list[subprocess.Popen[bytes]], options: BenchOptions, redis_url: str,
                   mosquitto: subprocess.Popen[bytes] | None) -> tuple[dict[str, float], dict[str, float]]:  # fmt: skip
    """CPU seconds used so far by the brokers, the simulated sites, Redis (its nodes summed), Mosquitto (when
    started here) and this client; and by each Redis node."""
    nodes = {node: cpu for node, (_commands, _reads, cpu) in (await redis_node_counts(redis_url)).items()}
    return {"mosquitto": _cpu_s(mosquitto.pid) if mosquitto is not None else 0.0,
            "brokers": sum(_cpu_s(p.pid) for p in procs[: options.brokers]),
            "sites": sum(_cpu_s(p.pid) for p in procs[options.brokers :]), "redis": sum(nodes.values()),
            "client": time.process_time()}, nodes  # fmt: skip


async def redis_node_counts(url: str) -> dict[str, tuple[float, float, float]]:
    """(commands processed, socket reads, CPU seconds) of each Redis node so far, by "host:port": one entry for
    one Redis, one per master for a cluster (INFO stats and cpu); empty when it cannot be asked."""
    from redis.asyncio.cluster import RedisCluster

    from broker.state.connection import redis_client

    client = redis_client(url, max_connections=2)
    try:
        if isinstance(client, RedisCluster):
            nodes = RedisCluster.ALL_NODES
            stats = await client.info("stats", target_nodes=nodes)
            cpus = await client.info("cpu", target_nodes=nodes)
            infos = {name: (stats[name], cpus[name]) for name in sorted(stats)}
        else:
            kwargs = client.connection_pool.connection_kwargs
            infos = {f"{kwargs.get('host', '')}:{kwargs.get('port', '')}": (await client.info("stats"),
                                                                           await client.info("cpu"))}  # fmt: skip
        return {name: (float(st.get("total_commands_processed", 0)), float(st.get("total_reads_processed", 0)),
                       float(cpu.get("used_cpu_user", 0)) + float(cpu.get("used_cpu_sys", 0)))
                for name, (st, cpu) in infos.items()}  # fmt: skip
    except Exception:
        return {}
    finally:
        await client.aclose()


# the scheduler's refused commits (allocate.lua's refusals), as opposed to sites giving work back
REFUSALS = ("stale_view", "not_queued", "site_not_online", "tenant_limit")


async def _refusals(urls: list[str], headers: dict[str, str] | None = None) -> dict[str, float]:
    """Refused commits summed over the brokers' /metrics, by reason."""
    found: dict[str, float] = {}
    async with aiohttp.ClientSession(headers=headers) as session:
        for url in urls:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{url}/metrics") as response:
                    text = await response.text()
                for line in text.splitlines():
                    if line.startswith('suanwang_rejections_total{reason="'):
                        reason = line.split('"')[1]
                        if reason in REFUSALS:
                            found[reason] = found.get(reason, 0.0) + float(line.rsplit(" ", 1)[1])
    return found


def _batches(jobs: list[bytes], size: int) -> list[bytes]:
    return [b'{"jobs":[' + b",".join(jobs[i : i + size]) + b"]}" for i in range(0, len(jobs), size)]


async def _post(session: aiohttp.ClientSession, url: str, body: bytes, batch: bool, sent: float, run: _Run) -> None:
    """One submit (or batch submit); records each accepted job with the time it was offered."""
    path = "/v1/jobs:batch" if batch else "/v1/jobs"
    try:
        async with session.post(f"{url}{path}", data=body, headers={"Content-Type": "application/json"}) as response:
            payload = await response.read()
    except aiohttp.ClientError:
        run.errors += 1
        run.error_statuses["connection"] += 1
        return
    if response.status not in (200, 202):
        run.errors += 1
        run.error_statuses[str(response.status)] += 1
        return
    answer = orjson.loads(payload)
    for item in answer["jobs"] if batch else [{"status": response.status, "job": answer}]:
        if item["status"] == 202:
            run.submitted_at[item["job"]["id"]] = sent
        else:
            run.errors += 1
            run.error_statuses[str(item["status"])] += 1


async def _offer(urls: list[str], bodies: list[bytes], run: _Run, rate: float, batch: bool) -> None:
    """Open loop: request i is sent at start + i / rate whatever the answers so far, and its jobs' latency
    counts from that moment (so a slow system cannot hide its queueing by slowing the client)."""
    start = time.monotonic()
    in_flight: set[asyncio.Task[None]] = set()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, headers=run.submit_headers) as session:
        for i, body in enumerate(bodies):
            due = start + i / rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(_post(session, urls[i % len(urls)], body, batch, due, run))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        await asyncio.gather(*in_flight)


async def _submit(urls: list[str], jobs: list[bytes], run: _Run, concurrency: int) -> None:
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)

    async def worker(i: int) -> None:
        url = urls[i % len(urls)]
        async with aiohttp.ClientSession(headers=run.submit_headers) as session:
            while not queue.empty():
                body = queue.get_nowait()
                sent = time.monotonic()
                async with session.post(
                    f"{url}/v1/jobs", data=body, headers={"Content-Type": "application/json"}
                ) as response:
                    payload = await response.read()
                if response.status != 202:
                    run.errors += 1
                    continue
                job_id = orjson.loads(payload)["id"]
                run.submitted_at[job_id] = sent

    await asyncio.gather(*(worker(i) for i in range(concurrency)))


async def _submit_batches(urls: list[str], bodies: list[bytes], run: _Run, concurrency: int) -> None:
    """Closed loop over batch submits: `concurrency` clients, each posting its next batch when answered."""
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)

    async def worker(i: int) -> None:
        async with aiohttp.ClientSession(headers=run.submit_headers) as session:
            while not queue.empty():
                await _post(session, urls[i % len(urls)], queue.get_nowait(), True, time.monotonic(), run)

    await asyncio.gather(*(worker(i) for i in range(min(concurrency, len(bodies)))))


def start_servers(redis_url: str | None, mqtt_url: str | None, own: list[Any], replicas: int = 0,
                  shards: int = 0) -> tuple[str, str]:  # fmt: skip
    """The Redis and MQTT URLs to use: the ones given, or of a redis-server (with `replicas` replicas), or with
    `shards` a Redis Cluster of that many masters, and a Mosquitto started here (appended to `own`, for the
    caller to clean up)."""
    if not redis_url and shards:
        group = RedisClusterGroup(masters=shards)
        own.append(group)
        group.start()
        redis_url = group.url
    if not redis_url:
        server = RedisServer()
        server.start()
        own.append(server)
        for _ in range(replicas):
            replica = RedisServer(replicaof=server.port)
            replica.start()
            own.append(replica)
        server.wait_replicas(replicas)
        redis_url = server.url
    if not mqtt_url:
        mqtt = MosquittoServer()
        mqtt.start()
        own.append(mqtt)
        mqtt_url = mqtt.url
    return redis_url, mqtt_url


async def run_bench(options: BenchOptions) -> dict[str, Any]:
    """Start everything, submit the jobs, wait for placements to settle, and report."""
    own: list[Any] = []
    procs: list[subprocess.Popen[bytes]] = []
    try:
        redis_url, mqtt_url = start_servers(options.redis_url, options.mqtt_url, own, options.durable,
                                            options.shards)  # fmt: skip
        namespace = f"bench{uuid.uuid4().hex[:6]}"
        env = {
            **os.environ,
            "SUANWANG_REDIS_URL": redis_url,
            "SUANWANG_MQTT_URL": mqtt_url,
            "SUANWANG_NAMESPACE": namespace,
            "SUANWANG_DURABLE_ACCEPT": str(options.durable),
            "SUANWANG_JOB_SHARDS": str(options.job_shards),
        }
        run = _Run()
        auth = ["--auth", "off"]
        if options.tokens:  # as deployed: tokens checked, the per-token submit rate raised past the load
            run.submit_headers, run.operator_headers = await _tokens(redis_url, namespace)
            auth = ["--auth", "required", "--submit-rate", "1000000", "--submit-burst", "1000000"]
        urls = []
        for _ in range(options.brokers):
            port = free_port()
            urls.append(f"http://127.0.0.1:{port}")
            procs.append(_spawn(["suanwang.cli", "serve", "--http", f"127.0.0.1:{port}", *auth,
                                "--log-level", "error"], env))  # fmt: skip
        # every broker listens before the sites start: their thousand MQTT connections take ephemeral ports,
        # one of which could otherwise be the port a broker was given but had not bound yet
        for url, proc in zip(urls, procs, strict=True):
            problem = await _wait_healthy(url, 60)
            if problem is not None:
                exited = f"exited with {proc.poll()}" if proc.poll() is not None else "still running"
                raise BenchError(f"the broker at {url} did not come up ({exited}); last answer: {problem}\n"
                                 f"{_tail(proc)}")  # fmt: skip
        hubs = list(load_geography().hubs)
        per_hub = [options.sites // len(hubs) + (1 if i < options.sites % len(hubs) else 0) for i in range(len(hubs))]
        for hub, n in zip(hubs, per_hub, strict=True):
            if n:
                procs.append(
                    _spawn(
                        [
                            "adapters.sim",
                            "--mqtt",
                            mqtt_url,
                            "--hub",
                            hub,
                            "--sites",
                            str(n),
                            "--time-scale",
                            str(options.time_scale),
                            "--interval",
                            str(options.heartbeat_s),
                            "--log-level",
                            "error",
                        ],
                        env,
                    )
                )
        started = time.monotonic()
        sites_seen = await _wait_sites(urls[0], options.sites, 60 + options.sites / 20, run.operator_headers)
        startup_s = time.monotonic() - started
        dead = [p for p in procs if p.poll() is not None]
        if dead or sites_seen < options.sites:
            said = "\n".join(f"{' '.join(map(str, cast(list[str], p.args)[2:4]))} exited with {p.poll()}:\n{_tail(p)}"
                             for p in dead)  # fmt: skip
            raise BenchError(f"the system did not come up: {sites_seen} of {options.sites} sites seen after "
                             f"{startup_s:.0f} s; {said or 'no process exited'} (logs in {_LOGS})")  # fmt: skip
        rng = random.Random(options.seed)
        names = ["bench"] if options.tenants == 1 else [f"bench{i}" for i in range(options.tenants)]
        jobs = [orjson.dumps(sample_job(rng, tenant=names[i % len(names)])) for i in range(options.jobs)]
        ready = asyncio.Event()
        listener = asyncio.create_task(_listen(urls[0], run, ready))
        await asyncio.wait_for(ready.wait(), 10)
        run.committed_ms["__offset__"] = int((time.time() - time.monotonic()) * 1000)
        bodies = _batches(jobs, options.batch) if options.batch else jobs
        mosquitto = next((server.proc for server in own if isinstance(server, MosquittoServer)), None)
        cpu_before, nodes_before = await _cpu_now(procs, options, redis_url, mosquitto)
        run.first_submit = time.monotonic()
        if options.rate:
            # the rate is in jobs a second: a batch of n jobs is one request every n / rate seconds
            await _offer(urls, bodies, run, options.rate / max(options.batch, 1), bool(options.batch))
        elif options.batch:
            await _submit_batches(urls, bodies, run, options.concurrency)
        else:
            await _submit(urls, jobs, run, options.concurrency)
        run.last_submit = time.monotonic()
        # Settle: until every job is placed or nothing new is placed for `settle_s`.
        last_count, last_change = -1, time.monotonic()
        while time.monotonic() - last_change < options.settle_s:
            placed = sum(1 for job in run.submitted_at if job in run.allocated_at)
            if placed == len(run.submitted_at):
                break
            if placed != last_count:
                last_count, last_change = placed, time.monotonic()
            await asyncio.sleep(0.1)
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await listener
        run.refusals = await _refusals(urls, run.operator_headers)
        cpu_after, nodes_after = await _cpu_now(procs, options, redis_url, mosquitto)
        run.cpu_s = {name: spent - cpu_before[name] for name, spent in cpu_after.items()}
        run.node_cpu_s = {node: spent - nodes_before[node] for node, spent in nodes_after.items()
                          if node in nodes_before}  # fmt: skip
        return _report(options, run, sites_seen, startup_s)
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        for server in own:
            server.cleanup()


def _report(options: BenchOptions, run: _Run, sites_seen: int, startup_s: float) -> dict[str, Any]:
    offset_ms = run.committed_ms.pop("__offset__", 0)
    placed = [job for job in run.submitted_at if job in run.allocated_at]
    seen_latency = [(run.allocated_at[j] - run.submitted_at[j]) * 1000 for j in placed]
    commit_latency = [run.committed_ms[j] - (run.submitted_at[j] * 1000 + offset_ms) for j in placed]
    end = max((run.allocated_at[j] for j in placed), default=run.last_submit)
    window = max(end - run.first_submit, 1e-9)
    submit_window = max(run.last_submit - run.first_submit, 1e-9)
    return {
        "sites": options.sites,
        "sites_online": sites_seen,
        "startup_s": round(startup_s, 2),
        "brokers": options.brokers,
        "jobs_submitted": len(run.submitted_at),
        "submit_errors": run.errors,
        "submit_error_statuses": dict(run.error_statuses),
        "jobs_placed": len(placed),
        "jobs_unplaced": len(run.submitted_at) - len(placed),
        "submits_per_s": round(len(run.submitted_at) / submit_window, 1),
        "placements_per_s": round(len(placed) / window, 1),
        "submit_to_allocation_ms": {
            "p50": round(_percentile(commit_latency, 50), 1),
            "p99": round(_percentile(commit_latency, 99), 1),
        },
        "submit_to_stream_ms": {
            "p50": round(_percentile(seen_latency, 50), 1),
            "p99": round(_percentile(seen_latency, 99), 1),
            "p99.9": round(_percentile(seen_latency, 99.9), 1),
        },
        # CPU per placement from the first submit to the end: the cost that decides throughput here
        "cpu_ms_per_placement": {
            name: round(1000 * spent / max(len(placed), 1), 3) for name, spent in run.cpu_s.items()
        },
        # a cluster's share of that by node: how evenly the shards carry it
        "redis_cpu_ms_per_placement_by_node": {
            node: round(1000 * spent / max(len(placed), 1), 3) for node, spent in run.node_cpu_s.items()
        },
        "redis_shards": len(run.node_cpu_s),
        "job_shards": options.job_shards,
        "tenants": options.tenants,
        "refused_commits": int(sum(run.refusals.values())),
        "refused_commits_pct": round(100 * sum(run.refusals.values()) / max(len(placed), 1), 2),
        "refused_by_reason": {k: int(v) for k, v in run.refusals.items()},
        "mode": f"open loop at {options.rate:g} jobs/s" if options.rate else "closed loop",
        "submit": f"batches of {options.batch}" if options.batch else "one job per POST",
        "auth": "tokens" if options.tokens else "off",
        "durable_accept": options.durable,
        "cpu_count": os.cpu_count(),
    }


MATRIX_COLUMNS = ("brokers", "submit", "mode", "jobs_placed", "submits_per_s", "placements_per_s", "p50_ms", "p99_ms",
                  "p99.9_ms", "refused_commits_pct", "submit_errors")  # fmt: skip


async def run_matrix(options: BenchOptions, rate: float) -> dict[str, Any]:
    """The bench at 1 and 2 brokers, single and batch submits, closed loop and open loop at `rate`: one row
    each (submit-to-stream latency), every run on fresh servers."""
    rows = []
    for brokers in (1, 2):
        for batch in (0, options.batch or 500):
            for offered in (None, rate):
                report = await run_bench(dataclasses.replace(options, brokers=brokers, batch=batch, rate=offered))
                latency = report["submit_to_stream_ms"]
                row = {**{k: report[k] for k in MATRIX_COLUMNS if k in report}, "p50_ms": latency["p50"],
                       "p99_ms": latency["p99"], "p99.9_ms": latency["p99.9"]}  # fmt: skip
                rows.append({k: row[k] for k in MATRIX_COLUMNS})
    return {"mode": "matrix", "sites": options.sites, "jobs": options.jobs, "cpu_count": os.cpu_count(),
            "results": rows}  # fmt: skip


def print_report(console: Console, report: dict[str, Any]) -> None:
    if report.get("mode") == "matrix":
        rows = report["results"]
        table = Table(*rows[0].keys(), title=f"suanwang bench --matrix ({report['sites']} sites, {report['jobs']} "
                                             f"jobs a run, {report['cpu_count']} cores)")  # fmt: skip
        for row in rows:
            table.add_row(*(str(v) for v in row.values()))
        console.print(table)
        return
    if report.get("mode") == "memory":
        table = Table("measure", "value", title=f"suanwang bench --memory ({report['sites']:,} sites, "
                                                f"{report['queued_loaded']:,} queued)")  # fmt: skip
        for key, value in report.items():
            if key == "broker_rss_timeline":  # [s, MB, jobs looked at] every 5 s: the ends here, all in --json
                value = f"{value[0]} .. {value[-1]} ({len(value)} samples)" if value else "-"
            table.add_row(key, ", ".join(map(str, value)) if isinstance(value, list) else str(value))
        console.print(table)
        return
    if report.get("mode") == "ingest":
        from suanwang.bench_ingest import ingest_table

        console.print(ingest_table(report))
        return
    if report.get("mode") == "matching":
        rows = report["results"]
        table = Table(*rows[0].keys(), title="suanwang bench --matching (microseconds per decision)")
        for row in rows:
            table.add_row(*(str(v) for v in row.values()))
        console.print(table)
        return
    table = Table("measure", "value", title="suanwang bench")
    for key, value in report.items():
        if isinstance(value, dict):
            value = "  ".join(f"{k} {v}" for k, v in value.items())
        table.add_row(key, str(value))
    console.print(table)
