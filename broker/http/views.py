"""How stored jobs, sites, quotes and usage look to API callers.

What a caller sees of other tenants' load is the market, never the tenants: for each offer (a quote's
candidates and what-ifs, a decision's chosen pool and runners-up) the site, its hub, model, free devices,
prices, latency and scores (`OFFER_FIELDS`, and nothing else even if the matcher records more); a job, its
history and its usage only to its own tenant (or an operator); no other tenant's job ids, names or usage.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

import orjson

from broker.matching.quote import TOP
from broker.model.job import JobState
from broker.model.records import SiteRecord
from broker.model.reliability import Reliability

MAX_CANDIDATES = TOP  # the most candidates a quote answers with
MAX_WHAT_IF = 12  # the most what-ifs (one per constraint loosened; there are about that many)
# What an offer shows: the market (a site's free devices and prices), nothing of who holds the rest.
OFFER_FIELDS = ("site", "hub", "model", "arch", "devices", "free", "price_cny_per_hour", "cost_cny_per_hour",
                "unit_price_cny_per_hour", "total_cost_cny", "latency_ms", "est_hours", "score", "scores", "stack",
                "image", "transfer_hours", "transfer_cost_cny", "finish_hours", "compute_cost_cny",
                "reliability")  # fmt: skip


def iso(ms: str | None) -> str | None:
    """Epoch milliseconds (as stored) as ISO 8601 UTC with milliseconds; None for none."""
    if not ms:
        return None
    return datetime.fromtimestamp(int(ms) / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def offer_view(offer: dict[str, Any]) -> dict[str, Any]:
    """One place a job could go, or went, as callers see it: `OFFER_FIELDS` only."""
    return {k: offer[k] for k in OFFER_FIELDS if k in offer}


def quote_view(quote: dict[str, Any], candidates: int = MAX_CANDIDATES) -> dict[str, Any]:
    """A quote as callers see it: at most `candidates` candidates and `MAX_WHAT_IF` what-ifs, each offer
    reduced to `offer_view`; anything else the quoter answers passes as it is."""
    view = dict(quote)
    if "candidates" in view:
        view["candidates"] = [offer_view(c) for c in view["candidates"][:candidates]]
    if "what_if" in view:
        view["what_if"] = [{**w, "best": offer_view(w["best"])} if "best" in w else dict(w)
                           for w in view["what_if"][:MAX_WHAT_IF]]  # fmt: skip
    gravity = view.get("data_gravity")
    if gravity is not None:  # the two options compared are offers like the others
        view["data_gravity"] = {**gravity, **{k: offer_view(gravity[k]) for k in ("near", "moved") if gravity.get(k)}}
    return view


def job_view(job: dict[str, str]) -> dict[str, Any]:
    """A stored job as users see it: the spec, the state, the allocation or why it waits."""
    spec = orjson.loads(job["spec"])
    state = job["state"]
    view: dict[str, Any] = {
        "id": job["id"], "name": spec["name"], "state": state, "tenant": job["tenant"],
        "priority": spec["priority"], "workload": spec["workload"], "origin": spec["origin"],
        "resources": spec["resources"], "software": spec["software"], "residency": spec["residency"],
        "domestic_only": spec["domestic_only"], "policy": spec["policy"], "weights": spec["weights"],
        "max_latency_ms": spec["max_latency_ms"],
        "max_price_cny_per_hour": spec["max_price_cny_per_hour"], "duration_hours": spec["duration_hours"],
        "labels": spec["labels"], "attempts": int(job.get("attempt", 0)),
        **({"datasets": spec["datasets"]} if spec.get("datasets") else {}),
        "created": iso(job.get("created")), "updated": iso(job.get("updated")),
        "allocation": None,
    }  # fmt: skip
    if job.get("site"):
        view["allocation"] = {
            "site": job["site"], "hub": job.get("hub"), "model": job.get("model"), "arch": job.get("arch"),
            "devices": int(job.get("count", 0)), "price_cny_per_hour": float(job.get("price", 0)),
            "cost_cny_per_hour": round(float(job.get("price", 0)) * int(job.get("count", 0)), 4),
            "latency_ms": float(job.get("latency_ms", 0)), "attempt": int(job.get("attempt", 0)),
            "assigned_at": iso(job.get("assigned_at")), "started_at": iso(job.get("started_at")),
        }  # fmt: skip
        decision = orjson.loads(job.get("decision") or "{}")
        if decision:
            chosen = decision["chosen"]
            view["allocation"].update({
                "cost_cny_per_hour": chosen["cost_cny_per_hour"],
                "unit_price_cny_per_hour": chosen["unit_price_cny_per_hour"],
                "est_hours": chosen["est_hours"], "score": chosen["score"], "scores": chosen["scores"],
                "stack": chosen["stack"], "image": chosen["image"],
                "runners_up": [offer_view(r) for r in decision["runners_up"]],
            })  # fmt: skip
            if chosen.get("transfer_hours") or chosen.get("transfer_cost_cny"):  # the job's data moves there
                view["allocation"].update({k: chosen[k] for k in ("transfer_hours", "transfer_cost_cny",
                                                                  "finish_hours", "total_cost_cny")})  # fmt: skip
    if state == JobState.QUEUED:
        view["waiting"] = job.get("reason") or "waiting for the matcher"
        if job.get("last_site"):
            view["last_site"] = job["last_site"]
    elif job.get("reason"):
        view["reason"] = job["reason"]
    if job.get("finished_at"):
        view["finished"] = iso(job["finished_at"])
    if job.get("deadline"):
        view["deadline"] = iso(job["deadline"])
    return view


def site_view(record: SiteRecord) -> dict[str, Any]:
    """A site with its pools: total, in use outside the broker, allocated by it, and free."""
    meta = record.meta or {}
    pools = []
    for pool in meta.get("pools", []):
        counts = record.counts(pool["model"])
        pools.append({**pool, "total": counts.total, "in_use_external": counts.external,
                      "allocated": counts.allocated, "free": max(counts.free, 0)})  # fmt: skip
    return {
        "id": record.id, "hub": record.hub, "cluster": record.cluster or None, "status": record.status,
        "last_seen": iso(str(record.seen_ms)) if record.seen_ms else None, "pools": pools,
        "energy": meta.get("energy"), "measured_latency_ms": meta.get("latency_ms") or {},
        "measured_bandwidth_gbps": meta.get("bandwidth_gbps") or {},
        "reliability": reliability_view(record.reliability or Reliability()),
    }  # fmt: skip


def reliability_view(r: Reliability) -> dict[str, Any]:
    """A site's reliability: its score, the decayed counts it comes from, the half-life, when last counted."""
    return {**r.as_dict(), "updated": iso(str(r.updated)) if r.updated else None}


def usage_totals(records: list[dict[str, Any]], by: str) -> list[dict[str, Any]]:
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
