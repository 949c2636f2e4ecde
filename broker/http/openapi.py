"""`GET /openapi.json`: an OpenAPI 3.1 document of the API, built from the pydantic models the server
validates with, the routes the app really has, and the role each needs (broker.http.auth.ROUTE_ROLES).

Built on the first request, when every module has added its routes, and encoded once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel

from broker.http import auth
from broker.model import identity
from broker.http.admin import SiteRegistration, TokenRequest
from broker.http.api import GEO
from broker.model.job import JobSpec, JobState

DOC: web.AppKey[list[bytes]] = web.AppKey("openapi", list)
JSON = "application/json"


def ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(required: list[str], **properties: Any) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": properties}


STR, INT, BOOL, NUM = {"type": "string"}, {"type": "integer"}, {"type": "boolean"}, {"type": "number"}
OBJ = {"type": "object"}
NULLABLE_STR = {"type": ["string", "null"]}

# What the server answers with (the request models come from pydantic below).
RESPONSE_SCHEMAS: dict[str, dict[str, Any]] = {
    "Error": _obj(["error"], error=_obj(["code", "message", "field"], code=STR, message=STR, field=NULLABLE_STR)),
    "Job": _obj(
        [
            "id",
            "name",
            "state",
            "tenant",
            "priority",
            "workload",
            "origin",
            "resources",
            "attempts",
            "created",
            "updated",
            "allocation",
        ],
        id=STR,
        name=STR,
        state={"enum": [s.value for s in JobState]},
        tenant=STR,
        priority=STR,
        workload=STR,
        origin=STR,
        resources=OBJ,
        software={"type": "array"},
        residency=OBJ,
        attempts=INT,
        created=NULLABLE_STR,
        updated=NULLABLE_STR,
        allocation={"type": ["object", "null"]},
        waiting=STR,
        reason=STR,
        history={"type": "array", "items": OBJ},
    ),
    "JobList": _obj(["jobs"], jobs={"type": "array", "items": ref("Job")}),
    "Site": _obj(
        ["id", "hub", "status", "pools"],
        id=STR,
        hub=STR,
        cluster=NULLABLE_STR,
        status=STR,
        last_seen=NULLABLE_STR,
        pools={"type": "array", "items": OBJ},
    ),
    "SiteList": _obj(["sites"], sites={"type": "array", "items": ref("Site")}),
    "HubList": _obj(
        ["hubs"],
        hubs={
            "type": "array",
            "items": _obj(
                ["id", "clusters", "sites", "capacity"], id=STR, clusters={"type": "array"}, sites=OBJ, capacity=OBJ
            ),
        },
    ),
    "Health": _obj(["status", "redis", "mqtt"], status={"enum": ["ok", "degraded"]}, redis=BOOL, mqtt=BOOL),
    "Quote": OBJ,
    "DashboardSummary": _obj(
        ["queue", "waiting", "recent_jobs"], queue=OBJ, waiting=OBJ, recent_jobs={"type": "array"}
    ),
    "Places": _obj(
        ["hubs", "clusters", "cities"], hubs={"type": "array"}, clusters={"type": "array"}, cities={"type": "array"}
    ),
    "JobEvents": _obj(["job", "events", "complete"], job=STR, events={"type": "array", "items": OBJ}, complete=BOOL),
    "Token": _obj(["id", "role", "tenant"], id=STR, role={"enum": list(identity.ROLES)}, tenant=STR, name=STR, created=STR),
    "TokenList": _obj(["tokens"], tokens={"type": "array", "items": ref("Token")}),
    "NewToken": _obj(["token", "id", "role", "tenant"], token=STR, id=STR, role=STR, tenant=STR),
    "RevokedToken": _obj(["revoked"], revoked=ref("Token")),
    "RegisteredSite": _obj(["id", "hub"], id=STR, hub=STR, cluster=NULLABLE_STR, created=STR),
    "RegisteredSiteList": _obj(["sites"], sites={"type": "array", "items": ref("RegisteredSite")}),
    "NewSite": _obj(
        ["id", "hub", "mqtt_username", "mqtt_password"], id=STR, hub=STR, mqtt_username=STR, mqtt_password=STR
    ),
    "RevokedSite": _obj(["revoked"], revoked=STR),
}
REQUEST_MODELS: tuple[type[BaseModel], ...] = (JobSpec, TokenRequest, SiteRegistration)


def _param(
    name: str, where: str, schema: dict[str, Any], description: str = "", required: bool = False
) -> dict[str, Any]:
    return {
        "name": name,
        "in": where,
        "required": required or where == "path",
        "schema": schema,
        "description": description,
    }


ID = _param("id", "path", STR)
TENANT_Q = _param("tenant", "query", STR, "Operators and admins: act for this tenant")
TENANT_H = _param(auth.TENANT_HEADER, "header", STR, "Operators and admins: act for this tenant")


@dataclass(frozen=True)
class Op:
    summary: str
    ok: tuple[int, str | None] = (200, None)  # status and response schema (None: no JSON body)
    errors: tuple[int, ...] = ()
    params: tuple[dict[str, Any], ...] = ()
    body: str | None = None  # request schema name
    content: str = JSON
    extra: dict[str, Any] = field(default_factory=dict)


OPS: dict[tuple[str, str], Op] = {
    ("GET", "/healthz"): Op(
        "Liveness and whether Redis and MQTT are reachable", (200, "Health"), extra={"503": "Health"}
    ),
    ("GET", "/openapi.json"): Op("This document", (200, None)),
    ("GET", "/"): Op("The operators' dashboard page", (200, None), content="text/html"),
    ("GET", "/static"): Op(
        "The dashboard's scripts, styles and images",
        (200, None),
        (404,),
        (_param("filename", "path", STR),),
        content="",
    ),
    ("POST", "/v1/jobs"): Op(
        "Submit a job",
        (202, "Job"),
        (400, 409, 413, 415, 429),
        (
            TENANT_H,
            _param(
                "Idempotency-Key",
                "header",
                {"type": "string", "maxLength": 128},
                "A retry with the same key returns the first job",
            ),
        ),
        body="JobSpec",
        extra={"200": "Job"},
    ),
    ("POST", "/v1/quote"): Op(
        "Where a job would go now, taking no capacity", (200, "Quote"), (400, 413, 415), (TENANT_H,), body="JobSpec"
    ),
    ("GET", "/v1/jobs"): Op(
        "The tenant's jobs, newest first",
        (200, "JobList"),
        (400,),
        (
            _param("state", "query", {"enum": [s.value for s in JobState]}),
            _param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 1000}),
            TENANT_Q,
            TENANT_H,
        ),
    ),
    ("GET", "/v1/jobs/{id}"): Op("A job: state, allocation or why it waits, history", (200, "Job"), (404,), (ID,)),
    ("DELETE", "/v1/jobs/{id}"): Op("Cancel a job, releasing what it holds", (200, "Job"), (404, 409), (ID,)),
    ("GET", "/v1/hubs"): Op("Hubs and clusters with their capacity", (200, "HubList")),
    ("GET", "/v1/sites"): Op(
        "Sites with their pools and capacity", (200, "SiteList"), (), (_param("hub", "query", STR),)
    ),
    ("GET", "/v1/sites/{id}"): Op("One site", (200, "Site"), (404,), (ID,)),
    ("GET", "/v1/allocations/stream"): Op(
        "Server-sent events: every allocation, release and state change",
        (200, None),
        (400,),
        (
            _param("Last-Event-ID", "header", STR, "Resume after this event id"),
            _param("last_event_id", "query", STR, "Resume after this event id (for EventSource)"),
            _param("access_token", "query", STR, "The API token, for EventSource, which cannot send headers"),
        ),
        content="text/event-stream",
    ),
    ("GET", "/v1/dashboard/summary"): Op("Queue depth, why jobs wait, recent jobs", (200, "DashboardSummary")),
    ("GET", "/v1/dashboard/places"): Op("Hubs, clusters and cities with coordinates", (200, "Places")),
    ("GET", "/v1/dashboard/jobs/{id}/events"): Op(
        "A job's entries in the event log", (200, "JobEvents"), (404,), (ID,)
    ),
    ("GET", "/v1/admin/tokens"): Op("API tokens (never the tokens themselves)", (200, "TokenList")),
    ("POST", "/v1/admin/tokens"): Op(
        "Create an API token, shown this once", (201, "NewToken"), (400, 413, 415), body="TokenRequest"
    ),
    ("DELETE", "/v1/admin/tokens/{id}"): Op("Revoke a token by id", (200, "RevokedToken"), (404,), (ID,)),
    ("GET", "/v1/admin/sites"): Op("The site registry", (200, "RegisteredSiteList")),
    ("POST", "/v1/admin/sites"): Op(
        "Register a site; its MQTT password is shown this once",
        (201, "NewSite"),
        (400, 409, 413, 415),
        body="SiteRegistration",
    ),
    ("DELETE", "/v1/admin/sites/{id}"): Op("Remove a site from the registry", (200, "RevokedSite"), (404,), (ID,)),
}


def _response(description: str, schema: str | None, content: str = JSON) -> dict[str, Any]:
    if not content:
        return {"description": description}
    if schema is None:
        return {"description": description, "content": {content: {}}}
    return {"description": description, "content": {content: {"schema": ref(schema)}}}


def _operation(method: str, path: str, handler: Any) -> dict[str, Any]:
    role = auth.route_role(method, path)
    doc = (handler.__doc__ or "").strip().splitlines()
    op = OPS.get((method, path)) or Op(doc[0] if doc else f"{method} {path}", content="")
    status, schema = op.ok
    responses = {str(status): _response("Success", schema, op.content)}
    responses.update({code: _response("Success", name) for code, name in op.extra.items()})
    errors = set(op.errors)
    if role != auth.PUBLIC:
        errors |= {401, 403}
    if op.body:
        errors |= {413, 415, 400}
    errors.add(405)
    responses.update({str(code): _response("Error", "Error") for code in sorted(errors)})
    operation: dict[str, Any] = {
        "summary": op.summary, "operationId": method.lower() + re.sub(r"[^A-Za-z0-9]+", "_", path).rstrip("_"),
        "x-suanwang-role": role, "responses": responses,
        "security": [] if role == auth.PUBLIC else [{"bearer": []}] + (
            [{"accessToken": []}] if (method, path) in auth.QUERY_TOKEN_ROUTES else []),
        "parameters": list(op.params),
    }  # fmt: skip
    if role != auth.PUBLIC:
        operation["description"] = f"Needs a token with the {role} role or above."
    if op.body:
        operation["requestBody"] = {"required": True, "content": {JSON: {"schema": ref(op.body)}}}
    return operation


def build(app: web.Application) -> dict[str, Any]:
    schemas: dict[str, Any] = dict(RESPONSE_SCHEMAS)
    for model in REQUEST_MODELS:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    # What only this network knows, stated so that clients (and generated tests) can find valid values.
    geo = app[GEO]
    schemas["JobSpec"]["properties"]["origin"]["enum"] = sorted({*geo.cities, *geo.clusters, *geo.hubs})
    schemas["SiteRegistration"]["properties"]["hub"]["enum"] = sorted(geo.hubs)
    paths: dict[str, dict[str, Any]] = {}
    for route in app.router.routes():
        resource = route.resource
        if resource is None or route.method in ("HEAD", "*"):
            continue
        path = resource.canonical
        doc_path = "/static/{filename}" if path == "/static" else path
        paths.setdefault(doc_path, {})[route.method.lower()] = _operation(route.method, path, route.handler)
    return {
        "openapi": "3.1.0",
        "info": {"title": "Suanwang broker API", "version": "1",
                 "description": "The national compute-network broker. Every route but the public ones needs "
                                "`Authorization: Bearer <token>` (`suanwang token create`); roles are ordered "
                                "user < operator < admin, and each operation's `x-suanwang-role` is the least "
                                "it needs. Errors are `{\"error\": {\"code\", \"message\", \"field\"}}`."},
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"},
                                "accessToken": {"type": "apiKey", "in": "query", "name": "access_token"}},
        },
    }  # fmt: skip


async def serve_document(request: web.Request) -> web.Response:
    cached = request.app[DOC]
    if not cached:
        cached.append(orjson.dumps(build(request.app)))
    return web.Response(body=cached[0], content_type=JSON)


def add_routes(app: web.Application) -> None:
    app[DOC] = []
    app.router.add_get("/openapi.json", serve_document)
