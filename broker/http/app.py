"""The API as one aiohttp application: every route group mounted in one place, behind the error and the
authentication middlewares."""

from __future__ import annotations

from aiohttp import web

from broker.http import admin, dashboard, health, holds, jobs, metrics, openapi, sites, stream, usage
from broker.http.auth import AUTH_FAILURES, FailureLimiter, authenticate
from broker.http.deps import DEPS, Deps
from broker.http.responses import errors
from broker.http.routes import ROUTE_TABLE, Role, Route, RouteTable

ROUTES: tuple[Route, ...] = (
    *health.ROUTES,
    *openapi.ROUTES,
    *jobs.ROUTES,
    *holds.ROUTES,
    *sites.ROUTES,
    *stream.ROUTES,
    *usage.ROUTES,
    *dashboard.ROUTES,
    *metrics.ROUTES,
    *admin.ROUTES,
)


def make_app(deps: Deps) -> web.Application:
    """The API on `deps`; with `deps.tokens` every route but the public ones needs a bearer token."""
    app = web.Application(middlewares=[errors, authenticate], client_max_size=deps.max_body_bytes)
    table = RouteTable(ROUTES)
    app[DEPS] = deps
    app[ROUTE_TABLE] = table
    app[AUTH_FAILURES] = FailureLimiter(deps.limits.auth_failures_per_minute)
    table.mount(app)
    return app


def route_role(method: str, path: str) -> Role:
    """The least role a route of the API needs, by method and path as aiohttp names its resource."""
    return RouteTable(ROUTES).role(method, path)
