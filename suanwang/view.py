"""How events, jobs and sites look in a terminal."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from rich.table import Table

_COLOURS = {
    "allocated": "green",
    "completed": "cyan",
    "failed": "red",
    "requeued": "yellow",
    "cancelled": "magenta",
    "released": "dim",
    "queued": "blue",
    "running": "bright_green",
    "accepted": "dim green",
}


def event_line(event: dict[str, Any]) -> str:
    """One event as a line of rich markup."""
    kind = event.get("type", "?")
    colour = _COLOURS.get(kind, "white")
    clock = time.strftime("%H:%M:%S", time.localtime(event.get("ts", 0) / 1000)) if event.get("ts") else "--:--:--"
    job = event.get("job", "")
    text = f"[dim]{clock}[/] [{colour}]{kind:<9}[/] {job}"
    if kind == "allocated":
        text += (
            f"  {event.get('origin', '?')} → [bold]{event.get('site')}[/] ({event.get('hub')})"
            f"  {event.get('count')}× {event.get('model')} @ {event.get('price')} CNY/h"
            f"  {event.get('latency_ms')} ms"
        )
    elif event.get("site"):
        text += f"  {event.get('site')}"
    if event.get("reason"):
        text += f"  [dim]{event['reason']}[/]"
    return text


def jobs_table(jobs: Iterable[dict[str, Any]]) -> Table:
    table = Table("id", "name", "state", "resources", "origin", "site", "devices", "CNY/h", "waiting / reason")
    for job in jobs:
        res = job["resources"]
        alloc = job.get("allocation") or {}
        want = f"{res['count']}× {res['arch']}" + (f" ({', '.join(res['models'])})" if res.get("models") else "")
        table.add_row(
            job["id"],
            job["name"],
            job["state"],
            want,
            job["origin"],
            alloc.get("site", ""),
            f"{alloc.get('devices', '')} {alloc.get('model', '')}".strip(),
            str(alloc.get("cost_cny_per_hour", "")),
            job.get("waiting") or job.get("reason") or "",
        )
    return table


def sites_table(sites: Iterable[dict[str, Any]]) -> Table:
    table = Table("site", "hub", "status", "pool", "arch", "total", "external", "allocated", "free", "CNY/h")
    for site in sites:
        for i, pool in enumerate(site["pools"]):
            first = i == 0
            table.add_row(
                site["id"] if first else "",
                site["hub"] if first else "",
                site["status"] if first else "",
                pool["model"],
                pool["arch"],
                str(pool["total"]),
                str(pool["in_use_external"]),
                str(pool["allocated"]),
                str(pool["free"]),
                f"{pool['price_cny_per_hour']:g}",
            )
    return table
