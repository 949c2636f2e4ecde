"""API identities: bearer tokens with a role and a tenant, and the role each route needs.

A token is shown once when it is made; Redis keeps only its SHA-256, so a copy of the database gives
no working token. Roles are ordered: `user` (its own tenant's jobs) < `operator` (every job, the sites,
the dashboard and the live stream) < `admin` (also tokens and the site registry).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from aiohttp import web

from broker.keys import Keys
from broker.store import _text, now_ms, translated
from suanwang.errors import Forbidden, InvalidInput, NotFound, Unauthorized

ROLES = ("user", "operator", "admin")
PUBLIC = "public"
_RANK = {PUBLIC: -1, "user": 0, "operator": 1, "admin": 2}
TOKEN_PREFIX = "sw_"
TENANT_HEADER = "X-Suanwang-Tenant"
TENANT = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")  # as the job schema's Identifier
CACHE_TTL_S = 2.0  # a revoked token stops working on every replica within this time
CACHE_MAX = 10_000

# The least role each route needs, by (method, route path). A route missing here needs `admin`, so a
# route added without a thought for access is closed rather than open.
ROUTE_ROLES: dict[tuple[str, str], str] = {
    ("GET", "/healthz"): PUBLIC,
    ("GET", "/openapi.json"): PUBLIC,
    ("GET", "/"): PUBLIC,
    ("GET", "/static"): PUBLIC,
    ("POST", "/v1/jobs"): "user",
    ("POST", "/v1/quote"): "user",
    ("GET", "/v1/jobs"): "user",
    ("GET", "/v1/jobs/{id}"): "user",
    ("DELETE", "/v1/jobs/{id}"): "user",
    ("GET", "/v1/hubs"): "user",
    ("GET", "/v1/sites"): "operator",
    ("GET", "/v1/sites/{id}"): "operator",
    ("GET", "/v1/allocations/stream"): "operator",
    ("GET", "/v1/dashboard/summary"): "operator",
    ("GET", "/v1/dashboard/places"): "operator",
    ("GET", "/v1/dashboard/jobs/{id}/events"): "operator",
    ("GET", "/v1/usage"): "user",
    ("GET", "/metrics"): "operator",
    ("GET", "/v1/admin/tokens"): "admin",
    ("POST", "/v1/admin/tokens"): "admin",
    ("DELETE", "/v1/admin/tokens/{id}"): "admin",
    ("GET", "/v1/admin/sites"): "admin",
    ("POST", "/v1/admin/sites"): "admin",
    ("DELETE", "/v1/admin/sites/{id}"): "admin",
}
# Only the live stream takes its token from the query: a browser's EventSource cannot send headers.
QUERY_TOKEN_ROUTES = {("GET", "/v1/allocations/stream")}


def route_role(method: str, path: str) -> str:
    return ROUTE_ROLES.get(("GET" if method == "HEAD" else method, path), "admin")


@dataclass(frozen=True)
class Identity:
    """Who is calling: a token's id, role and tenant."""

    id: str
    role: str
    tenant: str
    name: str = ""
    created: str = ""

    def at_least(self, role: str) -> bool:
        return _RANK[self.role] >= _RANK[role]

    def as_dict(self) -> dict[str, str]:
        return {"id": self.id, "role": self.role, "tenant": self.tenant, "name": self.name, "created": self.created}


# With authentication off every caller is an admin of the `default` tenant that may act for any tenant.
OPEN = Identity(id="", role="admin", tenant="default", name="auth off")


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _decoded(raw: Any) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in raw.items()}


def check_tenant(tenant: str) -> str:
    if not TENANT.match(tenant):
        raise InvalidInput(f"tenant must be 1-64 lowercase letters, digits, '.', '_' or '-', got {tenant[:70]!r}",
                           "tenant")  # fmt: skip
    return tenant


class Tokens:
    """API tokens in Redis, with a short in-process cache of the ones seen valid."""

    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._cache: dict[str, tuple[float, Identity]] = {}

    async def create(self, role: str, tenant: str, name: str = "") -> tuple[str, Identity]:
        """A new token (returned once, never stored) and its identity."""
        if role not in ROLES:
            raise InvalidInput(f"role must be one of {', '.join(ROLES)}", "role")
        check_tenant(tenant)
        if len(name) > 128:
            raise InvalidInput("name must be at most 128 characters", "name")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        identity = Identity(id="tok-" + secrets.token_hex(6), role=role, tenant=tenant, name=name,
                            created=str(now_ms()))  # fmt: skip
        async with translated():
            pipe = self.redis.pipeline(transaction=True)
            pipe.hset(self.keys.token(digest(token)), mapping=identity.as_dict())  # type: ignore[arg-type]
            pipe.hset(self.keys.tokens, identity.id, digest(token))
            await pipe.execute()
        return token, identity

    async def lookup(self, token: str) -> Identity | None:
        hashed = digest(token)
        cached = self._cache.get(hashed)
        now = time.monotonic()
        if cached and cached[0] > now:
            return cached[1]
        async with translated():
            raw = await self.redis.hgetall(self.keys.token(hashed))
        if not raw:
            self._cache.pop(hashed, None)
            return None
        fields = _decoded(raw)
        identity = Identity(fields["id"], fields["role"], fields["tenant"], fields.get("name", ""),
                            fields.get("created", ""))  # fmt: skip
        if len(self._cache) >= CACHE_MAX:
            self._cache.clear()
        self._cache[hashed] = (now + CACHE_TTL_S, identity)
        return identity

    async def list(self) -> list[Identity]:
        async with translated():
            digests = [_text(d) for d in (await self.redis.hgetall(self.keys.tokens)).values()]
            pipe = self.redis.pipeline(transaction=False)
            for hashed in digests:
                pipe.hgetall(self.keys.token(hashed))
            rows = [_decoded(r) for r in await pipe.execute()]
        return sorted((Identity(r["id"], r["role"], r["tenant"], r.get("name", ""), r.get("created", ""))
                       for r in rows if r), key=lambda i: i.created)  # fmt: skip

    async def revoke(self, token_or_id: str) -> Identity:
        """Revoke by the token itself or by its id; NotFound when there is no such token."""
        async with translated():
            if token_or_id.startswith(TOKEN_PREFIX):
                hashed = digest(token_or_id)
            else:
                hashed = _text(await self.redis.hget(self.keys.tokens, token_or_id))
            raw = _decoded(await self.redis.hgetall(self.keys.token(hashed))) if hashed else {}
            if not raw:
                raise NotFound(f"no token {token_or_id[:12]}")
            pipe = self.redis.pipeline(transaction=True)
            pipe.delete(self.keys.token(hashed))
            pipe.hdel(self.keys.tokens, raw["id"])
            await pipe.execute()
        self._cache.pop(hashed, None)
        return Identity(raw["id"], raw["role"], raw["tenant"], raw.get("name", ""), raw.get("created", ""))


TOKENS: web.AppKey[Tokens | None] = web.AppKey("tokens", object)  # type: ignore[arg-type]
IDENTITY: web.RequestKey[Identity] = web.RequestKey("identity", Identity)


def bearer(request: web.Request, allow_query: bool) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    if allow_query:
        return request.query.get("access_token") or None
    return None


@web.middleware
async def authenticate(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                       ) -> web.StreamResponse:  # fmt: skip
    """Find the caller's identity and check its role against the route's; 401 without one, 403 if too low."""
    resource = request.match_info.route.resource
    if resource is None:  # no such route (404) or method (405): nothing to protect
        return await handler(request)
    key = ("GET" if request.method == "HEAD" else request.method, resource.canonical)
    need = route_role(*key)
    tokens = request.app[TOKENS]
    if tokens is None:
        request[IDENTITY] = OPEN
        return await handler(request)
    token = bearer(request, key in QUERY_TOKEN_ROUTES)
    identity = await tokens.lookup(token) if token else None
    if identity is None:
        if need == PUBLIC:
            return await handler(request)
        raise Unauthorized("send a valid API token: Authorization: Bearer <token>" if not token
                           else "the API token is not valid (revoked or mistyped)")  # fmt: skip
    if not identity.at_least(need):
        raise Forbidden(f"this needs the {need} role; the token's role is {identity.role}")
    request[IDENTITY] = identity
    return await handler(request)


def identity_of(request: web.Request) -> Identity:
    """The caller, as `authenticate` found it; a public route's anonymous caller has none (fail closed)."""
    identity = request.get(IDENTITY)
    if identity is None:
        raise Unauthorized("send a valid API token: Authorization: Bearer <token>")
    return identity


def acting_tenant(request: web.Request, named: str | None = None) -> str:
    """The tenant a request acts for: a user's own; an operator or admin may name one (header, query or
    `named`, e.g. the job's body), else their token's."""
    identity = identity_of(request)
    asked = request.headers.get(TENANT_HEADER) or request.query.get("tenant") or named
    if identity.role == "user":
        if asked and asked != identity.tenant:
            raise Forbidden(f"this token acts for tenant {identity.tenant!r} only")
        return identity.tenant
    return check_tenant(asked) if asked else identity.tenant


def may_see(request: web.Request, tenant: str) -> bool:
    """Whether the caller may see (and cancel) a job of `tenant`."""
    identity = identity_of(request)
    return identity.role != "user" or identity.tenant == tenant
