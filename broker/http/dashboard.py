"""The operators' web dashboard: the static page at `/` and the read-only views it polls.

The page itself (broker/http/web/) is plain HTML, CSS and JavaScript modules with no build step; it draws
the map, the live feed and the charts from the public API plus the three views here, which see every
tenant: the queue summary, the places of the map and a job's event history.
"""

from __future__ import annotations

import time
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Any

from aiohttp import web

from broker.http.deps import DEPS
from broker.http.holds import hold_view
from broker.http.responses import json_response
from broker.http.routes import ID, STR, Route, param
from broker.http.views import usage_totals
from common.errors import NotFound

WEB_ROOT = Path(str(resources.files("broker.http.web")))
QUEUE_SAMPLE = 2000  # queued jobs read for the waiting reasons; the head of the queue is what matters
RECENT_EVENTS = 400  # newest log entries scanned for the recent jobs
RECENT_JOBS = 15
HOLDS_SHOWN = 10
BACKFILL = 150  # events the page replays from the log when it opens
DAY_MS = 24 * 3600 * 1000
_NO_CACHE = {"Cache-Control": "no-cache"}


def now_ms() -> int:
    return int(time.time() * 1000)


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


async def holds_summary(request: web.Request, events: list[dict[str, Any]]) -> dict[str, Any]:
    """Standing holds (the ten expiring soonest, of every tenant) and the preemptions among the newest events."""
    desk = request.app[DEPS].holds
    holds = await desk.list_holds(None, HOLDS_SHOWN + 1) if desk is not None else []
    now = await desk.clock_ms() if holds and desk is not None else 0
    preempted = [e for e in events if e.get("type") == "requeued" and e.get("preempted_by")]
    return {
        "standing": [hold_view(h, now) for h in holds[:HOLDS_SHOWN]], "more": len(holds) > HOLDS_SHOWN,
        "preemptions": [{"job": e["job"], "site": e.get("site"), "by": e["preempted_by"],
                         "by_tenant": e.get("preempted_by_tenant"), "ts": e.get("ts")} for e in preempted[:5]],
    }  # fmt: skip


async def summary(request: web.Request) -> web.Response:
    """Queue depth by priority, why jobs wait, and the jobs that moved last, across every tenant."""
    queries = request.app[DEPS].queries
    sample = await queries.queue_sample(QUEUE_SAMPLE, RECENT_EVENTS)
    day = await queries.usage_records(now_ms() - DAY_MS, None, None)
    events = sample.newest_events
    backfill = events[BACKFILL] if len(events) > BACKFILL else None
    return json_response({
        "queue": {"total": sum(sample.depths.values()), "by_priority": sample.depths},
        "awaiting_acceptance": sample.awaiting_acceptance,
        "waiting": waiting_summary(sample.queued, now_ms()),
        "recent_jobs": recent_jobs(events),
        "revenue_24h_by_hub": usage_totals(day, "hub"),
        "holds": await holds_summary(request, events),
        # replay from here so the feed opens with the latest events instead of empty
        "backfill_from": backfill["id"] if backfill else ("0-0" if events else None),
    })  # fmt: skip


async def places(request: web.Request) -> web.Response:
    """Everything the map places: hubs, clusters and the cities jobs come from, with coordinates."""
    geo = request.app[DEPS].geography
    return json_response({
        "hubs": [{"id": h.id, "name_zh": h.name_zh, "name_en": h.name_en, "side": h.side,
                  "demand_hub": h.demand_hub, "clusters": list(h.clusters)} for h in geo.hubs.values()],
        "clusters": [{"id": c.id, "hub": c.hub, "name_zh": c.name_zh, "name_en": c.name_en, "lat": c.lat,
                      "lon": c.lon, "province": c.province} for c in geo.clusters.values()],
        "cities": [{"id": c.id, "name_zh": c.name_zh, "name_en": c.name_en, "lat": c.lat, "lon": c.lon,
                    "province": c.province} for c in geo.cities.values()],
    })  # fmt: skip


async def job_history(request: web.Request) -> web.Response:
    """The job's entries in the event log, oldest first, read forward from its submission."""
    deps = request.app[DEPS]
    job_id = request.match_info["id"]
    job = await deps.store.get_job(job_id)
    if job is None:
        raise NotFound(f"no job {job_id}")
    found = await deps.queries.job_events(job_id, int(job.get("created") or 0))
    return json_response({"job": job_id, "events": found.events, "complete": found.complete})


async def index(_request: web.Request) -> web.FileResponse:
    return web.FileResponse(WEB_ROOT / "index.html", headers=_NO_CACHE)


ROUTES = (
    Route("GET", "/", index, "The operators' dashboard page", role="public", content="text/html"),
    Route("GET", "/static", None, "The dashboard's scripts, styles and images", role="public", errors=(404,),
          params=(param("filename", "path", STR),), content="", static=WEB_ROOT),
    Route("GET", "/v1/dashboard/summary", summary, "Queue depth, why jobs wait, recent jobs", role="operator",
          ok=(200, "DashboardSummary")),
    Route("GET", "/v1/dashboard/places", places, "Hubs, clusters and cities with coordinates", role="operator",
          ok=(200, "Places")),
    Route("GET", "/v1/dashboard/jobs/{id}/events", job_history, "A job's entries in the event log",
          role="operator", ok=(200, "JobEvents"), errors=(404,), params=(ID,)),
)  # fmt: skip
