"""A route of the API declared once: method, path, handler, the least role it needs and how the OpenAPI
document describes it. The auth middleware's role table and the document are both read from these."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel

from broker.model.identity import PUBLIC

Role = Literal["public", "user", "operator", "admin"]
ADMIN: Role = "admin"  # the role of a route that declares none: closed rather than open
JSON = "application/json"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def param(name: str, where: str, schema: dict[str, Any], description: str = "", required: bool = False
          ) -> dict[str, Any]:  # fmt: skip
    """An OpenAPI parameter (`where`: path, query or header); path parameters are always required."""
    return {"name": name, "in": where, "required": required or where == "path", "schema": schema,
            "description": description}  # fmt: skip


STR = {"type": "string"}
ID = param("id", "path", STR)
TENANT_HEADER = "X-Suanwang-Tenant"
TENANT_QUERY_PARAM = param("tenant", "query", STR, "Operators and admins: act for this tenant")
TENANT_HEADER_PARAM = param(TENANT_HEADER, "header", STR, "Operators and admins: act for this tenant")


@dataclass(frozen=True)
class Route:
    """One operation. `ok` is the success status and its response schema (a name in the document's
    components, None for a body without a schema); `also_ok` more successes by status; `errors` the error
    statuses besides those every route of its kind can give (401/403 for a protected one, 400/413/415 for one
    with a body, 405); `content` the success media type ('' for none stated). A route with `static` serves the
    files of that folder under its path."""

    method: str
    path: str
    handler: Handler | None
    summary: str
    role: Role = ADMIN
    ok: tuple[int, str | None] = (200, None)
    also_ok: Mapping[int, str] = field(default_factory=dict)
    errors: tuple[int, ...] = ()
    params: tuple[dict[str, Any], ...] = ()
    body: type[BaseModel] | None = None
    content: str = JSON
    query_token: bool = False  # the token may come as ?access_token= (a browser's EventSource sends no headers)
    static: Path | None = None

    @property
    def key(self) -> tuple[str, str]:
        return self.method, self.path

    @property
    def public(self) -> bool:
        return self.role == PUBLIC


class RouteTable:
    """The routes an app has, by (method, path as aiohttp names its resource); HEAD is answered as GET.
    `document` keeps the encoded OpenAPI document of these routes once it is built."""

    def __init__(self, routes: Iterable[Route]) -> None:
        self.routes = tuple(routes)
        self.document: bytes | None = None
        self._by_key: dict[tuple[str, str], Route] = {}
        for route in self.routes:
            if route.key in self._by_key:
                raise ValueError(f"route {route.method} {route.path} declared twice")
            self._by_key[route.key] = route

    def find(self, method: str, path: str) -> Route | None:
        return self._by_key.get(("GET" if method == "HEAD" else method, path))

    def role(self, method: str, path: str) -> Role:
        """The least role the route needs; a route not declared here needs admin."""
        route = self.find(method, path)
        return route.role if route is not None else ADMIN

    def mount(self, app: web.Application) -> None:
        for route in self.routes:
            if route.static is not None:
                app.router.add_static(route.path, route.static, append_version=False)
            elif route.handler is None:
                raise ValueError(f"route {route.method} {route.path} has neither a handler nor files")
            elif route.method == "GET":
                app.router.add_get(route.path, route.handler)  # and HEAD
            else:
                app.router.add_route(route.method, route.path, route.handler)


ROUTE_TABLE: web.AppKey[RouteTable] = web.AppKey("suanwang.routes", RouteTable)
