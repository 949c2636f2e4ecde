"""Admin routes: API tokens and the site registry over HTTP, the same operations as `suanwang token` and
`suanwang site`."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import Field, StrictBool

from broker.http.deps import DEPS
from broker.http.responses import json_body, json_response
from broker.http.routes import ID, Route
from common.validation import Identifier, Strict, parse


class TokenRequest(Strict):
    role: str = Field(pattern=r"^(user|operator|admin)$", description="user, operator or admin")
    tenant: Identifier = Field(description="The tenant the token acts for")
    name: str = Field(default="", max_length=128, description="A note on who holds it")


class SiteRegistration(Strict):
    id: Identifier = Field(description="The site id, also its MQTT user name")
    hub: Identifier
    cluster: Identifier | None = None
    rotate: StrictBool = Field(default=False, description="Give an already registered site a new password")


async def list_tokens(request: web.Request) -> web.Response:
    return json_response({"tokens": [i.as_dict() for i in await request.app[DEPS].token_admin.list()]})


async def create_token(request: web.Request) -> web.Response:
    """A new token: the only time it is shown."""
    asked = parse(TokenRequest, await json_body(request))
    token, identity = await request.app[DEPS].token_admin.create(asked.role, asked.tenant, asked.name)
    return json_response({"token": token, **identity.as_dict()}, 201)


async def revoke_token(request: web.Request) -> web.Response:
    revoked = await request.app[DEPS].token_admin.revoke(request.match_info["id"])
    return json_response({"revoked": revoked.as_dict()})


async def list_registered_sites(request: web.Request) -> web.Response:
    return json_response({"sites": [s.as_dict() for s in await request.app[DEPS].registry.sites()]})


async def register_site(request: web.Request) -> web.Response:
    """Register a site; the answer holds its MQTT password, shown this once."""
    deps = request.app[DEPS]
    asked = parse(SiteRegistration, await json_body(request))
    site, password = await deps.registry.register(asked.id, asked.hub, asked.cluster, deps.geography,
                                                  rotate=asked.rotate)  # fmt: skip
    body: dict[str, Any] = {**site.as_dict(), "mqtt_username": site.id, "mqtt_password": password}
    return json_response(body, 201)


async def revoke_site(request: web.Request) -> web.Response:
    await request.app[DEPS].registry.revoke(request.match_info["id"])
    return json_response({"revoked": request.match_info["id"]})


ROUTES = (
    Route("GET", "/v1/admin/tokens", list_tokens, "API tokens (never the tokens themselves)", role="admin",
          ok=(200, "TokenList")),
    Route("POST", "/v1/admin/tokens", create_token, "Create an API token, shown this once", role="admin",
          ok=(201, "NewToken"), errors=(400, 413, 415), body=TokenRequest),
    Route("DELETE", "/v1/admin/tokens/{id}", revoke_token, "Revoke a token by id", role="admin",
          ok=(200, "RevokedToken"), errors=(404,), params=(ID,)),
    Route("GET", "/v1/admin/sites", list_registered_sites, "The site registry", role="admin",
          ok=(200, "RegisteredSiteList")),
    Route("POST", "/v1/admin/sites", register_site, "Register a site; its MQTT password is shown this once",
          role="admin", ok=(201, "NewSite"), errors=(400, 409, 413, 415), body=SiteRegistration),
    Route("DELETE", "/v1/admin/sites/{id}", revoke_site, "Remove a site from the registry", role="admin",
          ok=(200, "RevokedSite"), errors=(404,), params=(ID,)),
)  # fmt: skip
