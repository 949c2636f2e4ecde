"""`GET /openapi.json`: an OpenAPI 3.1 document of the API, built from the routes the app mounts (each with
the role it needs and how it answers, broker.http.routes) and the pydantic models the server validates
request bodies with. Built on the first request and encoded once.
"""

from __future__ import annotations

import re
from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel

from broker.http.deps import DEPS
from broker.http.routes import JSON, ROUTE_TABLE, Route, RouteTable
from broker.model.identity import ROLES
from broker.model.job import JobState
from regions import Geography


def ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(required: list[str], **properties: Any) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": properties}


STR, INT, BOOL, NUM = {"type": "string"}, {"type": "integer"}, {"type": "boolean"}, {"type": "number"}
OBJ = {"type": "object"}
NULLABLE_STR = {"type": ["string", "null"]}

# What the server answers with (request bodies are described by the routes' pydantic models).
RESPONSE_SCHEMAS: dict[str, dict[str, Any]] = {
    "Error": _obj(["error"], error=_obj(["code", "message", "field"], code=STR, message=STR, field=NULLABLE_STR)),
    "Job": _obj(
        ["id", "name", "state", "tenant", "priority", "workload", "origin", "resources", "attempts", "created",
         "updated", "allocation"],
        id=STR, name=STR, state={"enum": [s.value for s in JobState]}, tenant=STR, priority=STR, workload=STR,
        origin=STR, resources=OBJ, software={"type": "array"}, residency=OBJ, attempts=INT, created=NULLABLE_STR,
        updated=NULLABLE_STR, allocation={"type": ["object", "null"]}, waiting=STR, reason=STR,
        history={"type": "array", "items": OBJ}, datasets={"type": "array", "items": OBJ},
    ),
    "JobList": _obj(["jobs"], jobs={"type": "array", "items": ref("Job")}),
    "JobBatchResult": _obj(["jobs"], jobs={"type": "array", "items": _obj(
        ["status"], status=INT, job=ref("Job"),
        error=_obj(["code", "message", "field"], code=STR, message=STR, field=NULLABLE_STR))}),
    "Site": _obj(["id", "hub", "status", "pools"], id=STR, hub=STR, cluster=NULLABLE_STR, status=STR,
                 last_seen=NULLABLE_STR, pools={"type": "array", "items": OBJ}, reliability=ref("Reliability")),
    "Reliability": _obj(["score", "half_life_hours"], score=NUM, accepted=NUM, completed=NUM, timed_out=NUM,
                        rejected=NUM, failed=NUM, lost=NUM, lost_device_hours=NUM, half_life_hours=NUM,
                        updated=NULLABLE_STR),
    "ReliabilityReset": _obj(["site", "had_record", "reliability"], site=STR, had_record=BOOL,
                             reliability=ref("Reliability")),
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
    "Offer": _obj(
        ["site", "hub", "model", "devices", "price_cny_per_hour", "cost_cny_per_hour", "total_cost_cny", "score"],
        site=STR, hub=STR, model=STR, arch=STR, devices=INT, free=INT, price_cny_per_hour=NUM, cost_cny_per_hour=NUM,
        unit_price_cny_per_hour=NUM, latency_ms={"type": ["number", "null"]}, est_hours=NUM, score=NUM, scores=OBJ,
        stack=NULLABLE_STR, image=NULLABLE_STR, reliability=NUM, transfer_hours=NUM, transfer_cost_cny=NUM,
        finish_hours=NUM, compute_cost_cny=NUM, total_cost_cny=NUM,
    ),
    "DataGravity": _obj(
        ["data_gb", "near", "moved", "places", "text"], data_gb=NUM,
        near={"oneOf": [ref("Offer"), {"type": "null"}]}, moved={"oneOf": [ref("Offer"), {"type": "null"}]},
        places=OBJ, cheaper={"enum": ["near", "moved"]}, sooner={"enum": ["near", "moved"]}, text=STR,
    ),
    "Quote": _obj(
        [], candidates={"type": "array", "items": ref("Offer")}, feasible_sites=INT, waiting=STR,
        reasons={"type": "array", "items": OBJ}, what_if={"type": "array", "items": OBJ},
        data_gravity=ref("DataGravity"), hold=ref("Hold"),
    ),
    "Hold": _obj(
        ["id", "state", "tenant", "site", "hub", "model", "devices", "price_cny_per_hour", "created", "expires"],
        id=STR, state={"enum": ["held", "used", "expired", "released"]}, tenant=STR, site=STR, hub=STR, model=STR,
        arch=STR, devices=INT, price_cny_per_hour={"type": "number"}, cost_cny_per_hour={"type": "number"},
        created=STR, expires=STR, expires_in_s={"type": "number"}, offer=OBJ, job=NULLABLE_STR, for_job=NULLABLE_STR,
        ended=STR, reason=STR,
    ),
    "HoldList": _obj(["holds"], holds={"type": "array", "items": ref("Hold")}),
    "DashboardSummary": _obj(
        ["queue", "waiting", "recent_jobs"], queue=OBJ, waiting=OBJ, recent_jobs={"type": "array"},
        holds=_obj(["standing", "preemptions"], standing={"type": "array", "items": ref("Hold")}, more=BOOL,
                   preemptions={"type": "array", "items": OBJ}),
    ),
    "Places": _obj(
        ["hubs", "clusters", "cities"], hubs={"type": "array"}, clusters={"type": "array"}, cities={"type": "array"}
    ),
    "JobEvents": _obj(["job", "events", "complete"], job=STR, events={"type": "array", "items": OBJ}, complete=BOOL),
    "Token": _obj(["id", "role", "tenant"], id=STR, role={"enum": list(ROLES)}, tenant=STR, name=STR,
                  created=STR),
    "TokenList": _obj(["tokens"], tokens={"type": "array", "items": ref("Token")}),
    "NewToken": _obj(["token", "id", "role", "tenant"], token=STR, id=STR, role=STR, tenant=STR),
    "RevokedToken": _obj(["revoked"], revoked=ref("Token")),
    "RegisteredSite": _obj(["id", "hub"], id=STR, hub=STR, cluster=NULLABLE_STR, created=STR),
    "RegisteredSiteList": _obj(["sites"], sites={"type": "array", "items": ref("RegisteredSite")}),
    "NewSite": _obj(
        ["id", "hub", "mqtt_username", "mqtt_password"], id=STR, hub=STR, mqtt_username=STR, mqtt_password=STR
    ),
    "RevokedSite": _obj(["revoked"], revoked=STR),
}  # fmt: skip


def _response(description: str, schema: str | None, content: str = JSON) -> dict[str, Any]:
    if not content:
        return {"description": description}
    if schema is None:
        return {"description": description, "content": {content: {}}}
    return {"description": description, "content": {content: {"schema": ref(schema)}}}


def operation(route: Route) -> dict[str, Any]:
    """The route as an OpenAPI operation; a protected one also answers 401 and 403 (and 429 to an address past
    its failed authentications), one with a body 400, 413 and 415, and every one 405."""
    status, schema = route.ok
    responses = {str(status): _response("Success", schema, route.content)}
    responses.update({str(code): _response("Success", name) for code, name in route.also_ok.items()})
    errors = set(route.errors)
    if not route.public:
        errors |= {401, 403, 429}
    if route.body is not None:
        errors |= {413, 415, 400}
    errors.add(405)
    responses.update({str(code): _response("Error", "Error") for code in sorted(errors)})
    method, path = route.key
    op: dict[str, Any] = {
        "summary": route.summary, "operationId": method.lower() + re.sub(r"[^A-Za-z0-9]+", "_", path).rstrip("_"),
        "x-suanwang-role": route.role, "responses": responses,
        "security": [] if route.public else [{"bearer": []}] + ([{"accessToken": []}] if route.query_token else []),
        "parameters": list(route.params),
    }  # fmt: skip
    if not route.public:
        op["description"] = f"Needs a token with the {route.role} role or above."
    if route.body is not None:
        op["requestBody"] = {"required": True, "content": {JSON: {"schema": ref(route.body.__name__)}}}
    return op


def document_path(route: Route) -> str:
    """The route's path in the document: a folder of files is documented as one file of it."""
    return route.path.rstrip("/") + "/{filename}" if route.static is not None else route.path


def build(table: RouteTable, geo: Geography) -> dict[str, Any]:
    schemas: dict[str, Any] = dict(RESPONSE_SCHEMAS)
    models: dict[str, type[BaseModel]] = {r.body.__name__: r.body for r in table.routes if r.body is not None}
    for name, model in models.items():
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[name] = schema
    # What only this network knows, stated so that clients (and generated tests) can find valid values.
    if "JobSpec" in schemas:
        schemas["JobSpec"]["properties"]["origin"]["enum"] = sorted({*geo.cities, *geo.clusters, *geo.hubs})
    if "SiteRegistration" in schemas:
        schemas["SiteRegistration"]["properties"]["hub"]["enum"] = sorted(geo.hubs)
    paths: dict[str, dict[str, Any]] = {}
    for route in table.routes:
        paths.setdefault(document_path(route), {})[route.method.lower()] = operation(route)
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
    table = request.app[ROUTE_TABLE]
    if table.document is None:
        table.document = orjson.dumps(build(table, request.app[DEPS].geography))
    return web.Response(body=table.document, content_type=JSON)


ROUTES = (Route("GET", "/openapi.json", serve_document, "This document", role="public"),)
