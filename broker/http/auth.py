"""Authentication for the API: the bearer token of each request, its identity, and the role each route
needs."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from broker.model.identity import OPEN, PUBLIC, Identity, check_tenant
from broker.state.tokens import Tokens
from common.errors import Forbidden, Unauthorized

TENANT_HEADER = "X-Suanwang-Tenant"

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
