"""The operators' web dashboard: the static page at `/` and the read-only views it polls.

The page itself (broker/web/) is plain HTML, CSS and JavaScript modules with no build step; it draws
the map, the live feed and the charts from the public API plus the three views here, which see every
tenant: the queue summary, the places of the map and a job's event history.
"""

from __future__ import annotations

from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Any, cast

from aiohttp import web

from broker.http.api import GEO, STORE, json_response
from broker.http.usage import totals, usage_records
from broker.state.connection import now_ms, translated
from broker.state.events import decode_event
from common.errors import NotFound

WEB_ROOT = Path(str(resources.files("broker.http.web")))
QUEUE_SAMPLE = 2000  # queued jobs read for the waiting reasons; the head of the queue is what matters
RECENT_EVENTS = 400  # newest log entries scanned for the recent jobs
RECENT_JOBS = 15
HISTORY_PAGE = 5000  # log entries read per round when collecting one job's history
HISTORY_ROUNDS = 4
BACKFILL = 150  # events the page replays from the log when it opens
_TERMINAL = {"completed", "failed", "cancelled"}
_NO_CACHE = {"Cache-Control": "no-cache"}


def reason_phrases(message: str) -> list[str]:
    """The distinct reasons in a waiting message ("3 sites: fewer than 8 devices free; 1 site: ...")."""
    phrases = []
    for part in message.split("; "):
        head, sep, rest = part.partition(": ")
        counted = sep and head.split(" ", 1)[0].isdigit() and head.endswith(("site", "sites"))
        phrase = (rest if counted else part).strip()
        if phrase and phrase not in phrases:
            phrases.append(phrase)
    return phrases


def waiting_summary(rows: list[tuple[str, list[str | None]]], now: int) -> dict[str, Any]:
    """Top reasons (by number of queued jobs citing each) and the head of the queue."""
    reasons: Counter[str] = Counter()
    head: list[dict[str, Any]] = []
    for job_id, (reason, tenant, priority, created, name, origin) in rows:
        for phrase in reason_phrases(reason or "waiting for the matcher"):
            reasons[phrase] += 1
        if len(head) < 10:
            head.append({"id": job_id, "name": name, "tenant": tenant, "priority": priority, "origin": origin,
                         "waiting_s": round((now - int(created or now)) / 1000, 1), "reason": reason})  # fmt: skip
    oldest = min((int(r[1][3]) for r in rows if r[1][3]), default=None)
    return {
        "reasons": [{"reason": r, "jobs": n} for r, n in reasons.most_common(8)],
        "head": head,
        "oldest_waiting_s": round((now - oldest) / 1000, 1) if oldest else None,
        "sampled": len(rows),
    }


def recent_jobs(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The newest state of each job seen in `events` (newest first), at most RECENT_JOBS."""
    jobs: dict[str, dict[str, Any]] = {}
    for event in events:
        job = event.get("job")
        if not job:
            continue
        seen = jobs.get(job)
        if seen is None:
            if len(jobs) >= RECENT_JOBS:
                continue
            jobs[job] = seen = {"id": job, "state": event.get("state"), "last_event": event["type"],
                                "updated": event.get("ts")}  # fmt: skip
        for key in ("tenant", "site", "hub", "model", "count", "origin", "name", "arch"):
            if key in event and key not in seen:
                seen[key] = event[key]
    return list(jobs.values())


async def summary(request: web.Request) -> web.Response:
    """Queue depth by priority, why jobs wait, and the jobs that moved last, across every tenant."""
    store = request.app[STORE]
    keys, redis = store.keys, store.redis
    by_priority = await store.queue_depths()
    async with translated():
        pipe = redis.pipeline(transaction=False)
        pipe.zrange(keys.queue, 0, QUEUE_SAMPLE - 1)
        pipe.zcard(keys.assigned)
        pipe.xrevrange(keys.events, count=RECENT_EVENTS)
        queued_ids, assigned, newest = await pipe.execute()
    day = await usage_records(store, now_ms() - 24 * 3600 * 1000, None, None)
    ids = [i.decode() for i in queued_ids]
    fields = await store.get_jobs(ids, "reason", "tenant", "priority", "created", "name", "origin")
    events = [decode_event(i, f) for i, f in newest]
    backfill = events[BACKFILL] if len(events) > BACKFILL else None
    return json_response({
        "queue": {"total": sum(by_priority.values()), "by_priority": by_priority},
        "awaiting_acceptance": assigned,
        "waiting": waiting_summary(list(zip(ids, fields, strict=True)), now_ms()),
        "recent_jobs": recent_jobs(events),
        "revenue_24h_by_hub": totals(day, "hub"),
        # replay from here so the feed opens with the latest events instead of empty
        "backfill_from": backfill["id"] if backfill else ("0-0" if events else None),
    })  # fmt: skip


async def places(request: web.Request) -> web.Response:
    """Everything the map places: hubs, clusters and the cities jobs come from, with coordinates."""
    geo = request.app[GEO]
    return json_response({
        "hubs": [{"id": h.id, "name_zh": h.name_zh, "name_en": h.name_en, "side": h.side,
                  "demand_hub": h.demand_hub, "clusters": list(h.clusters)} for h in geo.hubs.values()],
        "clusters": [{"id": c.id, "hub": c.hub, "name_zh": c.name_zh, "name_en": c.name_en, "lat": c.lat,
                      "lon": c.lon, "province": c.province} for c in geo.clusters.values()],
        "cities": [{"id": c.id, "name_zh": c.name_zh, "name_en": c.name_en, "lat": c.lat, "lon": c.lon,
                    "province": c.province} for c in geo.cities.values()],
    })  # fmt: skip


def _created_ms(job: dict[str, str]) -> int:
    return int(job.get("created") or 0)


async def job_history(request: web.Request) -> web.Response:
    """The job's entries in the event log, oldest first, read forward from its submission."""
    store = request.app[STORE]
    job_id = request.match_info["id"]
    job = await store.get_job(job_id)
    if job is None:
        raise NotFound(f"no job {job_id}")
    history: list[dict[str, Any]] = []
    start, complete = f"{_created_ms(job)}-0", False
    async with translated():
        for _ in range(HISTORY_ROUNDS):
            rows = cast(list[tuple[bytes, dict[bytes, bytes]]],
                        await store.redis.xrange(store.keys.events, start, "+", count=HISTORY_PAGE))  # fmt: skip
            for event_id, fields in rows:
                if fields.get(b"job") == job_id.encode():
                    history.append(decode_event(event_id, fields))
            if len(rows) < HISTORY_PAGE or (history and history[-1].get("type") in _TERMINAL):
                complete = True
                break
            start = "(" + rows[-1][0].decode()
    return json_response({"job": job_id, "events": history, "complete": complete})


async def index(_request: web.Request) -> web.FileResponse:
    return web.FileResponse(WEB_ROOT / "index.html", headers=_NO_CACHE)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", index)
    app.router.add_static("/static", WEB_ROOT, append_version=False)
    app.router.add_get("/v1/dashboard/summary", summary)
    app.router.add_get("/v1/dashboard/places", places)
    app.router.add_get("/v1/dashboard/jobs/{id}/events", job_history)
