"""Usage accounting: one record per job that ended holding devices (written by transition.lua at that
moment), read back by time range. Stream entry ids are the end times, so a range query is one XRANGE.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from datetime import datetime
from typing import Any

from aiohttp import web

from broker.http.api import STORE, json_response
from broker.http.auth import acting_tenant, identity_of
from broker.state.connection import text, translated
from broker.state.store import Store
from common.errors import Forbidden, InvalidInput

FIELDS = ("job", "tenant", "site", "hub", "arch", "model", "devices", "start", "end", "device_hours", "price",
          "cost", "state")  # fmt: skip
_NUMBERS = {"devices": int, "start": int, "end": int, "device_hours": float, "price": float, "cost": float}
MAX_RECORDS = 100_000


def _record(fields: dict[bytes, bytes]) -> dict[str, Any]:
    record: dict[str, Any] = {}
    for raw_key, raw_value in fields.items():
        key, value = text(raw_key), text(raw_value)
        record[key] = _NUMBERS[key](value) if key in _NUMBERS else value
    return record


async def usage_records(store: Store, start_ms: int | None, end_ms: int | None, tenant: str | None) -> list[dict]:
    """Records of jobs that ended in [start_ms, end_ms], oldest first, for one tenant or all."""
    out: list[dict[str, Any]] = []
    after = str(start_ms) if start_ms is not None else "-"
    until = str(end_ms) if end_ms is not None else "+"
    async with translated():
        while len(out) < MAX_RECORDS:
            page = await store.redis.xrange(store.keys.usage, after, until, count=5000)
            if not page:
                break
            for _entry_id, fields in page:
                record = _record(fields)
                if tenant is None or record.get("tenant") == tenant:
                    out.append(record)
            after = "(" + text(page[-1][0])
    return out


def totals(records: list[dict[str, Any]], by: str) -> list[dict[str, Any]]:
    """Device-hours and cost per `by` (hub, tenant, arch ...), largest cost first."""
    sums: dict[str, dict[str, float]] = defaultdict(lambda: {"jobs": 0, "device_hours": 0.0, "cost": 0.0})
    for record in records:
        row = sums[record.get(by, "")]
        row["jobs"] += 1
        row["device_hours"] += record["device_hours"]
        row["cost"] += record["cost"]
    return sorted(({by: key, "jobs": int(v["jobs"]), "device_hours": round(v["device_hours"], 4),
                    "cost_cny": round(v["cost"], 2)} for key, v in sums.items()),
                  key=lambda r: -r["cost_cny"])  # fmt: skip


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
    records = await usage_records(request.app[STORE], start, end, _scope(request))
    wants_csv = request.query.get("format") == "csv" or "text/csv" in request.headers.get("Accept", "")
    if wants_csv:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
        return web.Response(text=buffer.getvalue(), content_type="text/csv",
                            headers={"Content-Disposition": 'attachment; filename="suanwang-usage.csv"'})  # fmt: skip
    return json_response({"records": records, "by_hub": totals(records, "hub"), "by_tenant": totals(records, "tenant"),
                          "total_cost_cny": round(sum(r["cost"] for r in records), 2)})  # fmt: skip


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/usage", get_usage)
