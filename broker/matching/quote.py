"""Quotes: the ranked places a job could go now, without taking capacity, and what would make it fit
better ("allow 30 ms -> 22% cheaper, 3 more sites"). For a job with data, the trade-off of 东数西算: the best
place near the data against the best place that moves it ("run in 上海/Shanghai now at ¥X, or move the
40 TB to 庆阳/Qingyang, about 8.9 h of transfer, and finish at ¥Z"). Pure, like the matcher it runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from broker.matching import Candidate, Decision, NoFit, Request, match
from broker.matching.data import DataPlan, place_name, site_place
from broker.matching.snapshot import Snapshot

TOP = 10


def _total(c: Candidate) -> float:
    return c.total_cost


def _offer(c: Candidate) -> dict[str, Any]:
    return c.as_dict()


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
    if any(not d.copyable for d in req.datasets):
        yield "data may be copied", req.relaxed(datasets=tuple(replace(d, copyable=True) for d in req.datasets))


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
    if req.datasets:
        body["data_gravity"] = data_gravity(req, snap)
    return body


def data_gravity(req: Request, snap: Snapshot) -> dict[str, Any]:
    """The best place where the job's data already is against the best place that moves it (each by the job's
    own policy), with the run's cost, the transfer's hours and cost, when it would finish and the total."""
    near = match(req.relaxed(data_moves=False), snap, exhaustive=True, keep=1)
    moved = match(req.relaxed(data_moves=True), snap, exhaustive=True, keep=1)
    stay = near.chosen if isinstance(near, Decision) else None
    move = moved.chosen if isinstance(moved, Decision) else None
    data = DataPlan(req, snap)
    locations = {d.location for d in req.datasets}
    here = place_name(snap, next(iter(locations))) if len(locations) == 1 else (
        site_place(snap, stay.site) if stay else "where the data is")  # fmt: skip
    gb = data.moved_gb(snap.tables[move.model], move.row) if move else data.copyable_gb
    places = {"near": here, "moved": site_place(snap, move.site) if move else None}
    body: dict[str, Any] = {"data_gb": round(data.copyable_gb, 3), "near": None, "moved": None, "places": places}
    parts = []
    if stay is not None:
        body["near"] = _offer(stay)
        parts.append(f"run in {here} now at ¥{stay.total_cost:,.0f} (finish in {_hours(stay.finish_hours)})")
    if move is not None:
        body["moved"] = _offer(move)
        parts.append(f"move the {_size(gb)} to {body['places']['moved']} (about {_hours(move.transfer_hours)} of "
                     f"transfer, ¥{move.transfer_cost:,.0f}) and finish in {_hours(move.finish_hours)} at "
                     f"¥{move.total_cost:,.0f} in all")  # fmt: skip
    if stay is not None and move is not None:
        body["cheaper"] = "moved" if move.total_cost < stay.total_cost else "near"
        body["sooner"] = "moved" if move.finish_hours < stay.finish_hours else "near"
        text = ", or ".join(parts)
    elif stay is not None:
        text = parts[0] + (" (the data may not be copied)" if data.restricted else " (nowhere else fits)")
    elif move is not None:
        text = f"nothing fits where the data is: {parts[0]}"
    else:
        text = "nothing fits now, near the data or elsewhere"
    body["text"] = text[0].upper() + text[1:]
    return body


def _hours(h: float) -> str:
    if h < 1:
        return f"{max(h * 60, 1):.0f} min"
    return f"{h:.1f} h".replace(".0 h", " h") if h < 10 else f"{h:,.0f} h"


def _size(gb: float) -> str:
    """Three significant digits in the largest unit that fits (999.9 GB is "1 TB", never "1e+03 GB")."""
    gb = float(f"{gb:.3g}")
    for unit, scale in (("PB", 1e6), ("TB", 1e3)):
        if gb >= scale:
            return f"{float(f'{gb / scale:.3g}'):g} {unit}"
    return f"{gb:g} GB"


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
