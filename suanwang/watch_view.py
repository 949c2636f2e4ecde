"""`suanwang watch` in a terminal: a full-screen live view of the network (rich).

Per-hub utilization bars by architecture (polled from GET /v1/hubs), queue depth and the top reasons
jobs wait (GET /v1/dashboard/summary), and the latest allocations from the live stream.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Any

from rich.console import Group
from rich.layout import Layout
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from common.errors import SuanwangError
from suanwang.client import call, follow
from suanwang.view import event_line

ARCHS = ("CPU", "GPU", "ASIC", "FPGA")
COLOURS = {"CPU": "blue", "GPU": "green", "ASIC": "magenta", "FPGA": "yellow"}
BAR = 12


def bar(used: int, total: int, colour: str) -> Text:
    """A fixed-width bar with the share used, e.g. ████▌······· 38%."""
    if total <= 0:
        return Text("·" * BAR + "   -", style="dim")
    share = min(used / total, 1.0)
    full = int(share * BAR)
    text = Text("█" * full, style=colour)
    text.append("·" * (BAR - full), style="dim")
    text.append(f" {share * 100:3.0f}%")
    return text


def hubs_table(hubs: list[dict[str, Any]]) -> Table:
    table = Table("hub", "side", "sites", *ARCHS, expand=True, box=None, pad_edge=False)
    for hub in hubs:
        cells = []
        for arch in ARCHS:
            cap = hub["capacity"].get(arch, {})
            cells.append(bar(cap.get("allocated", 0) + cap.get("in_use_external", 0), cap.get("total", 0),
                             COLOURS[arch]))  # fmt: skip
        sites = f"{hub['sites']['online']}/{hub['sites']['total']}"
        table.add_row(f"{hub['name_zh']} {hub['id']}", hub["side"], sites, *cells)
    return table


def queue_panel(summary: dict[str, Any] | None) -> Group:
    if summary is None:
        return Group(Text("queue: (needs an operator token)", style="dim"))
    queue = summary.get("queue", {})
    by_priority = "  ".join(f"{p} {n}" for p, n in queue.get("by_priority", {}).items())
    lines: list[Any] = [Text(f"queued {queue.get('total', 0)}   {by_priority}", style="bold")]
    for entry in summary.get("waiting", {}).get("reasons", [])[:5]:
        lines.append(Text(f"  {entry.get('jobs', entry.get('count', '?'))} jobs: {entry.get('reason', entry)}"))
    return Group(*lines)


class WatchView:
    def __init__(self, http: str, token: str | None = None, keep: int = 18) -> None:
        self.http, self.token = http, token
        self.events: deque[dict[str, Any]] = deque(maxlen=keep)
        self.hubs: list[dict[str, Any]] = []
        self.summary: dict[str, Any] | None = None
        self.error = ""

    def render(self) -> Layout:
        layout = Layout()
        layout.split_column(Layout(name="hubs", size=len(self.hubs) + 4), Layout(name="queue", size=9),
                            Layout(name="feed"))  # fmt: skip
        title = "Suanwang 算网 — utilization by hub (allocated + outside use)"
        layout["hubs"].update(Panel(hubs_table(self.hubs), title=title))
        layout["queue"].update(Panel(queue_panel(self.summary), title="queue"))
        feed = Group(*(Text.from_markup(event_line(e)) for e in reversed(self.events)))
        layout["feed"].update(Panel(feed, title="latest allocations" + (f"  [red]{self.error}" if self.error else "")))
        return layout

    async def poll(self) -> None:
        while True:
            try:
                self.hubs = (await call(self.http, "GET", "/v1/hubs", token=self.token))["hubs"]
                try:
                    self.summary = await call(self.http, "GET", "/v1/dashboard/summary", token=self.token)
                except SuanwangError:
                    self.summary = None
                self.error = ""
            except SuanwangError as exc:
                self.error = str(exc)
            await asyncio.sleep(2.0)

    async def stream(self) -> None:
        async for event in follow(self.http, token=self.token):
            if event.get("type") in ("allocated", "completed", "failed", "requeued", "cancelled"):
                self.events.append(event)

    async def run(self) -> None:
        tasks = [asyncio.create_task(self.poll()), asyncio.create_task(self.stream())]
        try:
            with Live(self.render(), refresh_per_second=4, screen=True) as live:
                while True:
                    await asyncio.sleep(0.25)
                    live.update(self.render())
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
