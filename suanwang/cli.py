"""The `suanwang` command line (click: nested commands, env-var backed options, help for free)."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import click
import orjson
from rich.console import Console

from adapters.commands import register as _register_adapters
from common import logs
from common.config import AUTH_MODES, DEFAULT_MQTT, DEFAULT_REDIS, MqttTarget, Settings
from common.errors import SuanwangError
from suanwang.holds_cli import register as _register_holds
from suanwang.options import http_option, json_option, redis_option, tenant_option, token_option
from suanwang.quote_cli import register as _register_quote
from suanwang.reliability_cli import register as _register_reliability
from suanwang.security_cli import register as _register_security

console = Console()

mqtt_option = click.option("--mqtt", "mqtt_url", envvar="SUANWANG_MQTT_URL", show_envvar=True,
                           help=f"MQTT URL, mqtt://user:pass@host:port [default: {DEFAULT_MQTT}]")  # fmt: skip
log_option = click.option("--log-level", default="info", show_default=True,
                          type=click.Choice(["debug", "info", "warning", "error"]))  # fmt: skip


def _loop_factory() -> Any:
    """The event loop `SUANWANG_EVENT_LOOP` names: asyncio's own (the default) or uvloop."""
    name = os.environ.get("SUANWANG_EVENT_LOOP", "asyncio").strip().lower() or "asyncio"
    if name == "asyncio":
        return None
    if name != "uvloop":
        raise click.BadParameter(f"SUANWANG_EVENT_LOOP must be asyncio or uvloop, got {name!r}")
    try:
        import uvloop
    except ImportError:
        raise click.UsageError("SUANWANG_EVENT_LOOP=uvloop needs uvloop: pip install 'suanwang[uvloop]'") from None
    return uvloop.new_event_loop


def _run(coro: Any) -> Any:
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(coro)
    except KeyboardInterrupt:
        return None
    except SuanwangError as exc:
        console.print(f"[red]error:[/] {exc}", highlight=False)
        sys.exit(1)


def _run_settings(make: Any) -> Settings:
    try:
        return make()  # type: ignore[no-any-return]
    except SuanwangError as exc:
        raise click.UsageError(str(exc)) from None


def _print_json(value: Any) -> None:
    sys.stdout.buffer.write(orjson.dumps(value, option=orjson.OPT_INDENT_2) + b"\n")


@click.group()
@click.version_option(package_name="suanwang")
def main() -> None:
    """Suanwang (算网): a national compute-network broker."""


@main.command()
@redis_option
@mqtt_option
@http_option
@click.option("--namespace", envvar="SUANWANG_NAMESPACE", default="sw", show_default=True,
              help="Redis key namespace (one deployment per namespace)")  # fmt: skip
@click.option("--share-group", envvar="SUANWANG_SHARE_GROUP", default="suanwang", show_default=True,
              help="MQTT $share group for site events; empty for brokers without shared subscriptions")  # fmt: skip
@click.option(
    "--site-ttl",
    type=float,
    default=None,
    help="Seconds without a heartbeat before a site's work returns to the queue [env SUANWANG_SITE_TTL; 30]",
)
@click.option(
    "--accept-timeout",
    type=float,
    default=None,
    help="Seconds a site has to accept an assignment [env SUANWANG_ACCEPT_TIMEOUT; 30]",
)
@click.option(
    "--auth",
    type=click.Choice(AUTH_MODES),
    default=None,
    help="API tokens required, or off (every caller an admin) [env SUANWANG_AUTH; required]",
)
@click.option(
    "--require-registered/--allow-unregistered",
    "require_registered",
    default=None,
    help="Drop MQTT messages from sites not in the registry [env SUANWANG_REQUIRE_REGISTERED; off]",
)
@click.option("--tls-cert", default=None, help="HTTPS certificate chain, PEM [env SUANWANG_TLS_CERT]")
@click.option("--tls-key", default=None, help="HTTPS private key, PEM [env SUANWANG_TLS_KEY]")
@click.option("--submit-rate", type=float, default=None, help="Submissions per second per token [20]")
@click.option("--submit-burst", type=int, default=None, help="Submissions a token may make at once [100]")
@click.option("--max-queued-per-tenant", type=int, default=None, help="Most queued jobs per tenant [10000]")
@click.option("--durable-accept", type=click.IntRange(min=0), default=None,
              help="Accept a job only once this many Redis replicas have it (WAIT) [env SUANWANG_DURABLE_ACCEPT; 0]")
@click.option("--job-shards", type=click.IntRange(min=1), default=None,
              help="Job shards of a new deployment, fixed from its first start: tenants' jobs spread over that many "
                   "hash tags (Redis Cluster) [env SUANWANG_JOB_SHARDS; as recorded, else 1]")
@log_option
def serve(redis_url: str | None, mqtt_url: str | None, http: str, namespace: str, share_group: str,
          site_ttl: float | None, accept_timeout: float | None, auth: str | None, require_registered: bool | None,
          tls_cert: str | None, tls_key: str | None, submit_rate: float | None, submit_burst: int | None,
          max_queued_per_tenant: int | None, durable_accept: int | None, job_shards: int | None,
          log_level: str) -> None:  # fmt: skip
    """Run one broker replica: HTTP API, MQTT ingest and the matcher."""
    from broker.service import serve as serve_broker

    logs.configure(log_level)
    settings = _run_settings(lambda: Settings.from_env(
        redis_url=redis_url, mqtt_url=mqtt_url, http=http, namespace=namespace, share_group=share_group,
        site_ttl_s=site_ttl, accept_timeout_s=accept_timeout, auth=auth, require_registered=require_registered,
        tls_cert=tls_cert, tls_key=tls_key, submit_rate=submit_rate, submit_burst=submit_burst,
        max_queued_per_tenant=max_queued_per_tenant, durable_accept=durable_accept,
        job_shards=job_shards))  # fmt: skip
    _run(serve_broker(settings))


@main.command()
@redis_option
@mqtt_option
@http_option
@click.option("--sites-per-hub", type=int, default=None, help="Simulated sites per hub [default: the seeded fleet]")
@click.option("--time-scale", type=float, default=1800.0, show_default=True, help="Simulated seconds per second")
@click.option("--rate", type=float, default=2.0, show_default=True, help="Sample jobs submitted per second")
@click.option("--duration", type=float, default=None, help="Stop after this many seconds")
@click.option("--quiet", is_flag=True, help="Do not print the live view")
@click.option("--tour/--no-tour", default=True, show_default=True,
              help="First show data gravity, a hold, a preemption and a failing site sinking in the ranking")
@json_option
def demo(redis_url: str | None, mqtt_url: str | None, http: str, sites_per_hub: int | None, time_scale: float,
         rate: float, duration: float | None, quiet: bool, tour: bool, as_json: bool) -> None:  # fmt: skip
    """The whole system on one machine: broker, simulated sites in all 8 hubs, sample jobs, live view."""
    from suanwang.demo import DemoOptions, run_demo

    logs.configure("error")
    options = DemoOptions(redis_url, mqtt_url, http, sites_per_hub, time_scale, rate, duration, quiet=quiet, tour=tour)
    summary = _run(run_demo(options, console))
    if as_json and summary is not None:
        _print_json(summary)


@main.group()
def adapter() -> None:
    """Site adapters: publish a site's capacity and run its assignments."""


@adapter.command("sim")
@mqtt_option
@click.option("--hub", required=True, help="Hub id, e.g. guizhou (see GET /v1/hubs)")
@click.option("--sites", type=int, default=None, help="Number of sites [default: the hub's seeded sites]")
@click.option("--time-scale", type=float, default=3600.0, show_default=True, help="Simulated seconds per second")
@click.option("--interval", type=float, default=5.0, show_default=True, help="Capacity heartbeat, seconds")
@click.option("--fail-rate", type=float, default=0.0, show_default=True, help="Share of jobs that fail")
@click.option("--seed", type=int, default=0, show_default=True)
@log_option
def adapter_sim(mqtt_url: str | None, hub: str, sites: int | None, time_scale: float, interval: float,
                fail_rate: float, seed: int, log_level: str) -> None:  # fmt: skip
    """Simulated sites of one hub."""
    from adapters.sim import run_sim
    from regions import load_geography

    if hub not in load_geography().hubs:
        raise click.BadParameter(f"unknown hub; one of {', '.join(load_geography().hubs)}", param_hint="--hub")
    logs.configure(log_level)
    target = MqttTarget.from_url(mqtt_url or DEFAULT_MQTT)
    _run(run_sim(target, hub, sites, time_scale=time_scale, interval=interval, fail_rate=fail_rate, seed=seed))


_register_adapters(adapter)


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, allow_dash=True))
@http_option
@token_option
@tenant_option
@click.option("--hold", "hold_id", default=None, help="Place it on this hold (suanwang hold take), at its price")
@json_option
def submit(file: str, http: str, token: str | None, tenant: str | None, hold_id: str | None, as_json: bool) -> None:
    """Submit the job in FILE.json (- for standard input)."""
    from suanwang.client import call

    body = sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()
    if hold_id is not None:
        try:
            spec = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise click.UsageError(f"{file} is not JSON: {exc}") from None
        if not isinstance(spec, dict):
            raise click.UsageError(f"{file} must hold a JSON object")
        body = orjson.dumps({**spec, "hold": hold_id})
    job = _run(call(http, "POST", "/v1/jobs", body, tenant=tenant, token=token))
    if as_json:
        _print_json(job)
    else:
        console.print(f"submitted [bold]{job['id']}[/] ({job['state']}); follow it with: suanwang jobs")


@main.command()
@http_option
@click.option("--state", default=None, help="Only jobs in this state")
@click.option("--limit", type=int, default=50, show_default=True)
@tenant_option
@token_option
@json_option
def jobs(http: str, state: str | None, limit: int, tenant: str | None, token: str | None, as_json: bool) -> None:
    """List your jobs, newest first."""
    from suanwang.client import call
    from suanwang.view import jobs_table

    params = {"limit": str(limit), **({"state": state} if state else {})}
    result = _run(call(http, "GET", "/v1/jobs", params=params, tenant=tenant, token=token))
    _print_json(result) if as_json else console.print(jobs_table(result["jobs"]))


@main.command()
@http_option
@click.option("--hub", default=None, help="Only sites of this hub")
@token_option
@json_option
def sites(http: str, hub: str | None, token: str | None, as_json: bool) -> None:
    """List sites with their pools and capacity."""
    from suanwang.client import call
    from suanwang.view import sites_table

    result = _run(call(http, "GET", "/v1/sites", params={"hub": hub} if hub else None, token=token))
    _print_json(result) if as_json else console.print(sites_table(result["sites"]))


@main.command()
@http_option
@click.option("--from", "last_event_id", default=None, help="Resume after this event id")
@click.option("--plain", is_flag=True, help="One line per event instead of the full-screen view")
@token_option
@json_option
def watch(http: str, last_event_id: str | None, plain: bool, token: str | None, as_json: bool) -> None:
    """Follow the network live: a full-screen view in a terminal (hub utilization, queue, allocations),
    one line per event with --plain or when piped, JSON lines with --json."""
    from suanwang.client import follow
    from suanwang.view import event_line

    if not (as_json or plain or last_event_id) and sys.stdout.isatty():
        from suanwang.watch_view import WatchView

        _run(WatchView(http, token).run())
        return

    async def _watch() -> None:
        async for event in follow(http, last_event_id, token=token):
            if as_json:
                sys.stdout.buffer.write(orjson.dumps(event) + b"\n")
                sys.stdout.flush()
            else:
                console.print(event_line(event), highlight=False)

    _run(_watch())


@main.command()
@redis_option
@click.option("--namespace", envvar="SUANWANG_NAMESPACE", default="sw", show_default=True)
@click.option("--history", "with_history", is_flag=True, help="Also check every job's history in the event log")
@json_option
def audit(redis_url: str | None, namespace: str, with_history: bool, as_json: bool) -> None:
    """Check the invariants of the live state in Redis (and with --history the event log); exits 1 if any is
    violated."""
    from broker.state.audit import Report, audit_report
    from broker.state.history import HistoryReport, check_history
    from broker.state.store import Store

    async def _audit() -> tuple[Report, HistoryReport | None]:
        store = Store.from_url(redis_url or DEFAULT_REDIS, namespace)
        try:
            await store.use_layout()
            return await audit_report(store), await check_history(store) if with_history else None
        finally:
            await store.close()

    report, history = _run(_audit())
    violations = report.violations  # warnings (a site that shrank below its allocation) do not fail the audit
    failed = bool(violations) or (history is not None and not history.ok)
    if as_json:
        _print_json({"violations": [v.as_dict() for v in violations],
                     "warnings": [w.as_dict() for w in report.warnings],
                     **({"history": history.as_dict()} if history is not None else {})})  # fmt: skip
        sys.exit(1 if failed else 0)
    for v in violations:
        console.print(f"[red]{v.kind}[/] {v.subject}: {v.detail}", highlight=False)
    for w in report.warnings:
        console.print(f"[yellow]{w.kind}[/] {w.subject}: {w.detail}", highlight=False)
    if history is not None:
        from rich.table import Table

        trimmed = {True: "trimmed", False: "never trimmed", None: "trimming unknown"}[history.trimmed]
        console.print(f"history: {history.events} events ({trimmed}), {history.jobs} jobs, {history.partial_jobs} "
                      f"whose start is no longer in the log, {history.live_jobs} live", highlight=False)  # fmt: skip
        if history.violations:
            table = Table("job", "kind", "detail", title="history violations")
            for hv in history.violations:
                table.add_row(hv.job, f"[red]{hv.kind}[/]", hv.detail)
            console.print(table)
    if not failed:
        console.print("[green]no violations[/]")
    sys.exit(1 if failed else 0)


@main.group()
def tenant() -> None:
    """Tenants: limits on what each may hold."""


@tenant.command("limit")
@click.argument("name")
@click.option("--devices", type=int, default=None, help="Most devices the tenant may hold at once; omit to lift")
@redis_option
@click.option("--namespace", envvar="SUANWANG_NAMESPACE", default="sw", show_default=True)
def tenant_limit(name: str, devices: int | None, redis_url: str | None, namespace: str) -> None:
    """Set (or lift) a tenant's limit on devices held at once."""
    from broker.state.store import Store

    async def _set() -> None:
        store = Store.from_url(redis_url or DEFAULT_REDIS, namespace)
        try:
            await store.use_layout()
            await store.set_tenant_limit(name, devices)
        finally:
            await store.close()

    _run(_set())
    console.print(f"tenant {name}: " + (f"at most {devices} devices" if devices is not None else "no limit"))


@main.command()
@redis_option
@mqtt_option
@click.option("--sites", type=int, default=1000, show_default=True, help="Simulated sites in all")
@click.option("--jobs", "n_jobs", type=int, default=5000, show_default=True, help="Jobs to submit")
@click.option("--concurrency", type=int, default=32, show_default=True, help="Parallel HTTP submitters")
@click.option("--brokers", type=int, default=1, show_default=True, help="Broker replicas (processes)")
@click.option(
    "--matching",
    "matching_sizes",
    default=None,
    metavar="N,N,...",
    help="Matching only, no I/O: time per decision at these site counts, e.g. 1000,10000,100000",
)
@click.option("--memory", "memory_sizes", default=None, metavar="SITES,QUEUED",
              help="Memory: a broker's RSS and Redis's used_memory with SITES sites and QUEUED waiting jobs loaded "
                   "(none placeable), e.g. 100000,1000000")  # fmt: skip
@click.option("--ingest", "ingest_updates", type=click.IntRange(min=1), default=None, metavar="N",
              help="Ingest: N capacity messages from --sites sites through the broker's validation into Redis, "
                   "one at a time, through the MQTT link's queue, and through a real Mosquitto: updates/s, "
                   "latency and Redis round trips per update")  # fmt: skip
@click.option("--soak", "soak_s", type=float, default=None, metavar="SECONDS",
              help="Soak: 20 jobs/s for SECONDS (at least 2 brokers) with site churn and kills of a broker and "
                   "of its own redis-server and Mosquitto, then report lost jobs, double allocations, history "
                   "violations and recovery times (JSON); exit code 1 on any problem")  # fmt: skip
@click.option("--rate", type=click.FloatRange(min=0.1), default=None, metavar="JOBS_PER_S",
              help="Open loop: offer jobs at this constant rate and report latency percentiles from each job's "
                   "due time (default: closed loop, as fast as answers come)")  # fmt: skip
@click.option("--batch", type=click.IntRange(0, 1000), default=0, metavar="N",
              help="Submit N jobs per POST /v1/jobs:batch (default 0: one POST /v1/jobs per job)")
@click.option("--tokens", is_flag=True, help="Authentication on, as deployed: a user token submits, an operator's "
              "token reads the stream (per-token submit rate raised past the load)")
@click.option("--durable-accept", "durable", type=click.IntRange(min=0), default=0, metavar="N",
              help="Durable accept: start N replicas of the benchmark's own Redis and accept a job only once N "
                   "have it (as `serve --durable-accept N`)")  # fmt: skip
@click.option("--shards", type=click.IntRange(min=0), default=0, metavar="N",
              help="Run on a Redis Cluster of N masters (at least 3) started here instead of one redis-server, "
                   "and report Redis's CPU by node (the placement and --ingest benches)")  # fmt: skip
@click.option("--job-shards", type=click.IntRange(min=1), default=1, show_default=True, metavar="N",
              help="The brokers' job shards (serve --job-shards): with --tenants, jobs spread over N hash tags")
@click.option("--tenants", type=click.IntRange(min=1), default=1, show_default=True, metavar="N",
              help="Submit the jobs round-robin as N tenants (not with --tokens, whose token has one tenant)")
@click.option("--matrix", is_flag=True,
              help="Run at 1 and 2 brokers, single and batch submits (--batch, default 500), closed loop and open "
                   "loop (--rate, default 300 jobs/s): one row each")  # fmt: skip
@json_option
def bench(redis_url: str | None, mqtt_url: str | None, sites: int, n_jobs: int, concurrency: int, brokers: int,
          matching_sizes: str | None, memory_sizes: str | None, soak_s: float | None, rate: float | None,
          batch: int, tokens: bool, durable: int, shards: int, job_shards: int, tenants: int, matrix: bool,
          ingest_updates: int | None, as_json: bool) -> None:  # fmt: skip
    """Measure the real system: placements per second and submit-to-allocation latency."""
    from suanwang.bench import BenchOptions, print_report, run_bench

    logs.configure("error")
    if shards and redis_url:
        raise click.BadParameter("the benchmark starts the cluster itself: leave out --redis", param_hint="--shards")
    if shards and (shards < 3 or durable):
        raise click.BadParameter("a cluster needs at least 3 masters, and has no replicas for --durable-accept",
                                 param_hint="--shards")  # fmt: skip
    if tenants > 1 and tokens:
        raise click.BadParameter("a user token submits as its one tenant: leave out --tokens", param_hint="--tenants")
    if matching_sizes:
        from suanwang.bench_matching import measure

        try:
            sizes = [int(n) for n in matching_sizes.split(",")]
        except ValueError:
            raise click.BadParameter("a comma-separated list of site counts", param_hint="--matching") from None
        report: dict[str, Any] | None = measure(sizes)
    elif memory_sizes:
        from suanwang.bench_memory import measure as measure_memory

        try:
            n_sites, n_queued = (int(n) for n in memory_sizes.split(","))
        except ValueError:
            raise click.BadParameter("SITES,QUEUED, e.g. 100000,1000000", param_hint="--memory") from None
        if n_sites < 1 or n_queued < 1:
            raise click.BadParameter("SITES and QUEUED must be at least 1", param_hint="--memory")
        report = _run(measure_memory(n_sites, n_queued, redis_url, mqtt_url=mqtt_url))
    elif ingest_updates is not None:
        from suanwang.bench_ingest import measure as measure_ingest

        if sites < 1:
            raise click.BadParameter("at least 1 site", param_hint="--sites")
        report = _run(measure_ingest(ingest_updates, sites, redis_url, mqtt_url=mqtt_url, shards=shards))
    elif soak_s is not None:
        from suanwang.soak import SoakOptions, run_soak

        report = _run(run_soak(SoakOptions(redis_url, mqtt_url, seconds=soak_s, brokers=max(brokers, 2))))
        as_json = True  # nested results read best as JSON
    else:
        if durable and redis_url:
            raise click.BadParameter("the benchmark starts the replicas itself: leave out --redis",
                                     param_hint="--durable-accept")  # fmt: skip
        options = BenchOptions(redis_url, mqtt_url, sites, n_jobs, concurrency, brokers, rate=rate, batch=batch,
                               tokens=tokens, durable=durable, shards=shards, job_shards=job_shards,
                               tenants=tenants)  # fmt: skip
        if matrix:
            from suanwang.bench import run_matrix

            report = _run(run_matrix(options, rate or 300.0))
        else:
            report = _run(run_bench(options))
    if report is not None:
        _print_json(report) if as_json else print_report(console, report)
        if report.get("clean") is False:
            sys.exit(1)


_register_security(main, _run, _print_json)
_register_holds(main, _run, _print_json)
_register_quote(main, _run, _print_json)
_register_reliability(main, _run, _print_json)

if __name__ == "__main__":
    main()
