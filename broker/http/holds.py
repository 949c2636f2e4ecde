"""Holds over HTTP: a quote that holds its best candidate (or a chosen one) at the quoted price for a short
time, the job submitted with the hold placed exactly there, and the holds users and operators can see and
release. A user sees and releases only its own tenant's holds; operators see every tenant's."""

from __future__ import annotations

import secrets
import time
from typing import Any

from aiohttp import web

from broker.http import auth
from broker.http.deps import DEPS, Deps, HoldDesk
from broker.http.responses import json_response
from broker.http.routes import ID, TENANT_QUERY_PARAM, Route, param
from broker.http.views import iso, offer_view
from broker.model.job import JobSpec
from broker.model.records import Refusal
from broker.state.holds import Hold, HoldOption
from common import logs
from common.errors import Conflict, InvalidInput, MessagingUnavailable, NotFound

log = logs.get("suanwang.holds")

_WHY = {
    Refusal.STALE_VIEW: "the pool has fewer devices free than the quote saw (taken meanwhile); quote again",
    Refusal.SITE_NOT_ONLINE: "the site is not online",
    Refusal.TENANT_LIMIT: "the tenant would hold more devices than its limit",
    Refusal.TOO_MANY_HOLDS: "the tenant has the most standing holds allowed; use or release one",
    Refusal.HOLD_NOT_STANDING: "a hold with this id exists; quote again",
}


def new_hold_id() -> str:
    return f"h{int(time.time() * 1000):011x}{secrets.token_hex(5)}"


def desk_of(deps: Deps) -> HoldDesk:
    if deps.holds is None:
        raise MessagingUnavailable("holds are not available on this replica")
    return deps.holds


def hold_view(hold: Hold, now: int) -> dict[str, Any]:
    """A hold as the API shows it; `now` is the state store's clock (ms), which its expiry is set by."""
    view: dict[str, Any] = {
        "id": hold.id, "state": hold.state, "tenant": hold.tenant, "site": hold.site, "hub": hold.hub,
        "model": hold.model, "arch": hold.arch, "devices": hold.count, "price_cny_per_hour": hold.price,
        "cost_cny_per_hour": round(hold.price * hold.count, 4), "created": iso(str(hold.created_ms)),
        "expires": iso(str(hold.expires_ms)),
        "expires_in_s": round(max(hold.expires_ms - now, 0) / 1000, 1) if hold.standing else 0,
        "offer": offer_view(hold.offer), "job": hold.job or None, "for_job": hold.for_job or None,
    }  # fmt: skip
    if hold.ended_ms:
        view["ended"] = iso(str(hold.ended_ms))
    if hold.reason:
        view["reason"] = hold.reason
    return view


def hold_request(request: web.Request) -> tuple[bool, str | None, float]:
    """What a quote asks to hold: (hold?, the chosen site or None for the best, seconds)."""
    raw = request.query.get("hold", "")
    if raw.lower() not in ("", "true", "false", "1", "0"):
        raise InvalidInput("hold must be true or false", "hold")
    limits = request.app[DEPS].limits
    site = request.query.get("hold_site") or None
    ttl = limits.hold_ttl_s
    if "hold_ttl_s" in request.query:
        try:
            ttl = float(request.query["hold_ttl_s"])
        except ValueError:
            raise InvalidInput("hold_ttl_s must be a number of seconds", "hold_ttl_s") from None
        if not 1 <= ttl <= limits.hold_max_ttl_s:
            raise InvalidInput(f"hold_ttl_s must be between 1 and {limits.hold_max_ttl_s:g}", "hold_ttl_s")
    wanted = raw.lower() in ("true", "1") or site is not None
    return wanted, site, ttl


async def hold_offer(request: web.Request, spec: JobSpec, quote: dict[str, Any], site: str | None, ttl_s: float
                     ) -> dict[str, Any]:  # fmt: skip
    """Hold the quote's best candidate (the next ones in order if it filled meanwhile), or the candidate at
    `site` only; the hold as callers see it, or 409 saying why nothing could be held."""
    deps = request.app[DEPS]
    desk = desk_of(deps)
    candidates: list[dict[str, Any]] = quote.get("candidates") or []
    if site is not None:
        candidates = [c for c in candidates if c["site"] == site]
        if not candidates:
            raise Conflict(f"site {site} cannot take this job now (it is not among the quote's candidates)",
                           code="hold_refused")  # fmt: skip
    if not candidates:
        raise Conflict(f"nothing to hold: {quote.get('waiting', 'no site can take this job now')}", code="hold_refused")
    offers = [{**offer_view(c), "duration_hours": spec.duration_hours} for c in candidates]
    options = [HoldOption.of_offer(o) for o in offers]
    hold_id = deps.store.id_for(new_hold_id(), spec.tenant)
    taken = await desk.take_hold(hold_id, spec.tenant, options, int(ttl_s * 1000), spec.placement_hash(),
                                 max_holds=deps.limits.max_holds_per_tenant)  # fmt: skip
    if taken.hold is None:
        why = _WHY.get(taken.refusal, str(taken.refusal)) if taken.refusal else "refused"
        raise Conflict(f"could not hold {candidates[0]['site']}: {why}", code="hold_refused")
    deps.metrics.holds.labels("taken").inc()
    log.info("hold.taken", hold=taken.hold.id, tenant=spec.tenant, site=taken.hold.site, model=taken.hold.model,
             count=taken.hold.count, ttl_s=ttl_s, choice=taken.choice)  # fmt: skip
    return hold_view(taken.hold, await desk.clock_ms())


async def _visible_hold(request: web.Request) -> Hold:
    hold_id = request.match_info["id"]
    hold = await desk_of(request.app[DEPS]).get_hold(hold_id)
    if hold is None or not auth.may_see(request, hold.tenant):
        raise NotFound(f"no hold {hold_id}")
    return hold


async def list_holds(request: web.Request) -> web.Response:
    """Standing holds, soonest to expire first: the caller's tenant's, or (operators) every tenant's unless
    `?tenant=` names one."""
    desk = desk_of(request.app[DEPS])
    everyone = auth.identity_of(request).role != "user" and not request.query.get("tenant")
    tenant = None if everyone else auth.acting_tenant(request)  # an operator sees every tenant's
    holds = await desk.list_holds(tenant, 1000)
    now = await desk.clock_ms()
    return json_response({"holds": [hold_view(h, now) for h in holds]})


async def get_hold(request: web.Request) -> web.Response:
    hold = await _visible_hold(request)
    return json_response(hold_view(hold, await desk_of(request.app[DEPS]).clock_ms()))


async def release_hold(request: web.Request) -> web.Response:
    """Give a standing hold's devices back before it expires."""
    deps = request.app[DEPS]
    hold = await _visible_hold(request)
    if not await desk_of(deps).release_hold(hold.id, hold.tenant, "released by the user"):
        fresh = await desk_of(deps).get_hold(hold.id)
        raise Conflict(f"hold {hold.id} is {fresh.state if fresh else 'gone'}", code="hold_not_standing")
    deps.metrics.holds.labels("released").inc()
    deps.kick.set()
    log.info("hold.released", hold=hold.id, tenant=hold.tenant, site=hold.site)
    fresh = await desk_of(deps).get_hold(hold.id)
    return json_response(hold_view(fresh or hold, await desk_of(deps).clock_ms()))


HOLD_PARAMS = (
    param("hold", "query", {"type": "boolean"}, "Hold the best candidate at the quoted price (answer: `hold`)"),
    param("hold_site", "query", {"type": "string"}, "Hold the candidate at this site instead of the best"),
    param("hold_ttl_s", "query", {"type": "number", "minimum": 1}, "Seconds the hold lasts (default 60)"),
)

ROUTES = (
    Route("GET", "/v1/holds", list_holds, "Standing holds (a user's tenant's; operators: every tenant's)",
          role="user", ok=(200, "HoldList"), errors=(400,), params=(TENANT_QUERY_PARAM,)),
    Route("GET", "/v1/holds/{id}", get_hold, "A hold: where, at what price, until when, and what became of it",
          role="user", ok=(200, "Hold"), errors=(404,), params=(ID,)),
    Route("DELETE", "/v1/holds/{id}", release_hold, "Release a standing hold, giving its devices back",
          role="user", ok=(200, "Hold"), errors=(404, 409), params=(ID,)),
)  # fmt: skip
