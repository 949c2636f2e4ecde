"""Bounded work per caller at the API's edge: failed authentication limited per client address, quotes
limited per token and capped in size, and what a user sees of other tenants (the market, never the tenants)."""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson
import pytest

from broker.http.auth import FailureLimiter, client_of
from broker.http.deps import Limits
from broker.http.views import MAX_CANDIDATES, OFFER_FIELDS
from broker.model.identity import Identity
from broker.model.job import JobSpec
from tests.http.doubles import MemoryTokens
from tests.http.harness import Start, job_body


class CountingTokens(MemoryTokens):
    """Tokens that count how often the store would have been asked."""

    def __init__(self) -> None:
        super().__init__()
        self.lookups = 0

    async def lookup(self, token: str) -> Identity | None:
        self.lookups += 1
        return await super().lookup(token)


class MemoryBuckets:
    """Token buckets that never refill: `burst` takes per (scope, subject), then a wait of `wait_ms`."""

    def __init__(self, wait_ms: int = 1500) -> None:
        self.taken: list[tuple[str, str, float, int]] = []
        self.wait_ms = wait_ms

    async def take(self, scope: str, subject: str, rate: float, burst: int) -> int:
        used = sum(1 for s, who, _r, _b in self.taken if (s, who) == (scope, subject))
        if used >= burst:
            return self.wait_ms
        self.taken.append((scope, subject, rate, burst))
        return 0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --------------------------------------------------------------------------- failed authentication


async def test_unknown_tokens_past_the_budget_are_429_without_asking_the_store(start: Start) -> None:
    """Three unknown tokens a minute allowed: each is a 401 and one lookup; the fourth is a 429 with
    Retry-After and the JSON error body, and the store is not asked."""
    tokens = CountingTokens()
    api = await start(tokens=tokens, limits=Limits(auth_failures_per_minute=3))
    for i in range(3):
        reply = await api.call("GET", "/v1/jobs", f"sw_bad_{i}")
        assert reply.status == 401 and reply.body["error"]["code"] == "unauthorized"
    assert tokens.lookups == 3
    for i in range(3):
        reply = await api.call("GET", "/v1/jobs", f"sw_worse_{i}")
        assert reply.status == 429, reply.body
        assert reply.body["error"]["code"] == "auth_rate_limited" and reply.body["error"]["field"] is None
        assert "failed authentications" in reply.body["error"]["message"]
        assert 1 <= int(reply.headers["Retry-After"]) <= 20  # 60 s / 3 per failure
    assert tokens.lookups == 3


async def test_a_valid_token_still_works_from_a_limited_address(start: Start) -> None:
    """Behind one address (a proxy, a NAT) a caller whose token was just seen valid is not locked out by
    someone else's bad tokens."""
    tokens = CountingTokens()
    api = await start(tokens=tokens, limits=Limits(auth_failures_per_minute=1))
    good = tokens.add("user", "acme")
    assert (await api.call("GET", "/v1/jobs", "sw_bad")).status == 401
    assert (await api.call("GET", "/v1/jobs", "sw_bad")).status == 429
    assert (await api.call("GET", "/v1/jobs", good)).status == 200


class ForgetfulTokens(CountingTokens):
    """Tokens whose short cache has always just expired: every use is a lookup."""

    def cached(self, token: str) -> Identity | None:
        return None


async def test_a_token_seen_valid_a_while_ago_is_not_locked_out_by_anothers_bad_tokens(start: Start) -> None:
    """The token cache is seconds long; a valid token seen minutes ago from the same address is still
    looked up (and works) while someone else there is past the failure budget."""
    tokens = ForgetfulTokens()
    api = await start(tokens=tokens, limits=Limits(auth_failures_per_minute=1))
    good = tokens.add("user", "acme")
    assert (await api.call("GET", "/v1/jobs", good)).status == 200
    assert (await api.call("GET", "/v1/jobs", "sw_bad")).status == 401
    for _ in range(3):
        assert (await api.call("GET", "/v1/jobs", "sw_bad")).status == 429
    looked_up = tokens.lookups
    assert (await api.call("GET", "/v1/jobs", good)).status == 200
    assert tokens.lookups == looked_up + 1
    await tokens.revoke(good)
    assert (await api.call("GET", "/v1/jobs", good)).status == 401  # vouched for, but checked: revoked


async def test_requests_without_a_token_do_not_use_the_budget(start: Start) -> None:
    """A missing token costs no lookup, so it is a 401 every time and never counts as a failure."""
    api = await start(limits=Limits(auth_failures_per_minute=1))
    for _ in range(5):
        assert (await api.call("GET", "/v1/jobs")).status == 401
    assert (await api.call("GET", "/v1/jobs", "sw_bad")).status == 401
    assert (await api.call("GET", "/v1/jobs", "sw_bad")).status == 429


async def test_a_limited_address_still_reaches_public_routes(start: Start) -> None:
    """Liveness and the API document need no token, so a limited client's bad token there is ignored."""
    api = await start(limits=Limits(auth_failures_per_minute=1))
    assert (await api.call("GET", "/v1/jobs", "sw_bad")).status == 401
    assert (await api.call("GET", "/v1/jobs", "sw_bad")).status == 429
    assert (await api.call("GET", "/healthz", "sw_bad")).status == 200
    assert (await api.call("GET", "/openapi.json", "sw_bad")).status == 200


def test_the_failure_budget_refills_per_client_and_stays_bounded() -> None:
    """Each client has its own bucket, refilled evenly over the minute; at most `max_clients` are kept."""
    clock = Clock()
    limiter = FailureLimiter(per_minute=2, max_clients=3, clock=clock)
    limiter.failed("10.0.0.1")
    limiter.failed("10.0.0.1")
    assert limiter.retry_after("10.0.0.1") == pytest.approx(30.0)
    assert limiter.retry_after("10.0.0.2") == 0.0
    clock.now += 29.0
    assert limiter.retry_after("10.0.0.1") == pytest.approx(1.0)
    clock.now += 1.0
    assert limiter.retry_after("10.0.0.1") == 0.0
    limiter.failed("10.0.0.1")
    assert limiter.retry_after("10.0.0.1") == pytest.approx(30.0)
    for i in range(100):
        limiter.failed(f"192.0.2.{i}")
    assert len(limiter) == 3


@pytest.mark.parametrize(("remote", "client"), [
    ("203.0.113.7", "203.0.113.7"),
    ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"),  # the same /64: one client
    ("::ffff:203.0.113.7", "203.0.113.7"),
    (None, "unknown"),
])  # fmt: skip
def test_clients_are_addresses_and_ipv6_hosts_by_their_64(remote: str | None, client: str) -> None:
    """An IPv6 host has a /64 to pick addresses from, so it is limited as one client."""
    assert client_of(remote) == client


# --------------------------------------------------------------------------- quotes


def offer(site: str, **extra: Any) -> dict[str, Any]:
    return {"site": site, "hub": "guizhou", "model": "A100-80G", "arch": "GPU", "devices": 8, "free": 56,
            "price_cny_per_hour": 10.0, "cost_cny_per_hour": 80.0, "unit_price_cny_per_hour": 10.0,
            "total_cost_cny": 80.0, "latency_ms": 5.0, "est_hours": 1.0, "score": 90.0, "scores": {"price": 100},
            "stack": None, "image": None, "reliability": 100.0, "transfer_hours": 0.0, "transfer_cost_cny": 0.0,
            "finish_hours": 1.0, "compute_cost_cny": 80.0, **extra}  # fmt: skip


async def many_offers(job_id: str, spec: JobSpec) -> dict[str, Any]:
    """A quoter answering more than the cap, with fields the market view leaves out."""
    leak = {"holders": ["j-other-tenant"], "tenant": "initech"}
    return {"candidates": [offer(f"s{i}", **leak) for i in range(MAX_CANDIDATES + 5)], "feasible_sites": 15,
            "what_if": [{"change": f"c{i}", "sites": 1, "more_sites": 1, "text": "t", "best": offer("x", **leak)}
                        for i in range(20)]}  # fmt: skip


async def test_quotes_are_limited_per_token_with_retry_after(start: Start) -> None:
    """Each token has its own bucket of quotes: past it, a 429 naming the limit with Retry-After; another
    token still quotes."""
    buckets = MemoryBuckets(wait_ms=1500)
    api = await start(buckets=buckets, limits=Limits(quote_rate=0.5, quote_burst=2))
    alice, bob = api.tokens.add("user", "acme"), api.tokens.add("user", "acme")
    for _ in range(2):
        assert (await api.call("POST", "/v1/quote", alice, job_body())).status == 200
    refused = await api.call("POST", "/v1/quote", alice, job_body())
    assert refused.status == 429 and refused.body["error"]["code"] == "quote_rate_limited"
    assert "0.5/s in bursts of 2" in refused.body["error"]["message"]
    assert refused.headers["Retry-After"] == "2"
    assert (await api.call("POST", "/v1/quote", bob, job_body())).status == 200
    assert len(api.quoted) == 3
    subjects = {who for _scope, who, _r, _b in buckets.taken}
    assert subjects == {api.tokens.by_token[alice].id, api.tokens.by_token[bob].id}
    assert {(scope, rate, burst) for scope, _w, rate, burst in buckets.taken} == {("quote", 0.5, 2)}


async def test_a_quote_that_is_refused_as_invalid_costs_no_quote(start: Start) -> None:
    """Bad input is a 400 naming the field before the bucket is touched."""
    buckets = MemoryBuckets()
    api = await start(buckets=buckets)
    token = api.tokens.add("user", "acme")
    reply = await api.call("POST", "/v1/quote", token, job_body(resources={"arch": "GPU", "count": 0}))
    assert reply.status == 400 and reply.body["error"]["field"] == "resources.count"
    models = [f"M{i}" for i in range(65)]  # the job schema allows 64
    reply = await api.call("POST", "/v1/quote", token, job_body(resources={"arch": "GPU", "count": 1,
                                                                           "models": models}))  # fmt: skip
    assert reply.status == 400 and reply.body["error"]["field"] == "resources.models"
    reply = await api.call("POST", "/v1/quote", token, data=b"{" + b" " * (70 * 1024) + b"}",
                           headers={"Content-Type": "application/json"})  # fmt: skip
    assert reply.status == 413 and reply.body["error"]["code"] == "too_large"
    assert buckets.taken == [] and api.quoted == []


@pytest.mark.parametrize("raw", ["0", "11", "-1", "ten", "2.5"])
async def test_quote_limit_out_of_range_is_400_naming_it(start: Start, raw: str) -> None:
    api = await start(buckets=MemoryBuckets())
    reply = await api.call("POST", f"/v1/quote?limit={raw}", api.tokens.add("user", "acme"), job_body())
    assert reply.status == 400 and reply.body["error"]["field"] == "limit", reply.body
    assert api.quoted == []


async def test_a_quote_is_capped_and_shows_the_market_only(start: Start) -> None:
    """At most MAX_CANDIDATES candidates (fewer with ?limit=) and 12 what-ifs; each offer carries the site's
    free devices and prices, and nothing the matcher might know of who holds the rest."""
    api = await start(quoter=many_offers)
    token = api.tokens.add("user", "acme")
    full = (await api.call("POST", "/v1/quote", token, job_body())).body
    assert len(full["candidates"]) == MAX_CANDIDATES and len(full["what_if"]) == 12
    for shown in [*full["candidates"], *(w["best"] for w in full["what_if"])]:
        assert set(shown) == set(OFFER_FIELDS) and shown["free"] == 56
    assert "j-other-tenant" not in orjson.dumps(full).decode() and "initech" not in orjson.dumps(full).decode()
    few = (await api.call("POST", "/v1/quote?limit=3", token, job_body())).body
    assert [c["site"] for c in few["candidates"]] == ["s0", "s1", "s2"] and few["feasible_sites"] == 15


# --------------------------------------------------------------------------- what a user sees


async def test_a_jobs_runners_up_show_the_market_only(start: Start) -> None:
    """The decision record's runners-up are shown as offers: site, free devices, prices, scores; nothing
    else that may have been recorded with them."""
    api = await start()
    token = api.tokens.add("user", "acme")
    job_id = (await api.call("POST", "/v1/jobs", token, job_body())).body["id"]
    api.store.place(job_id, "guian-01", "guizhou")
    chosen = offer("guian-01")
    runner = offer("guian-02", holders=["j-other-tenant"], tenant="initech")
    api.store.jobs[job_id]["decision"] = orjson.dumps({"chosen": chosen, "runners_up": [runner]}).decode()
    view = (await api.call("GET", f"/v1/jobs/{job_id}", token)).body
    (shown,) = view["allocation"]["runners_up"]
    assert set(shown) == set(OFFER_FIELDS) and (shown["site"], shown["free"]) == ("guian-02", 56)
    assert "j-other-tenant" not in orjson.dumps(view).decode() and "initech" not in orjson.dumps(view).decode()


async def test_a_user_sees_no_other_tenants_jobs_usage_or_stream(start: Start) -> None:
    """Another tenant's job is a 404 to read or cancel and absent from the list; usage is the user's own
    tenant's; the live stream (every tenant's events) is for operators."""
    api = await start()
    acme, initech = api.tokens.add("user", "acme"), api.tokens.add("user", "initech")
    theirs = (await api.call("POST", "/v1/jobs", initech, job_body(name="secret-project"))).body["id"]
    assert (await api.call("GET", f"/v1/jobs/{theirs}", acme)).status == 404
    assert (await api.call("DELETE", f"/v1/jobs/{theirs}", acme)).status == 404
    listed = (await api.call("GET", "/v1/jobs", acme)).body
    assert listed["jobs"] == []
    assert (await api.call("GET", "/v1/jobs?tenant=initech", acme)).status == 403
    api.queries.usage.extend([{"tenant": "acme", "hub": "guizhou", "device_hours": 1.0, "cost": 10.0},
                              {"tenant": "initech", "hub": "guizhou", "device_hours": 2.0, "cost": 20.0}])  # fmt: skip
    usage = (await api.call("GET", "/v1/usage", acme)).body
    assert [t["tenant"] for t in usage["by_tenant"]] == ["acme"] and usage["total_cost_cny"] == 10.0
    assert (await api.call("GET", "/v1/usage?tenant=*", acme)).status == 403
    assert (await api.call("GET", "/v1/allocations/stream", acme)).status == 403


def test_limits_default_to_the_documented_values() -> None:
    """2 quotes/s in bursts of 10 per token, 30 failed authentications per minute per address; holds of 60 s
    (at most 600 s), 20 standing per tenant; 30 s for a site to accept a job placed from a hold."""
    assert dataclasses.astuple(Limits())[3:] == (2.0, 10, 30, 60.0, 600.0, 20, 30.0)
