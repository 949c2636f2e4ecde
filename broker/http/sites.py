"""Sites and hubs: what each site has, uses outside the broker, has allocated and has free."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from broker.http import auth
from broker.http.deps import DEPS
from broker.http.responses import json_response
from broker.http.routes import ID, STR, Route, param
from broker.http.views import iso, reliability_view, site_view
from common.errors import NotFound


async def _all_sites(request: web.Request) -> list[dict[str, Any]]:
    store = request.app[DEPS].store
    records = await store.load_sites(await store.all_site_ids())
    return [site_view(r) for r in records if r.meta is not None]


async def list_sites(request: web.Request) -> web.Response:
    sites = await _all_sites(request)
    hub = request.query.get("hub")
    if hub:
        sites = [s for s in sites if s["hub"] == hub]
    return json_response({"sites": sorted(sites, key=lambda s: s["id"])})


async def get_site(request: web.Request) -> web.Response:
    store = request.app[DEPS].store
    records = await store.load_sites([request.match_info["id"]])
    if not records or records[0].meta is None:
        raise NotFound(f"no site {request.match_info['id']}")
    view = site_view(records[0])
    view["status_history"] = [
        {"ts": iso(str(e["ts"])), "status": e["status"]} for e in await store.status_history(records[0].id)
    ]
    return json_response(view)


async def reset_reliability(request: web.Request) -> web.Response:
    """Forget the site's reliability record (an operator's decision, logged as a `reliability_reset` event):
    it scores as a new site again, on every replica from its next view."""
    store, site = request.app[DEPS].store, request.match_info["id"]
    caller = auth.identity_of(request)
    had = await store.reset_reliability(site, who=caller.id or caller.name or caller.role)
    if had is None:
        raise NotFound(f"no site {site}")
    fresh = reliability_view(await store.reliability(site))
    return json_response({"site": site, "had_record": had, "reliability": fresh})


async def list_hubs(request: web.Request) -> web.Response:
    geo = request.app[DEPS].geography
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


ROUTES = (
    Route("GET", "/v1/hubs", list_hubs, "Hubs and clusters with their capacity", role="user", ok=(200, "HubList")),
    Route("GET", "/v1/sites", list_sites, "Sites with their pools and capacity", role="operator",
          ok=(200, "SiteList"), params=(param("hub", "query", STR),)),
    Route("GET", "/v1/sites/{id}", get_site, "One site", role="operator", ok=(200, "Site"), errors=(404,),
          params=(ID,)),
    Route("POST", "/v1/sites/{id}/reliability:reset", reset_reliability,
          "Forget a site's reliability record: it scores as a new site again", role="operator",
          ok=(200, "ReliabilityReset"), errors=(404,), params=(ID,)),
)  # fmt: skip
