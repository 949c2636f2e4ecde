"""Who may call what: the role each route declares is what the auth middleware enforces and what
/openapi.json states, and a route that declares none is closed."""

from __future__ import annotations

from aiohttp import web

from broker.http.app import ROUTES, route_role
from broker.http.routes import ROUTE_TABLE, Route, RouteTable
from tests.http.harness import Api, Start

EXPECTED_ROLES = {
    ("GET", "/healthz"): "public", ("GET", "/openapi.json"): "public", ("GET", "/"): "public",
    ("GET", "/static"): "public",
    ("POST", "/v1/jobs"): "user", ("POST", "/v1/jobs:batch"): "user", ("POST", "/v1/quote"): "user",
    ("GET", "/v1/jobs"): "user",
    ("GET", "/v1/jobs/{id}"): "user", ("DELETE", "/v1/jobs/{id}"): "user", ("GET", "/v1/hubs"): "user",
    ("GET", "/v1/usage"): "user",
    ("GET", "/v1/holds"): "user", ("GET", "/v1/holds/{id}"): "user", ("DELETE", "/v1/holds/{id}"): "user",
    ("GET", "/v1/sites"): "operator", ("GET", "/v1/sites/{id}"): "operator",
    ("POST", "/v1/sites/{id}/reliability:reset"): "operator",
    ("GET", "/v1/allocations/stream"): "operator", ("GET", "/v1/dashboard/summary"): "operator",
    ("GET", "/v1/dashboard/places"): "operator", ("GET", "/v1/dashboard/jobs/{id}/events"): "operator",
    ("GET", "/metrics"): "operator",
    ("GET", "/v1/admin/tokens"): "admin", ("POST", "/v1/admin/tokens"): "admin",
    ("DELETE", "/v1/admin/tokens/{id}"): "admin", ("GET", "/v1/admin/sites"): "admin",
    ("POST", "/v1/admin/sites"): "admin", ("DELETE", "/v1/admin/sites/{id}"): "admin",
}  # fmt: skip


def mounted(app: web.Application) -> set[tuple[str, str]]:
    return {(r.method, r.resource.canonical) for r in app.router.routes() if r.resource and r.method != "HEAD"}


async def test_every_mounted_route_is_declared_with_its_role(api: Api) -> None:
    """The app mounts exactly the declared routes, each with the role the API promises."""
    app = api.client.app
    assert app is not None
    table = app[ROUTE_TABLE]
    assert mounted(app) == {r.key for r in table.routes} == set(EXPECTED_ROLES)
    assert {key: table.role(*key) for key in EXPECTED_ROLES} == EXPECTED_ROLES
    assert all(route_role(*key) == role for key, role in EXPECTED_ROLES.items())


async def test_openapi_states_each_routes_declared_role(api: Api) -> None:
    """/openapi.json has one operation per declared route, with that route's role, and protected ones document
    401 and 403."""
    reply = await api.call("GET", "/openapi.json")
    assert reply.status == 200
    documented = {}
    for path, operations in reply.body["paths"].items():
        for method, operation in operations.items():
            route_path = "/static" if path == "/static/{filename}" else path
            documented[(method.upper(), route_path)] = operation["x-suanwang-role"]
            if operation["x-suanwang-role"] != "public":
                assert {"401", "403"} <= set(operation["responses"]), path
    assert documented == EXPECTED_ROLES
    job_post = reply.body["paths"]["/v1/jobs"]["post"]
    assert job_post["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/JobSpec"}
    assert "shanghai" in reply.body["components"]["schemas"]["JobSpec"]["properties"]["origin"]["enum"]


async def test_no_token_is_401_and_a_low_role_is_403(api: Api) -> None:
    """A protected route without a token is 401 with a Bearer challenge, with an unknown token 401, with a
    token of too low a role 403, and with a high enough one it answers."""
    none = await api.call("GET", "/v1/sites")
    assert none.status == 401 and none.headers["WWW-Authenticate"] == 'Bearer realm="suanwang"'
    assert (await api.call("GET", "/v1/sites", "sw_mistyped")).status == 401
    low = await api.call("GET", "/v1/sites", api.tokens.add("user", "acme"))
    assert low.status == 403 and low.body["error"]["code"] == "forbidden"
    assert (await api.call("GET", "/v1/sites", api.tokens.add("operator", "ops"))).status == 200
    assert (await api.call("GET", "/v1/admin/tokens", api.tokens.add("operator", "ops"))).status == 403
    assert (await api.call("GET", "/v1/admin/tokens", api.tokens.add("admin", "ops"))).status == 200


async def test_public_routes_need_no_token(api: Api) -> None:
    """The public routes answer without a token: health, the document, the dashboard page and its files."""
    for path in ("/healthz", "/openapi.json", "/", "/static/app.js"):
        assert (await api.call("GET", path)).status == 200, path


async def test_only_the_stream_takes_a_token_from_the_query(api: Api) -> None:
    """?access_token= is accepted by the live stream (EventSource sends no headers) and by no other route."""
    operator = api.tokens.add("operator", "ops")
    assert (await api.call("GET", f"/v1/sites?access_token={operator}")).status == 401
    async with api.client.get(f"/v1/allocations/stream?access_token={operator}") as response:
        assert response.status == 200 and response.content_type == "text/event-stream"


async def test_route_without_a_role_needs_admin(start: Start) -> None:
    """A route declared without a role, or mounted without a declaration, is closed: only an admin may call it."""

    async def extra(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    assert Route("GET", "/v1/extra", extra, "no role given").role == "admin"
    assert RouteTable(ROUTES).role("GET", "/v1/extra") == "admin"
    api = await start(prepare=lambda app: app.router.add_get("/v1/extra", extra))
    assert (await api.call("GET", "/v1/extra")).status == 401
    assert (await api.call("GET", "/v1/extra", api.tokens.add("operator", "ops"))).status == 403
    assert (await api.call("GET", "/v1/extra", api.tokens.add("admin", "ops"))).status == 200


async def test_auth_off_lets_every_caller_act_as_admin(start: Start) -> None:
    """With no token store every route answers without a token, as the `default` tenant's admin."""
    api = await start(auth=False)
    assert (await api.call("GET", "/v1/admin/tokens")).status == 200
    reply = await api.call("POST", "/v1/jobs", body={"name": "open", "resources": {"arch": "GPU", "count": 1},
                                                     "origin": "shanghai", "duration_hours": 1})  # fmt: skip
    assert reply.status == 202 and reply.body["tenant"] == "default"
