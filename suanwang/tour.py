"""The demo's tour: four things the broker does that a user should see once, through the HTTP API as a user
would, before the sample traffic starts.

1. Data gravity: a quote that weighs moving a 40 TB dataset west against running near it in Shanghai.
2. Quote, hold, commit: the best offer held, then a job submitted with the hold placed there at its price.
3. Preemption: a preemptible low-priority job gives way to an urgent one and comes back.
4. Reliability: of two sites alike in every offer, the one that keeps failing its work sinks in the ranking.

Steps 3 and 4 run on tour sites of their own (`TOUR_SITES`, in Gui'an: models the demo fleet does not have),
so the sample traffic does not decide their outcome. Each step waits on conditions with a deadline and
reports what it saw; a step that does not finish says so and the tour goes on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
import orjson
from rich.console import Console

from regions import SiteSeed, load_devices, load_geography
from regions.catalog import build_fleet

T = TypeVar("T")
STEP_TIMEOUT_S = 60.0
POLL_S = 0.2
PREEMPT_MODEL = "H20"  # the one tour site with it: an urgent job for all of it must preempt
RANK_MODEL = "L40S"  # two tour sites alike, one failing every job
GAUGE = 16


def tour_sites() -> tuple[tuple[SiteSeed, ...], tuple[SiteSeed, ...]]:
    """(sites that do their work, the site that fails every job): simulated sites in Gui'an."""
    pool = {"total": GAUGE, "in_use_external": 0, "price_cny_per_hour": 6.0}

    def site(sid: str, model: str) -> dict[str, Any]:
        return {"id": sid, "hub": "guizhou", "cluster": "guian", "operator": "Tour site (simulated)",
                "pools": [{**pool, "model": model, "per_node": 8}]}  # fmt: skip

    good = build_fleet({"site": [site("guian-tour-h20", PREEMPT_MODEL), site("guian-tour-good", RANK_MODEL)]},
                       load_devices(), load_geography())  # fmt: skip
    bad = build_fleet({"site": [site("guian-tour-flaky", RANK_MODEL)]}, load_devices(), load_geography())
    return good, bad


TOUR_SITE_IDS = frozenset(s.id for group in tour_sites() for s in group)


class TourError(Exception):
    """A step did not see what it waited for in time."""


@dataclass
class Tour:
    """The tour's HTTP client: a user's token for each tenant it acts as, an operator's to read sites."""

    url: str
    users: dict[str, str]
    operator: str | None
    time_scale: float
    console: Console
    session: aiohttp.ClientSession = field(init=False)

    def hours(self, real_seconds: float) -> float:
        """Simulated hours that last `real_seconds` at the demo's time scale."""
        return real_seconds * self.time_scale / 3600.0

    async def call(self, method: str, path: str, body: Any = None, tenant: str | None = None,
                   params: dict[str, str] | None = None) -> tuple[int, Any]:  # fmt: skip
        token = self.users.get(tenant or "") if tenant else self.operator
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        elif tenant:
            headers["X-Suanwang-Tenant"] = tenant
        data = None if body is None else orjson.dumps(body)
        async with self.session.request(method, self.url + path, data=data, headers=headers, params=params) as r:
            return r.status, orjson.loads(await r.read() or b"null")

    async def ok(self, method: str, path: str, body: Any = None, tenant: str | None = None,
                 params: dict[str, str] | None = None) -> Any:  # fmt: skip
        status, answer = await self.call(method, path, body, tenant, params)
        if status >= 300:
            raise TourError(f"{method} {path}: {status} {answer}")
        return answer

    async def until(self, probe: Callable[[], Awaitable[T | None]], what: str, timeout: float = STEP_TIMEOUT_S) -> T:
        deadline = time.monotonic() + timeout
        while True:
            found = await probe()
            if found is not None:
                return found
            if time.monotonic() > deadline:
                raise TourError(f"gave up waiting for {what} after {timeout:g} s")
            await asyncio.sleep(POLL_S)

    async def job_when(self, job_id: str, tenant: str, check: Callable[[dict[str, Any]], bool], what: str
                       ) -> dict[str, Any]:  # fmt: skip
        async def probe() -> dict[str, Any] | None:
            view = await self.ok("GET", f"/v1/jobs/{job_id}", tenant=tenant)
            return view if check(view) else None

        return await self.until(probe, what)

    def say(self, text: str) -> None:
        self.console.print(text, highlight=False)

    # ------------------------------------------------------------------------------------------------ steps

    async def sites_online(self, ids: set[str]) -> None:
        async def probe() -> bool | None:
            listed = (await self.ok("GET", "/v1/sites"))["sites"]
            online = {s["id"] for s in listed if s["status"] == "online" and s["pools"]}
            return True if ids <= online else None

        await self.until(probe, f"{len(ids)} sites online")

    async def data_gravity(self, tenant: str) -> dict[str, Any]:
        job = {"name": "corpus-pretrain", "workload": "training", "origin": "shanghai", "duration_hours": 96,
               "resources": {"arch": "GPU", "models": ["A800", "A100-80G"], "count": 128},
               "datasets": [{"name": "corpus", "size_gb": 40_000, "location": "shanghai"}]}  # fmt: skip
        quote = await self.ok("POST", "/v1/quote", job, tenant)
        gravity = quote.get("data_gravity") or {}
        self.say(f"[1] data gravity, 40 TB in Shanghai: {gravity.get('text', 'no answer')}")
        near, moved = gravity.get("near") or {}, gravity.get("moved") or {}
        return {"text": gravity.get("text"), "near": near.get("site"), "near_hub": near.get("hub"),
                "moved": moved.get("site"), "moved_hub": moved.get("hub"),
                "transfer_hours": moved.get("transfer_hours"), "cheaper": gravity.get("cheaper")}  # fmt: skip

    async def hold_and_commit(self, tenant: str) -> dict[str, Any]:
        job = {"name": "held-inference", "workload": "inference", "origin": "shenzhen", "duration_hours": 2,
               "resources": {"arch": "GPU", "count": 8}}  # fmt: skip
        quote = await self.ok("POST", "/v1/quote", job, tenant, params={"hold": "true", "hold_ttl_s": "60"})
        hold = quote["hold"]
        self.say(f"[2] held {hold['id']}: {hold['devices']} x {hold['model']} at {hold['site']} for "
                 f"{hold['price_cny_per_hour']:g} CNY/device-hour, {hold['expires_in_s']:g} s")  # fmt: skip
        submitted = await self.ok("POST", "/v1/jobs", {**job, "hold": hold["id"]}, tenant)
        placed = await self.job_when(submitted["id"], tenant, lambda j: j["allocation"] is not None, "the held job")
        a = placed["allocation"]
        used = await self.ok("GET", f"/v1/holds/{hold['id']}", tenant=tenant)
        self.say(f"    committed {submitted['id']} with it: {a['devices']} x {a['model']} at {a['site']} for "
                 f"{a['price_cny_per_hour']:g} CNY/device-hour; the hold is {used['state']}")  # fmt: skip
        return {"hold": hold["id"], "site": hold["site"], "price": hold["price_cny_per_hour"],
                "job": submitted["id"], "placed_site": a["site"], "placed_price": a["price_cny_per_hour"],
                "hold_state": used["state"]}  # fmt: skip

    async def preemption(self, low_tenant: str, high_tenant: str) -> dict[str, Any]:
        def job(name: str, priority: str, seconds: float, **extra: Any) -> dict[str, Any]:
            return {"name": name, "workload": "training", "origin": "guiyang", "priority": priority,
                    "duration_hours": self.hours(seconds),
                    "resources": {"arch": "GPU", "models": [PREEMPT_MODEL], "count": GAUGE}, **extra}  # fmt: skip

        low = await self.ok("POST", "/v1/jobs", job("sweep-low", "low", 8, preemptible=True, grace_s=2), low_tenant)
        await self.job_when(low["id"], low_tenant, lambda j: j["state"] == "running", "the low job running")
        urgent = await self.ok("POST", "/v1/jobs", job("urgent-finetune", "high", 3), high_tenant)
        await self.job_when(urgent["id"], high_tenant, lambda j: j["state"] in ("running", "completed"),
                            "the urgent job placed")  # fmt: skip
        given = await self.job_when(low["id"], low_tenant, lambda j: any(
            (h.get("reason") or "").startswith("preempted by") for h in j["history"]), "the preemption")  # fmt: skip
        reason = next(h["reason"] for h in given["history"] if (h.get("reason") or "").startswith("preempted by"))
        self.say(f"[3] {low['id']} ({low_tenant}, low, preemptible) gave way: {reason}")
        back = await self.job_when(low["id"], low_tenant, lambda j: j["state"] in ("running", "completed")
                                   and j["attempts"] > 1, "the low job back")  # fmt: skip
        self.say(f"    and came back once the urgent job was done: {back['state']} at {back['allocation']['site']}")
        return {"victim": low["id"], "by": urgent["id"], "reason": reason, "came_back": back["state"]}

    async def reliability(self, tenant: str) -> dict[str, Any]:
        def job(n: int) -> dict[str, Any]:
            return {"name": f"render-{n}", "workload": "rendering", "origin": "guiyang",
                    "duration_hours": self.hours(1.5),
                    "resources": {"arch": "GPU", "models": [RANK_MODEL], "count": GAUGE}}  # fmt: skip

        async def flaky_score() -> float:
            return float((await self.ok("GET", "/v1/sites/guian-tour-flaky"))["reliability"]["score"])

        ended: dict[str, str] = {}
        for n in range(6):  # two at a time: one on each site, so the flaky one gets work
            ids = [(await self.ok("POST", "/v1/jobs", job(2 * n + i), tenant))["id"] for i in range(2)]
            for job_id in ids:
                done = await self.job_when(job_id, tenant, lambda j: j["state"] in ("completed", "failed"),
                                           "a render job to end")  # fmt: skip
                ended[job_id] = done["state"]
            if await flaky_score() < 80.0:
                break
        quote = await self.ok("POST", "/v1/quote", job(99), tenant)
        ranked = [(c["site"], c["reliability"]) for c in quote.get("candidates", [])]
        self.say(f"[4] reliability: {sum(s == 'failed' for s in ended.values())} of {len(ended)} render jobs failed "
                 f"at guian-tour-flaky; a quote now ranks " + ", ".join(f"{s} ({r:g})" for s, r in ranked))  # fmt: skip
        return {"ranked": ranked, "failed": sum(s == "failed" for s in ended.values()), "jobs": len(ended)}


async def run_tour(url: str, users: dict[str, str], operator: str | None, time_scale: float,
                   console: Console) -> dict[str, Any]:  # fmt: skip
    """The four steps in order; the summary has each step's findings, or its `error`."""
    tour = Tour(url, users, operator, time_scale, console)
    tenants = list(users) or ["sjtu-ai-lab", "fintech-risk", "render-studio", "gov-cloud"]
    out: dict[str, Any] = {}
    async with aiohttp.ClientSession() as tour.session:
        try:
            await tour.sites_online(set(TOUR_SITE_IDS))
        except TourError as exc:
            return {"error": str(exc)}
        steps: list[tuple[str, Callable[[], Awaitable[dict[str, Any]]]]] = [
            ("data_gravity", lambda: tour.data_gravity(tenants[0])),
            ("hold", lambda: tour.hold_and_commit(tenants[1 % len(tenants)])),
            ("preemption", lambda: tour.preemption(tenants[2 % len(tenants)], tenants[0])),
            ("reliability", lambda: tour.reliability(tenants[3 % len(tenants)])),
        ]
        for name, step in steps:
            try:
                out[name] = await step()
            except (TourError, KeyError, aiohttp.ClientError) as exc:
                out[name] = {"error": str(exc)}
                tour.say(f"[{name}] did not finish: {exc}")
    return out
