"""Admin routes: API tokens and the site registry over HTTP, the same operations as `suanwang token` and
`suanwang site`."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import Field

from broker.http.api import GEO, STORE, json_response
from broker.http.auth import TOKENS
from broker.state.registry import SiteRegistry
from broker.state.tokens import Tokens
from common.errors import InvalidInput
from common.validation import Identifier, Strict, parse


class TokenRequest(Strict):
    role: str = Field(pattern=r"^(user|operator|admin)$", description="user, operator or admin")
    tenant: Identifier = Field(description="The tenant the token acts for")
    name: str = Field(default="", max_length=128, description="A note on who holds it")


class SiteRegistration(Strict):
    id: Identifier = Field(description="The site id, also its MQTT user name")
    hub: Identifier
    cluster: Identifier | None = None
    rotate: bool = Field(default=False, description="Give an already registered site a new password")


def _tokens(request: web.Request) -> Tokens:
    """The app's own token store when auth is on, so a revocation also clears this replica's cache."""
    store = request.app[STORE]
    return request.app[TOKENS] or Tokens(store.redis, store.keys)


def _registry(request: web.Request) -> SiteRegistry:
    store = request.app[STORE]
    return SiteRegistry(store.redis, store.keys)


async def _body(request: web.Request) -> bytes:
    if request.content_type != "application/json":
        raise InvalidInput("send application/json", None, code="unsupported_media_type")
    return await request.read()


async def list_tokens(request: web.Request) -> web.Response:
    return json_response({"tokens": [i.as_dict() for i in await _tokens(request).list()]})


async def create_token(request: web.Request) -> web.Response:
    """A new token: the only time it is shown."""
    asked = parse(TokenRequest, await _body(request))
    token, identity = await _tokens(request).create(asked.role, asked.tenant, asked.name)
    return json_response({"token": token, **identity.as_dict()}, 201)


async def revoke_token(request: web.Request) -> web.Response:
    return json_response({"revoked": (await _tokens(request).revoke(request.match_info["id"])).as_dict()})


async def list_registered_sites(request: web.Request) -> web.Response:
    return json_response({"sites": [s.as_dict() for s in await _registry(request).sites()]})


async def register_site(request: web.Request) -> web.Response:
    """Register a site; the answer holds its MQTT password, shown this once."""
    asked = parse(SiteRegistration, await _body(request))
    site, password = await _registry(request).register(asked.id, asked.hub, asked.cluster, request.app[GEO],
                                                       rotate=asked.rotate)  # fmt: skip
    body: dict[str, Any] = {**site.as_dict(), "mqtt_username": site.id, "mqtt_password": password}
    return json_response(body, 201)


async def revoke_site(request: web.Request) -> web.Response:
    await _registry(request).revoke(request.match_info["id"])
    return json_response({"revoked": request.match_info["id"]})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/admin/tokens", list_tokens)
    app.router.add_post("/v1/admin/tokens", create_token)
    app.router.add_delete("/v1/admin/tokens/{id}", revoke_token)
    app.router.add_get("/v1/admin/sites", list_registered_sites)
    app.router.add_post("/v1/admin/sites", register_site)
    app.router.add_delete("/v1/admin/sites/{id}", revoke_site)
