"""`suanwang quote FILE`: where a job could go now and at what price, without submitting it: the ranked
offers, what loosening a constraint would buy, and for a job with data the trade-off of moving it."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from suanwang.options import http_option, json_option, tenant_option, token_option

console = Console()


def _hours(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def offers_table(offers: Iterable[dict[str, Any]]) -> Table:
    """The offers, best first: where, what, the price, the data's move, when it finishes and the total."""
    table = Table("#", "site", "hub", "devices", "CNY/h", "latency ms", "transfer h", "finish h", "total CNY",
                  "reliability", "score", title="Offers")  # fmt: skip
    for rank, c in enumerate(offers, 1):
        latency = "-" if c.get("latency_ms") is None else f"{c['latency_ms']:g}"
        table.add_row(str(rank), c["site"], c["hub"], f"{c['devices']} x {c['model']}", f"{c['cost_cny_per_hour']:g}",
                      latency, _hours(c.get("transfer_hours")), _hours(c.get("finish_hours")),
                      f"{c['total_cost_cny']:,.0f}", f"{c.get('reliability', 100.0):g}", f"{c['score']:g}")  # fmt: skip
    return table


def print_quote(quote: dict[str, Any]) -> None:
    if quote.get("candidates"):
        console.print(offers_table(quote["candidates"]))
    else:
        console.print(f"[yellow]fits nowhere now[/]: {quote.get('waiting', '')}")
    gravity = quote.get("data_gravity")
    if gravity and gravity.get("text"):
        console.print(f"[bold]data[/]: {gravity['text']}")
    for what_if in quote.get("what_if", []):
        if what_if.get("text"):
            console.print(f"  what if: {what_if['text']}")
    hold = quote.get("hold")
    if hold:
        console.print(f"held [bold]{hold['id']}[/] for {hold['expires_in_s']:g} s")


def register(main: click.Group, run: Callable[[Any], Any], print_json: Callable[[Any], None]) -> None:
    """Add `suanwang quote` to the `suanwang` group; `run` is the CLI's asyncio runner."""
    from suanwang.client import call

    @main.command()
    @click.argument("file", type=click.Path(exists=True, dir_okay=False, allow_dash=True))
    @click.option("--limit", type=click.IntRange(1, 10), default=None, help="At most this many offers [10]")
    @http_option
    @token_option
    @tenant_option
    @json_option
    def quote(file: str, limit: int | None, http: str, token: str | None, tenant: str | None,
              as_json: bool) -> None:  # fmt: skip
        """Quote the job in FILE.json (- for standard input): the offers now, nothing taken."""
        body = sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()
        params = {"limit": str(limit)} if limit else None
        quoted = run(call(http, "POST", "/v1/quote", body, params=params, tenant=tenant, token=token))
        print_json(quoted) if as_json else print_quote(quoted)
