"""`suanwang reliability [SITE] [--reset]`: sites ranked by what they delivered of their recent work (the
score the matcher weighs), and an operator's reset of one site's record."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import quote

import click
from rich.console import Console
from rich.table import Table

from suanwang.options import http_option, json_option, token_option

console = Console()

COUNTS = ("accepted", "completed", "timed_out", "rejected", "failed", "lost", "lost_device_hours")


def ranked(sites: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sites best first: by reliability score, then by id."""
    return sorted(sites, key=lambda s: (-s["reliability"]["score"], s["id"]))


def reliability_table(sites: Iterable[dict[str, Any]]) -> Table:
    rows = ranked(sites)
    half = f"; counts halve every {rows[0]['reliability']['half_life_hours']:g} h" if rows else ""
    table = Table("#", "site", "hub", "status", "score", *(c.replace("_", " ") for c in COUNTS), "last counted",
                  title=f"Sites by reliability{half}")  # fmt: skip
    for rank, site in enumerate(rows, 1):
        r = site["reliability"]
        score = r["score"]
        colour = "green" if score >= 90 else "yellow" if score >= 60 else "red"
        table.add_row(str(rank), site["id"], site["hub"], site["status"], f"[{colour}]{score:g}[/]",
                      *(f"{r[c]:.2f}".rstrip("0").rstrip(".") for c in COUNTS), r.get("updated") or "-")  # fmt: skip
    return table


def register(main: click.Group, run: Callable[[Any], Any], print_json: Callable[[Any], None]) -> None:
    """Add `suanwang reliability` to the `suanwang` group; `run` is the CLI's asyncio runner."""
    from suanwang.client import call

    @main.command()
    @click.argument("site", required=False)
    @click.option("--reset", is_flag=True, help="Forget SITE's record: it scores as a new site again (operator)")
    @http_option
    @token_option
    @json_option
    def reliability(site: str | None, reset: bool, http: str, token: str | None, as_json: bool) -> None:
        """Sites ranked by reliability (or one SITE), from their own recent history."""
        if reset and not site:
            raise click.BadParameter("--reset needs the SITE to reset", param_hint="SITE")
        if reset:
            assert site is not None
            done = run(call(http, "POST", f"/v1/sites/{quote(site, safe='')}/reliability:reset", b"{}", token=token))
            if as_json:
                print_json(done)
            else:
                was = "its record is cleared" if done["had_record"] else "it had no record"
                console.print(f"reset [bold]{site}[/]: {was}; score {done['reliability']['score']:g}")
            return
        if site:
            sites = [run(call(http, "GET", f"/v1/sites/{quote(site, safe='')}", token=token))]
        else:
            sites = run(call(http, "GET", "/v1/sites", token=token))["sites"]
        if as_json:
            print_json({"sites": [{"id": s["id"], "hub": s["hub"], "status": s["status"],
                                   "reliability": s["reliability"]} for s in ranked(sites)]})  # fmt: skip
        else:
            console.print(reliability_table(sites))
