"""Who may do what over HTTP: every route x every caller, on a real broker with tokens required.

Callers: nobody (no token), a user of tenant acme (whose job `own` is), a user of another tenant, an
operator and an admin. Another tenant's job is a 404 exactly like a job that does not exist.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest

from broker.service import Broker
from broker.state.tokens import Tokens
from suanwang.servers import MosquittoServer, RedisServer
from tests.integration.test_end_to_end import job_body
from tests.support import eventually, running_broker

CALLERS = ("none", "user", "other", "operator", "admin")
OWN = "acme"  # the user's tenant, owner of the job `{own}`


@dataclass(frozen=True)
class Case:
    method: str
    path: str  # `{own}`: a job of acme; `{fresh}`: a new job of acme per caller (for cancels)
    expect: tuple[int, int, int, int, int]  # by caller, in CALLERS order
    body: dict[str, Any] | None = None
    headers: tuple[tuple[str, str], ...] = ()


def _all(status: int) -> tuple[int, int, int, int, int]:
    return (status,) * 5


USERS_UP = (401, 200, 200, 200, 200)  # any token
OPERATORS_UP = (401, 403, 403, 200, 200)
ADMINS = (401, 403, 403, 403, 200)
NEW_TOKEN = {"role": "user", "tenant": "initech"}

MATRIX = [
    Case("GET", "/healthz", _all(200)),
    Case("GET", "/openapi.json", _all(200)),
    Case("GET", "/", _all(200)),
    Case("GET", "/static/app.js", _all(200)),
    Case("POST", "/v1/jobs", (401, 202, 202, 202, 202), job_body()),
    Case("POST", "/v1/jobs", (401, 202, 403, 202, 202), job_body(), (("X-Suanwang-Tenant", OWN),)),
    Case("POST", "/v1/jobs", (401, 202, 403, 202, 202), job_body(tenant=OWN)),
    Case("POST", "/v1/quote", USERS_UP, job_body()),
    Case("GET", "/v1/jobs", USERS_UP),
    Case("GET", f"/v1/jobs?tenant={OWN}", (401, 200, 403, 200, 200)),
    Case("GET", "/v1/jobs/{own}", (401, 200, 404, 200, 200)),
    Case("GET", "/v1/jobs/j-no-such-job", (401, 404, 404, 404, 404)),
    Case("DELETE", "/v1/jobs/{fresh}", (401, 200, 404, 200, 200)),
    Case("DELETE", "/v1/jobs/j-no-such-job", (401, 404, 404, 404, 404)),
    Case("GET", "/v1/hubs", USERS_UP),
    Case("GET", "/v1/usage", USERS_UP),
    Case("GET", f"/v1/usage?tenant={OWN}", (401, 200, 403, 200, 200)),
    Case("GET", "/v1/usage?tenant=*", (401, 403, 403, 200, 200)),
    Case("GET", "/v1/sites", OPERATORS_UP),
    Case("GET", "/v1/sites/no-such-site", (401, 403, 403, 404, 404)),
    Case("GET", "/v1/allocations/stream", OPERATORS_UP),
    Case("GET", "/v1/dashboard/summary", OPERATORS_UP),
    Case("GET", "/v1/dashboard/places", OPERATORS_UP),
    Case("GET", "/v1/dashboard/jobs/{own}/events", OPERATORS_UP),
    Case("GET", "/metrics", OPERATORS_UP),
    Case("GET", "/v1/admin/tokens", ADMINS),
    Case("POST", "/v1/admin/tokens", (401, 403, 403, 403, 201), NEW_TOKEN),
    Case("DELETE", "/v1/admin/tokens/tok-000000000000", (401, 403, 403, 403, 404)),
    Case("GET", "/v1/admin/sites", ADMINS),
    Case("POST", "/v1/admin/sites", (401, 403, 403, 403, 201), {"id": "authz-site", "hub": "guizhou"}),
    Case("DELETE", "/v1/admin/sites/no-such-site", (401, 403, 403, 403, 404)),
]


@dataclass
class Deployment:
    broker: Broker
    tokens: dict[str, str]  # caller -> token
    session: aiohttp.ClientSession

    async def call(self, caller: str, method: str, path: str, body: dict[str, Any] | None = None,
                   headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:  # fmt: skip
        sent = dict(headers or {})
        if caller != "none":
            sent["Authorization"] = f"Bearer {self.tokens[caller]}"
        data = orjson.dumps(body) if body is not None else None
        if data is not None:
            sent["Content-Type"] = "application/json"
        async with self.session.request(method, path, data=data, headers=sent) as response:
            if response.content_type == "text/event-stream":
                return response.status, None, response.headers  # a live stream: the status is the answer
            raw = await response.read()
            payload = orjson.loads(raw) if response.content_type == "application/json" else raw
            return response.status, payload, response.headers

    async def job_of_acme(self) -> str:
        status, job, _ = await self.call("user", "POST", "/v1/jobs", job_body())
        assert status == 202, job
        return str(job["id"])


async def _deployment(broker: Broker) -> AsyncIterator[Deployment]:
    made = Tokens(broker.store.redis, broker.store.keys)
    tokens = {caller: (await made.create(role, tenant))[0] for caller, role, tenant in
              [("user", "user", OWN), ("other", "user", "globex"), ("operator", "operator", "ops"),
               ("admin", "admin", "ops")]}  # fmt: skip
    async with aiohttp.ClientSession(base_url=broker.url) as session:
        yield Deployment(broker, tokens, session)


@pytest.fixture
async def deployment(redis_server: RedisServer, own_mosquitto: MosquittoServer, namespace: str
                     ) -> AsyncIterator[Deployment]:  # fmt: skip
    async with running_broker(redis_server, own_mosquitto, namespace, auth="required") as broker:
        async for made in _deployment(broker):
            yield made


async def test_authorization_matrix(deployment: Deployment) -> None:
    """Every route answers every caller with the status its role and tenant call for."""
    own = await deployment.job_of_acme()
    wrong: list[str] = []
    for case in MATRIX:
        for caller, expected in zip(CALLERS, case.expect, strict=True):
            path = case.path.replace("{own}", own)
            if "{fresh}" in path:
                path = path.replace("{fresh}", await deployment.job_of_acme())
            status, body, _ = await deployment.call(caller, case.method, path, case.body, dict(case.headers))
            if status != expected:
                wrong.append(f"{case.method} {case.path} {dict(case.headers)} as {caller}: {status} (want {expected})"
                             f" {str(body)[:160]}")  # fmt: skip
            elif status >= 400:
                assert set(body["error"]) == {"code", "message", "field"}, body
    assert not wrong, "\n".join(wrong)


async def test_another_tenants_job_looks_like_no_job(deployment: Deployment) -> None:
    """The 404 for another tenant's job is word for word the 404 for a job id that never existed."""
    own = await deployment.job_of_acme()
    _, hidden, _ = await deployment.call("other", "GET", f"/v1/jobs/{own}")
    _, missing, _ = await deployment.call("other", "GET", "/v1/jobs/j-0")
    assert hidden["error"]["code"] == missing["error"]["code"] == "not_found"
    assert hidden["error"]["message"].replace(own, "X") == missing["error"]["message"].replace("j-0", "X")
    _, listed, _ = await deployment.call("other", "GET", "/v1/jobs")
    assert listed == {"jobs": []}
    _, seen, _ = await deployment.call("operator", "GET", f"/v1/jobs?tenant={OWN}")
    assert [j["id"] for j in seen["jobs"]] == [own]


async def test_tokens_are_checked(deployment: Deployment) -> None:
    """A missing, malformed or unknown token is a 401 that says how to authenticate; the query token
    works on the stream only."""
    for headers in ({}, {"Authorization": "Basic b3A6b3A="}, {"Authorization": "Bearer sw_nope"}):
        async with deployment.session.get("/v1/jobs", headers=headers) as response:
            assert response.status == 401
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
    operator = deployment.tokens["operator"]
    async with deployment.session.get(f"/v1/sites?access_token={operator}") as response:
        assert response.status == 401
    async with deployment.session.get(f"/v1/allocations/stream?access_token={operator}") as response:
        assert response.status == 200


async def test_revoked_token_stops_working(deployment: Deployment) -> None:
    """A token revoked in Redis (as `suanwang token revoke` does) is refused within the cache time."""
    tokens = Tokens(deployment.broker.store.redis, deployment.broker.store.keys)
    token, identity = await tokens.create("operator", "ops")
    headers = {"Authorization": f"Bearer {token}"}
    async with deployment.session.get("/v1/sites", headers=headers) as response:
        assert response.status == 200
    await tokens.revoke(identity.id)

    async def refused() -> bool:
        async with deployment.session.get("/v1/sites", headers=headers) as response:
            return response.status == 401

    await eventually(refused, "the revoked token to be refused", 5.0)
    status, body, _ = await deployment.call("admin", "GET", "/v1/admin/tokens")
    assert identity.id not in {t["id"] for t in body["tokens"]}
    # revoking over HTTP takes effect on this replica at once
    status, made, _ = await deployment.call("admin", "POST", "/v1/admin/tokens", {"role": "user", "tenant": "x"})
    assert status == 201
    status, _, _ = await deployment.call("admin", "DELETE", f"/v1/admin/tokens/{made['id']}")
    assert status == 200
    async with deployment.session.get("/v1/jobs", headers={"Authorization": f"Bearer {made['token']}"}) as response:
        assert response.status == 401


async def test_submissions_are_rate_limited_per_token(redis_server: RedisServer, own_mosquitto: MosquittoServer,
                                                      namespace: str) -> None:  # fmt: skip
    """Past its burst a token gets 429 with Retry-After; another token is not held back by it."""
    async with running_broker(redis_server, own_mosquitto, namespace, auth="required", submit_rate=0.5,
                              submit_burst=3) as broker:  # fmt: skip
        async for deployment in _deployment(broker):
            statuses = [(await deployment.call("user", "POST", "/v1/jobs", job_body()))[0] for _ in range(3)]
            assert statuses == [202, 202, 202]
            status, body, headers = await deployment.call("user", "POST", "/v1/jobs", job_body())
            assert status == 429 and body["error"]["code"] == "rate_limited", body
            assert 1 <= int(headers["Retry-After"]) <= 2
            assert (await deployment.call("other", "POST", "/v1/jobs", job_body()))[0] == 202
            await asyncio.sleep(int(headers["Retry-After"]))
            assert (await deployment.call("user", "POST", "/v1/jobs", job_body()))[0] == 202


async def test_queued_jobs_per_tenant_are_bounded(redis_server: RedisServer, own_mosquitto: MosquittoServer,
                                                  namespace: str) -> None:  # fmt: skip
    """With the tenant's queue full a submission is a 429 naming the bound; a cancel makes room again; an
    Idempotency-Key replay of a queued job is still answered."""
    async with running_broker(redis_server, own_mosquitto, namespace, auth="required",
                              max_queued_per_tenant=2) as broker:  # fmt: skip
        async for deployment in _deployment(broker):
            first = await deployment.job_of_acme()
            status, _, _ = await deployment.call("user", "POST", "/v1/jobs", job_body(), {"Idempotency-Key": "k1"})
            assert status == 202
            status, body, headers = await deployment.call("user", "POST", "/v1/jobs", job_body())
            assert status == 429 and body["error"]["code"] == "tenant_queue_full", body
            assert "max_queued_per_tenant 2" in body["error"]["message"] and "Retry-After" not in headers
            status, _, _ = await deployment.call("user", "POST", "/v1/jobs", job_body(), {"Idempotency-Key": "k1"})
            assert status == 200  # the replay: no new job, so no bound
            assert (await deployment.call("other", "POST", "/v1/jobs", job_body()))[0] == 202  # another tenant
            assert (await deployment.call("user", "DELETE", f"/v1/jobs/{first}"))[0] == 200
            assert (await deployment.call("user", "POST", "/v1/jobs", job_body()))[0] == 202
