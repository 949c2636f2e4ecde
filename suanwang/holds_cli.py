"""`suanwang hold`: take a quote's best place at the quoted price for a while, list and release holds; a
job submitted with `suanwang submit FILE --hold ID` is placed exactly there."""

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


def holds_table(holds: Iterable[dict[str, Any]]) -> Table:
    table = Table("hold", "state", "tenant", "site", "hub", "model", "devices", "CNY/h", "expires in", "job")
    for h in holds:
        left = f"{h['expires_in_s']:g} s" if h["state"] == "held" else "-"
        job = h.get("job") or (f"for {h['for_job']}" if h.get("for_job") else "")
        table.add_row(h["id"], h["state"], h["tenant"], h["site"], h["hub"], h["model"], str(h["devices"]),
                      f"{h['price_cny_per_hour']:g}", left, job)  # fmt: skip
    return table


def register(main: click.Group, run: Callable[[Any], Any], print_json: Callable[[Any], None]) -> None:
    """Add `suanwang hold` to the `suanwang` group; `run` is the CLI's asyncio runner."""
    from suanwang.client import call

    @main.group()
    def hold() -> None:
        """Hold a quoted place at its price for a short time, then submit the job with the hold."""

    @hold.command("take")
    @click.argument("file", type=click.Path(exists=True, dir_okay=False, allow_dash=True))
    @click.option("--site", default=None, help="Hold this candidate instead of the best")
    @click.option("--ttl", type=float, default=None, help="Seconds the hold lasts [broker default: 60]")
    @http_option
    @token_option
    @tenant_option
    @json_option
    def take(file: str, site: str | None, ttl: float | None, http: str, token: str | None, tenant: str | None,
             as_json: bool) -> None:  # fmt: skip
        """Quote the job in FILE.json (- for standard input) and hold its best place."""
        body = sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()
        params = {"hold": "true", **({"hold_site": site} if site else {})}
        if ttl is not None:
            params["hold_ttl_s"] = f"{ttl:g}"
        quoted = run(call(http, "POST", "/v1/quote", body, params=params, tenant=tenant, token=token))
        if as_json:
            print_json(quoted)
            return
        h = quoted["hold"]
        console.print(f"held [bold]{h['id']}[/]: {h['devices']} x {h['model']} at {h['site']} ({h['hub']}) for "
                      f"{h['price_cny_per_hour']:g} CNY/device-hour, for {h['expires_in_s']:g} s")  # fmt: skip
        console.print(f"commit it with: suanwang submit {file} --hold {h['id']}")

    @hold.command("list")
    @http_option
    @token_option
    @tenant_option
    @json_option
    def list_holds(http: str, token: str | None, tenant: str | None, as_json: bool) -> None:
        """Standing holds (operators: every tenant's unless --tenant)."""
        params = {"tenant": tenant} if tenant else None
        result = run(call(http, "GET", "/v1/holds", params=params, token=token))
        print_json(result) if as_json else console.print(holds_table(result["holds"]))

    @hold.command("show")
    @click.argument("hold_id")
    @http_option
    @token_option
    @json_option
    def show(hold_id: str, http: str, token: str | None, as_json: bool) -> None:
        """One hold: where, at what price, until when, and what became of it."""
        result = run(call(http, "GET", f"/v1/holds/{hold_id}", token=token))
        print_json(result) if as_json else console.print(holds_table([result]))

    @hold.command("release")
    @click.argument("hold_id")
    @http_option
    @token_option
    @json_option
    def release(hold_id: str, http: str, token: str | None, as_json: bool) -> None:
        """Give a standing hold's devices back."""
        result = run(call(http, "DELETE", f"/v1/holds/{hold_id}", token=token))
        print_json(result) if as_json else console.print(f"released {hold_id}")
