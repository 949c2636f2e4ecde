"""Authentication for the API: the bearer token of each request, the identity it stands for, and the check
of that identity's role against the least role the route declares (broker.http.routes)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from broker.http.deps import DEPS
from broker.http.routes import ADMIN, ROUTE_TABLE, TENANT_HEADER
from broker.model.identity import OPEN, PUBLIC, Identity, check_tenant
from common.errors import Forbidden, Unauthorized

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
    tokens = request.app[DEPS].tokens
    if tokens is None:
        request[IDENTITY] = OPEN
        return await handler(request)
    route = request.app[ROUTE_TABLE].find(request.method, resource.canonical)
    need = route.role if route is not None else ADMIN
    token = bearer(request, route is not None and route.query_token)
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
