"""Usage accounting over HTTP: the records of jobs that ended holding devices, by time range, as JSON with
totals by hub and tenant, or as CSV for a spreadsheet."""

from __future__ import annotations

import csv
import io
from datetime import datetime

from aiohttp import web

from broker.http.auth import acting_tenant, identity_of
from broker.http.deps import DEPS
from broker.http.responses import json_response
from broker.http.routes import Route
from broker.http.views import usage_totals
from broker.state.queries import USAGE_FIELDS
from common.errors import Forbidden, InvalidInput


def _time(request: web.Request, name: str) -> int | None:
    """A query time as ms: epoch milliseconds or ISO 8601."""
    raw = request.query.get(name)
    if not raw:
        return None
    if raw.isdigit():
        return int(raw)
    try:
        moment = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInput(f"{name} must be epoch milliseconds or ISO 8601, got {raw!r}", name) from None
    if moment.tzinfo is None:
        raise InvalidInput(f"{name} needs a time zone (e.g. 2026-11-21T00:00:00+08:00)", name)
    return int(moment.timestamp() * 1000)


def _scope(request: web.Request) -> str | None:
    """Whose usage the caller may read: its tenant, or with ?tenant=* (operators and admins) every tenant."""
    if request.query.get("tenant") == "*":
        if not identity_of(request).at_least("operator"):
            raise Forbidden("only operators and admins may read every tenant's usage")
        return None
    return acting_tenant(request)


async def get_usage(request: web.Request) -> web.StreamResponse:
    """Usage records in a time range; `format=csv` (or Accept: text/csv) for a spreadsheet."""
    start, end = _time(request, "from"), _time(request, "to")
    records = await request.app[DEPS].queries.usage_records(start, end, _scope(request))
    wants_csv = request.query.get("format") == "csv" or "text/csv" in request.headers.get("Accept", "")
    if wants_csv:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=USAGE_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
        return web.Response(text=buffer.getvalue(), content_type="text/csv",
                            headers={"Content-Disposition": 'attachment; filename="suanwang-usage.csv"'})  # fmt: skip
    return json_response({"records": records, "by_hub": usage_totals(records, "hub"),
                          "by_tenant": usage_totals(records, "tenant"),
                          "total_cost_cny": round(sum(r["cost"] for r in records), 2)})  # fmt: skip


ROUTES = (
    Route("GET", "/v1/usage", get_usage, "Usage records in a time range; `format=csv` (or Accept: text/csv) for a "
          "spreadsheet", role="user", content=""),
)  # fmt: skip
