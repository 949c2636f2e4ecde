"""`suanwang serve`: one broker replica. It holds nothing a restart would lose; run as many as needed."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import ssl
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from broker.http.app import make_app
from broker.http.deps import Deps, Limits
from broker.matching import Request
from broker.matching.quote import quote
from broker.matching.snapshot import Snapshot
from broker.metrics import Metrics
from broker.model.job import JobSpec
from broker.scheduling.preemption import Preemptor
from broker.scheduling.scheduler import Scheduler
from broker.sites.ingest import Ingest
from broker.sites.lifecycle import run_sweeper
from broker.sites.link import MqttLink
from broker.state.archive import Retention
from broker.state.buckets import RateBuckets
from broker.state.events import EventFeed, run_mirror
from broker.state.queries import Queries
from broker.state.registry import SiteGate, SiteRegistry
from broker.state.store import Store
from broker.state.tokens import Tokens
from common import logs, topics
from common.config import Settings, redact_url
from common.errors import InvalidInput, StoreUnavailable
from regions import load_geography, load_transfer

log = logs.get("suanwang.broker")


async def cancel_all(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel until every task has ended: on Python 3.11 `asyncio.wait_for` inside a library call can
    swallow one cancellation, leaving a task running on after a single `cancel()`."""
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.1)
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            task.result()


@dataclass
class Broker:
    """A running replica's parts, for the CLI, the demo and the tests."""

    settings: Settings
    store: Store
    scheduler: Scheduler
    ingest: Ingest
    mqtt: MqttLink
    feed: EventFeed
    stop: asyncio.Event
    runner: web.AppRunner | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        host, _ = self.settings.http_address
        return f"{'https' if self.settings.tls_cert else 'http'}://{host}:{self.port}"

    async def close(self) -> None:
        self.stop.set()
        await cancel_all(self.tasks)
        if self.runner is not None:
            await self.runner.cleanup()
        await self.store.close()


async def _use_layout(store: Store, job_shards: int | None) -> None:
    """The deployment's job shards (Store.use_layout), waiting for Redis if it is not answering yet."""
    delay = 0.2
    while True:
        try:
            await store.use_layout(job_shards)
            return
        except StoreUnavailable as exc:
            log.warning("broker.waiting_for_redis", error=str(exc))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


async def start_broker(settings: Settings) -> Broker:
    """Start every part of a replica and return once HTTP is listening."""
    transfer = load_transfer().with_egress(dict(settings.egress_cny_per_gb))  # a bad hub stops it here
    retention = Retention(finished_hours=settings.finished_retention_hours, usage_days=settings.usage_retention_days,
                          archive_days=settings.archive_retention_days)  # fmt: skip
    store = Store.from_url(settings.redis_url, settings.namespace, retention=retention)
    store.durable_replicas, store.durable_timeout_ms = settings.durable_accept, settings.durable_accept_timeout_ms
    await _use_layout(store, settings.job_shards)  # before anything reads the store's keys
    geo = load_geography()
    stop = asyncio.Event()
    kick = asyncio.Event()
    metrics = Metrics()
    gate = SiteGate(store.redis, store.keys) if settings.require_registered else None
    root = topics.ROOT
    mqtt = MqttLink(
        settings.mqtt, f"suanwang-broker-{settings.replica}",
        [
            (f"{root}/sites/+/capacity", 1),  # every replica: retained capacity reaches a fresh one
            (f"{root}/sites/+/status", 1),
            (topics.shared(f"{root}/sites/+/events", settings.share_group), 1),  # each event to one replica
        ],
    )  # fmt: skip
    publish_assignments = mqtt.publish_assignments
    ingest = Ingest(store, publish_assignments, kick, geo, metrics, gate=gate,
                    max_message_bytes=settings.max_message_bytes)  # fmt: skip
    scheduler = Scheduler(store, Snapshot(geo, transfer=transfer), publish_assignments, batch=settings.batch,
                          accept_timeout_s=settings.accept_timeout_s, kick=kick, metrics=metrics,
                          reserve_after_s=settings.reserve_after_s, replica=settings.replica,
                          preemptor=Preemptor(store, publish_assignments, metrics, settings.max_preemptions)
                          if settings.max_preemptions > 0 else None)  # fmt: skip
    feed = EventFeed(store)

    broker = Broker(settings, store, scheduler, ingest, mqtt, feed, stop)
    broker.tasks = [
        asyncio.create_task(mqtt.run(stop, ingest.offer), name="mqtt"),
        asyncio.create_task(ingest.run(stop), name="ingest"),
        asyncio.create_task(scheduler.run(stop, mqtt.connected), name="scheduler"),
        asyncio.create_task(
            run_sweeper(store, publish_assignments, settings.site_ttl_s, kick, stop, metrics=metrics,
                        accept_timeout_s=settings.accept_timeout_s), name="sweep"
        ),
        asyncio.create_task(feed.run(stop), name="feed"),
    ]
    if settings.mirror != "off":
        each = mqtt.publish_allocation_events if settings.mirror in ("events", "both") else None
        batched = mqtt.publish_allocations if settings.mirror in ("batches", "both") else None
        mirror = run_mirror(store, settings.replica, each, stop, publish_batch=batched)
        broker.tasks.append(asyncio.create_task(mirror, name="mirror"))

    async def quoter(job_id: str, spec: JobSpec) -> dict[str, Any]:
        async with scheduler.view() as snapshot:
            return quote(Request.of(job_id, spec), snapshot)

    async def scrape() -> None:
        async with scheduler.view() as snapshot:
            metrics.observe_capacity(snapshot)
        metrics.holds_standing.set(await store.standing_holds())

    tokens = Tokens(store.redis, store.keys)
    app = make_app(Deps(
        store=store, feed=feed, geography=geo, publish_assignments=publish_assignments, kick=kick,
        mqtt_up=mqtt.connected.is_set, quoter=quoter, queries=Queries(store), token_admin=tokens,
        registry=SiteRegistry(store.redis, store.keys), metrics=metrics, scrape=scrape,
        tokens=tokens if settings.auth == "required" else None, buckets=RateBuckets(store.redis, store.keys),
        limits=Limits(settings.submit_rate, settings.submit_burst, settings.max_queued_per_tenant,
                      quote_rate=settings.quote_rate, quote_burst=settings.quote_burst,
                      auth_failures_per_minute=settings.auth_failures_per_minute, hold_ttl_s=settings.hold_ttl_s,
                      hold_max_ttl_s=settings.hold_max_ttl_s, max_holds_per_tenant=settings.max_holds_per_tenant,
                      accept_timeout_s=settings.accept_timeout_s),
        holds=store,
        max_body_bytes=settings.max_body_bytes,
    ))  # fmt: skip
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    host, port = settings.http_address
    site = web.TCPSite(runner, host, port, reuse_address=True, ssl_context=_https(settings))
    await site.start()
    broker.runner = runner
    broker.port = runner.addresses[0][1]  # the bound port, when 0 asked for a free one
    log.info("broker.started", http=broker.url, redis=redact_url(settings.redis_url), mqtt=settings.mqtt.safe_url,
             replica=settings.replica, auth=settings.auth, require_registered=settings.require_registered)  # fmt: skip
    return broker


def _https(settings: Settings) -> ssl.SSLContext | None:
    if not settings.tls_cert or not settings.tls_key:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    return context


# The youngest generation is collected after this many allocations (Python's default: 700). A broker makes
# tens of short-lived objects per message and per job, almost none in cycles; at the default the collector
# took about a third of the broker's CPU per capacity update.
GC_YOUNG = 50_000


def gc_young() -> int:
    """`SUANWANG_GC_YOUNG`, or `GC_YOUNG`; a value that is not a positive whole number is refused by name."""
    raw = os.environ.get("SUANWANG_GC_YOUNG", "").strip()
    if not raw:
        return GC_YOUNG
    if not raw.isdigit() or int(raw) < 1:
        raise InvalidInput(f"SUANWANG_GC_YOUNG must be a positive whole number, got {raw!r}", "SUANWANG_GC_YOUNG")
    return int(raw)


async def serve(settings: Settings) -> None:
    gc.set_threshold(gc_young(), 20, 20)
    broker = await start_broker(settings)
    gc.freeze()  # what start-up built (catalog, geography, the first view) lives as long as the process
    print(f"Suanwang broker listening on {broker.url}", flush=True)
    try:
        await broker.stop.wait()
    finally:
        await broker.close()
