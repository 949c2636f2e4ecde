"""Quotes: the ranked places a job could go now, without taking capacity, and what would make it fit
better ("allow 30 ms -> 22% cheaper, 3 more sites"). Pure, like the matcher it runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from broker.matching import Candidate, Decision, NoFit, Request, match
from broker.matching.snapshot import Snapshot

TOP = 10


def _total(c: Candidate) -> float:
    return c.cost_per_hour * c.est_hours


def _offer(c: Candidate) -> dict[str, Any]:
    return {**c.as_dict(), "total_cost_cny": round(_total(c), 2)}


def relaxations(req: Request) -> Iterator[tuple[str, Request]]:
    """Each constraint loosened one at a time, with a phrase a user understands."""
    if req.max_latency_ms is not None:
        for extra in (10.0, 20.0):
            cap = req.max_latency_ms + extra
            yield f"allow {cap:g} ms", req.relaxed(max_latency_ms=cap)
        yield "no latency cap", req.relaxed(max_latency_ms=None)
    if req.max_price is not None:
        cap = round(req.max_price * 1.25, 2)
        yield f"pay up to {cap:g} CNY/h", req.relaxed(max_price=cap)
        yield "no price cap", req.relaxed(max_price=None)
    if req.models:
        archs = "/".join(req.archs) if req.archs else "any architecture"
        yield f"any {archs} model", req.relaxed(models=())
    if req.units is not None and req.archs:
        yield "any architecture", req.relaxed(archs=())
    if req.allow_hubs or req.deny_hubs or req.allow_provinces or req.deny_provinces:
        empty: frozenset[str] = frozenset()
        yield (
            "anywhere in the network",
            req.relaxed(allow_hubs=empty, deny_hubs=empty, allow_provinces=empty, deny_provinces=empty),
        )
    if req.domestic_only:
        yield "imported chips allowed", req.relaxed(domestic_only=False)
    if req.interconnect:
        yield "any interconnect", req.relaxed(interconnect=())
    if req.whole_nodes:
        yield "partial nodes", req.relaxed(whole_nodes=False)
    if req.min_memory_gb > 0:
        yield "any device memory", req.relaxed(min_memory_gb=0.0)


def quote(req: Request, snap: Snapshot, top: int = TOP) -> dict[str, Any]:
    """Ranked candidates for `req` and the what-ifs that would widen or cheapen them."""
    base = match(req, snap, exhaustive=True, keep=top)
    body: dict[str, Any] = {"candidates": [], "feasible_sites": 0, "what_if": []}
    if isinstance(base, Decision):
        ranked = [base.chosen, *base.runners_up]
        body["candidates"] = [_offer(c) for c in ranked]
        body["feasible_sites"] = base.feasible_sites
    else:
        body["waiting"] = base.message
        body["reasons"] = [{"reason": r, "sites": n} for r, n in base.reasons]
    for label, relaxed in relaxations(req):
        alt = match(relaxed, snap, exhaustive=True, keep=1)
        if isinstance(alt, NoFit):
            continue
        entry = _compare(label, base, alt)
        if entry is not None:
            body["what_if"].append(entry)
    body["what_if"].sort(key=lambda e: (-e["more_sites"], -e.get("cheaper_pct", 0.0)))
    return body


def _compare(label: str, base: Decision | NoFit, alt: Decision) -> dict[str, Any] | None:
    best = alt.chosen
    entry: dict[str, Any] = {"change": label, "sites": alt.feasible_sites, "best": _offer(best)}
    if isinstance(base, NoFit):
        entry["more_sites"] = alt.feasible_sites
        n = alt.feasible_sites
        entry["text"] = f"{label} -> fits: {n} site{'s' if n != 1 else ''}, best {best.site} at {_total(best):,.0f} CNY"
        return entry
    more = alt.feasible_sites - base.feasible_sites
    cheaper = 100.0 * (1.0 - _total(best) / _total(base.chosen)) if _total(base.chosen) > 0 else 0.0
    if more <= 0 and cheaper < 0.5:
        return None  # loosening this changes nothing worth saying
    entry["more_sites"] = more
    entry["cheaper_pct"] = round(cheaper, 1)
    sites = f"{more} more site{'s' if more != 1 else ''}"
    parts = ([f"{cheaper:.0f}% cheaper"] if cheaper >= 0.5 else []) + ([sites] if more > 0 else [])
    entry["text"] = f"{label} -> {', '.join(parts)}"
    return entry
