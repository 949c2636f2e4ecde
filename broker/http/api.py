"""The HTTP API (version 1): jobs for users; sites, hubs and the live stream for operators."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

from broker.http import auth
from broker.model.job import JobSpec, JobState
from broker.model.records import SiteRecord
from broker.sites.lifecycle import PublishAssignments, tell_site_to_cancel
from broker.state.events import EventFeed, id_after
from broker.state.store import Store, SubmitRate
from common import logs
from common.errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    NotFound,
    StoreUnavailable,
    SuanwangError,
    TooManyRequests,
    Unauthorized,
)
from common.validation import parse
from regions import Geography, load_devices

log = logs.get("suanwang.api")

STORE: web.AppKey[Store] = web.AppKey("store", Store)
FEED: web.AppKey[EventFeed] = web.AppKey("feed", EventFeed)
GEO: web.AppKey[Geography] = web.AppKey("geo", Geography)
PUBLISH: web.AppKey[PublishAssignments] = web.AppKey("publish", object)  # type: ignore[arg-type]
KICK: web.AppKey[asyncio.Event] = web.AppKey("kick", asyncio.Event)
MQTT_UP: web.AppKey[Callable[[], bool]] = web.AppKey("mqtt_up", object)  # type: ignore[arg-type]
QUOTER: web.AppKey[Callable[[str, JobSpec], Awaitable[dict[str, Any]]]] = web.AppKey("quoter", object)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Limits:
    """Submissions per token (a bucket of `submit_burst` refilled at `submit_rate`/s) and queued jobs per
    tenant."""

    submit_rate: float = 20.0
    submit_burst: int = 100
    max_queued_per_tenant: int | None = None


LIMITS: web.AppKey[Limits] = web.AppKey("limits", Limits)
TENANT_HEADER = auth.TENANT_HEADER
KEEPALIVE_S = 15.0
_STATUS_OF = {InvalidInput: 400, Unauthorized: 401, Forbidden: 403, NotFound: 404, Conflict: 409,
              TooManyRequests: 429, StoreUnavailable: 503}  # fmt: skip


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def error_response(status: int, code: str, message: str, field: str | None = None) -> web.Response:
    return json_response({"error": {"code": code, "message": message, "field": field}}, status)


@web.middleware
async def errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                 ) -> web.StreamResponse:  # fmt: skip
    """Every error leaves as `{"error": {"code", "message", "field"}}`; only a bug is a 500."""
    try:
        return await handler(request)
    except SuanwangError as exc:
        status = next((s for cls, s in _STATUS_OF.items() if isinstance(exc, cls)), 500)
        if exc.code == "unsupported_media_type":
            status = 415
        response = error_response(status, exc.code, str(exc), getattr(exc, "field", None))
        if isinstance(exc, Unauthorized):
            response.headers["WWW-Authenticate"] = 'Bearer realm="suanwang"'
        elif isinstance(exc, TooManyRequests) and exc.retry_after_s:
            response.headers["Retry-After"] = str(exc.retry_after_s)
        return response
    except web.HTTPRequestEntityTooLarge as exc:
        return error_response(413, "too_large", f"request body too large: {exc.text}")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc.status, exc.reason.lower().replace(" ", "_"), exc.reason)
    except Exception:
        log.exception("http.unhandled", path=request.path, method=request.method)
        return error_response(500, "internal", "internal error")


def _iso(ms: str | None) -> str | None:
    if not ms:
        return None
    return datetime.fromtimestamp(int(ms) / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def job_view(job: dict[str, str]) -> dict[str, Any]:
    """A stored job as users see it: the spec, the state, the allocation or why it waits."""
    spec = orjson.loads(job["spec"])
    state = job["state"]
    view: dict[str, Any] = {
        "id": job["id"], "name": spec["name"], "state": state, "tenant": job["tenant"],
        "priority": spec["priority"], "workload": spec["workload"], "origin": spec["origin"],
        "resources": spec["resources"], "software": spec["software"], "residency": spec["residency"],
        "domestic_only": spec["domestic_only"], "policy": spec["policy"], "weights": spec["weights"],
        "max_latency_ms": spec["max_latency_ms"],
        "max_price_cny_per_hour": spec["max_price_cny_per_hour"], "duration_hours": spec["duration_hours"],
        "labels": spec["labels"], "attempts": int(job.get("attempt", 0)),
        "created": _iso(job.get("created")), "updated": _iso(job.get("updated")),
        "allocation": None,
    }  # fmt: skip
    if job.get("site"):
        view["allocation"] = {
            "site": job["site"], "hub": job.get("hub"), "model": job.get("model"), "arch": job.get("arch"),
            "devices": int(job.get("count", 0)), "price_cny_per_hour": float(job.get("price", 0)),
            "cost_cny_per_hour": round(float(job.get("price", 0)) * int(job.get("count", 0)), 4),
            "latency_ms": float(job.get("latency_ms", 0)), "attempt": int(job.get("attempt", 0)),
            "assigned_at": _iso(job.get("assigned_at")), "started_at": _iso(job.get("started_at")),
        }  # fmt: skip
        decision = orjson.loads(job.get("decision") or "{}")
        if decision:
            chosen = decision["chosen"]
            view["allocation"].update({
                "cost_cny_per_hour": chosen["cost_cny_per_hour"],
                "unit_price_cny_per_hour": chosen["unit_price_cny_per_hour"],
                "est_hours": chosen["est_hours"], "score": chosen["score"], "scores": chosen["scores"],
                "stack": chosen["stack"], "image": chosen["image"], "runners_up": decision["runners_up"],
            })  # fmt: skip
    if state == JobState.QUEUED:
        view["waiting"] = job.get("reason") or "waiting for the matcher"
        if job.get("last_site"):
            view["last_site"] = job["last_site"]
    elif job.get("reason"):
        view["reason"] = job["reason"]
    if job.get("finished_at"):
        view["finished"] = _iso(job["finished_at"])
    if job.get("deadline"):
        view["deadline"] = _iso(job["deadline"])
    return view


def _tenant(request: web.Request) -> str:
    return auth.acting_tenant(request)


async def _visible_job(request: web.Request) -> dict[str, str]:
    """The job named in the path; a user asking for another tenant's job learns only that there is none."""
    job_id = request.match_info["id"]
    job = await request.app[STORE].get_job(job_id)
    if job is None or not auth.may_see(request, job["tenant"]):
        raise NotFound(f"no job {job_id}")
    return job


def new_job_id() -> str:
    """Sortable by submission time: milliseconds in hex, then randomness."""
    return f"j{int(time.time() * 1000):011x}{secrets.token_hex(5)}"


def check_against_network(spec: JobSpec, geo: Geography) -> None:
    """What only the broker knows: places and reference models must exist."""
    if not geo.is_origin(spec.origin):
        raise InvalidInput(f"unknown origin {spec.origin!r}: use a city, cluster or hub id (GET /v1/hubs)", "origin")
    equivalent = spec.resources.equivalent
    if equivalent is not None and equivalent.reference not in load_devices():
        raise InvalidInput(f"unknown reference model {equivalent.reference!r}", "resources.equivalent.reference")
    provinces = {p.lower() for hub in geo.hubs.values() for p in hub.provinces}
    for name in ("allow_hubs", "deny_hubs"):
        for hub in getattr(spec.residency, name):
            if hub not in geo.hubs:
                raise InvalidInput(f"unknown hub {hub!r}; one of {', '.join(geo.hubs)}", f"residency.{name}")
    for name in ("allow_provinces", "deny_provinces"):
        for province in getattr(spec.residency, name):
            if province.lower() not in provinces:
                raise InvalidInput(f"unknown province {province!r}", f"residency.{name}")


async def _read_spec(request: web.Request) -> JobSpec:
    if request.content_type != "application/json":
        raise InvalidInput("send the job as application/json", None, code="unsupported_media_type")
    raw = parse(JobSpec, await request.read())  # syntax and types first, then what only the broker knows
    tenant = auth.acting_tenant(request, raw.tenant if "tenant" in raw.model_fields_set else None)
    spec = raw if raw.tenant == tenant else raw.model_copy(update={"tenant": tenant})
    check_against_network(spec, request.app[GEO])
    return spec


IDEMPOTENCY_HEADER = "Idempotency-Key"


async def submit_job(request: web.Request) -> web.Response:
    """Queue a job. With an Idempotency-Key, a retry returns the job the first request created."""
    spec = await _read_spec(request)
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is not None and not (0 < len(key) <= 128 and key.isprintable() and " " not in key):
        raise InvalidInput("Idempotency-Key must be 1-128 printable characters without spaces", IDEMPOTENCY_HEADER)
    body_hash = hashlib.sha256(spec.model_dump_json().encode()).hexdigest()[:24]
    limits, caller = request.app[LIMITS], auth.identity_of(request)
    rate = SubmitRate(caller.id, limits.submit_rate, limits.submit_burst) if caller.id else None
    stored, created = await request.app[STORE].submit(
        new_job_id(),
        spec,
        idempotency_key=key,
        body_hash=body_hash,
        rate_limit=rate,
        max_queued=limits.max_queued_per_tenant,
    )
    if created:
        request.app[KICK].set()
        log.info("job.submitted", job=stored["id"], tenant=spec.tenant, archs=spec.resources.arch_set,
                 count=spec.resources.count, origin=spec.origin)  # fmt: skip
    response = json_response(job_view(stored), 202 if created else 200)
    response.headers["Location"] = f"/v1/jobs/{stored['id']}"
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return response


async def quote_job(request: web.Request) -> web.Response:
    """Where the job would go now and what would make it fit better; takes no capacity."""
    spec = await _read_spec(request)
    return json_response(await request.app[QUOTER](new_job_id(), spec))


async def get_job(request: web.Request) -> web.Response:
    job = await _visible_job(request)
    view = job_view(job)
    view["history"] = await request.app[STORE].history(job["id"])
    return json_response(view)


async def list_jobs(request: web.Request) -> web.Response:
    state = request.query.get("state") or None
    if state is not None and state not in JobState.__members__.values():
        raise InvalidInput(f"state must be one of {', '.join(s.value for s in JobState)}", "state")
    try:
        limit = int(request.query.get("limit", "100"))
    except ValueError:
        raise InvalidInput("limit must be an integer", "limit") from None
    if not 1 <= limit <= 1000:
        raise InvalidInput("limit must be between 1 and 1000", "limit")
    jobs = await request.app[STORE].list_jobs(_tenant(request), limit, state)
    return json_response({"jobs": [job_view(j) for j in jobs]})


async def cancel_job(request: web.Request) -> web.Response:
    store = request.app[STORE]
    job = await _visible_job(request)
    job_id = job["id"]
    state = await store.transition(job_id, "cancel", "", "", "cancelled by the user")
    if not state:
        raise Conflict(f"job {job_id} is already {job['state']}")
    if job.get("site"):
        await tell_site_to_cancel(request.app[PUBLISH], job["site"], [(job_id, int(job.get("attempt", 0)))])
        request.app[KICK].set()
    updated = await store.get_job(job_id)
    return json_response(job_view(updated or job))


def site_view(record: SiteRecord, geo: Geography) -> dict[str, Any]:
    meta = record.meta or {}
    pools = []
    for pool in meta.get("pools", []):
        model = pool["model"]
        total = record.capacity.get(f"t:{model}", 0)
        external = record.capacity.get(f"x:{model}", 0)
        allocated = record.capacity.get(f"a:{model}", 0)
        pools.append({**pool, "total": total, "in_use_external": external, "allocated": allocated,
                      "free": max(total - external - allocated, 0)})  # fmt: skip
    return {
        "id": record.id, "hub": record.hub, "cluster": record.cluster or None, "status": record.status,
        "last_seen": _iso(str(record.seen_ms)) if record.seen_ms else None, "pools": pools,
        "energy": meta.get("energy"), "measured_latency_ms": meta.get("latency_ms") or {},
    }  # fmt: skip


async def _all_sites(request: web.Request) -> list[dict[str, Any]]:
    store = request.app[STORE]
    records = await store.load_sites(await store.all_site_ids())
    return [site_view(r, request.app[GEO]) for r in records if r.meta is not None]


async def list_sites(request: web.Request) -> web.Response:
    sites = await _all_sites(request)
    hub = request.query.get("hub")
    if hub:
        sites = [s for s in sites if s["hub"] == hub]
    return json_response({"sites": sorted(sites, key=lambda s: s["id"])})


async def get_site(request: web.Request) -> web.Response:
    store = request.app[STORE]
    records = await store.load_sites([request.match_info["id"]])
    if not records or records[0].meta is None:
        raise NotFound(f"no site {request.match_info['id']}")
    view = site_view(records[0], request.app[GEO])
    view["status_history"] = [
        {"ts": _iso(str(e["ts"])), "status": e["status"]} for e in await store.status_history(records[0].id)
    ]
    return json_response(view)


async def list_hubs(request: web.Request) -> web.Response:
    geo = request.app[GEO]
    summary: dict[str, dict[str, Any]] = {}
    for hub in geo.hubs.values():
        summary[hub.id] = {
            "id": hub.id, "name_zh": hub.name_zh, "name_en": hub.name_en, "side": hub.side,
            "tariff_cny_per_kwh": hub.tariff_cny_per_kwh, "pue": hub.pue, "green_share": hub.green_share,
            "clusters": [{"id": c, "name_zh": geo.clusters[c].name_zh, "name_en": geo.clusters[c].name_en,
                          "lat": geo.clusters[c].lat, "lon": geo.clusters[c].lon} for c in hub.clusters],
            "sites": {"total": 0, "online": 0}, "capacity": {},
        }  # fmt: skip
    for site in await _all_sites(request):
        hub_summary = summary.get(site["hub"])
        if hub_summary is None:
            continue
        hub_summary["sites"]["total"] += 1
        hub_summary["sites"]["online"] += site["status"] == "online"
        for pool in site["pools"]:
            arch = hub_summary["capacity"].setdefault(pool["arch"], {"total": 0, "allocated": 0, "free": 0,
                                                                     "in_use_external": 0})  # fmt: skip
            for key in arch:
                arch[key] += pool[key]
    return json_response({"hubs": list(summary.values())})


async def health(request: web.Request) -> web.Response:
    redis_ok = await request.app[STORE].ping()
    mqtt_ok = request.app[MQTT_UP]()
    ok = redis_ok and mqtt_ok
    return json_response({"status": "ok" if ok else "degraded", "redis": redis_ok, "mqtt": mqtt_ok},
                         200 if ok else 503)  # fmt: skip


async def stream(request: web.Request) -> web.StreamResponse:
    """Server-sent events: the backlog after `Last-Event-ID` (if given), then every event live."""
    feed = request.app[FEED]
    last = request.headers.get("Last-Event-ID") or request.query.get("last_event_id") or ""
    if last:
        try:
            id_after(last, "0-0")
        except ValueError:
            raise InvalidInput("Last-Event-ID must be a stream id like 1700000000000-0", "Last-Event-ID") from None
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})  # fmt: skip
    await response.prepare(request)
    await response.write(b": suanwang allocation stream\nretry: 2000\n\n")

    async def send(items: list[tuple[str, bytes]]) -> None:
        nonlocal last
        chunk = bytearray()
        for event_id, data in items:
            if last and not id_after(event_id, last):
                continue
            chunk += b"id: " + event_id.encode() + b"\nevent: allocation\ndata: " + data + b"\n\n"
            last = event_id
        if chunk:
            await response.write(bytes(chunk))

    async def catch_up() -> None:
        while last:
            backlog = await feed.backlog(last)
            if not backlog:
                return
            await send(backlog)

    try:
        async with feed.subscribe() as subscription:
            await catch_up()
            while True:
                if subscription.overflowed and subscription.queue.empty():
                    await catch_up()  # fell behind the live feed: read the rest from the log
                    feed.resubscribe(subscription)
                try:
                    first = await asyncio.wait_for(subscription.queue.get(), KEEPALIVE_S)
                except TimeoutError:
                    await response.write(b": keepalive\n\n")
                    continue
                batch = [first]
                while not subscription.queue.empty() and len(batch) < 500:
                    batch.append(subscription.queue.get_nowait())
                await send(batch)
    except ConnectionResetError:
        pass  # the operator went away
    return response


def make_app(store: Store, feed: EventFeed, geo: Geography, publish: PublishAssignments, kick: asyncio.Event,
             mqtt_up: Callable[[], bool], quoter: Callable[[str, JobSpec], Awaitable[dict[str, Any]]],
             max_body_bytes: int = 64 * 1024, tokens: auth.Tokens | None = None, limits: Limits | None = None
             ) -> web.Application:  # fmt: skip
    """The API; with `tokens` every route but the public ones needs a bearer token (see broker.http.auth)."""
    app = web.Application(middlewares=[errors, auth.authenticate], client_max_size=max_body_bytes)
    app[STORE], app[FEED], app[GEO], app[PUBLISH], app[KICK], app[MQTT_UP] = store, feed, geo, publish, kick, mqtt_up
    app[QUOTER], app[auth.TOKENS], app[LIMITS] = quoter, tokens, limits or Limits()
    app.router.add_post("/v1/jobs", submit_job)
    app.router.add_post("/v1/quote", quote_job)
    app.router.add_get("/v1/jobs", list_jobs)
    app.router.add_get("/v1/jobs/{id}", get_job)
    app.router.add_delete("/v1/jobs/{id}", cancel_job)
    app.router.add_get("/v1/sites", list_sites)
    app.router.add_get("/v1/sites/{id}", get_site)
    app.router.add_get("/v1/hubs", list_hubs)
    app.router.add_get("/v1/allocations/stream", stream)
    app.router.add_get("/healthz", health)
    from broker.http import admin, dashboard, openapi

    dashboard.add_routes(app)
    admin.add_routes(app)
    openapi.add_routes(app)
    return app
