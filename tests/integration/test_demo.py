"""`suanwang demo` on its own servers: what a newcomer sees with one command."""

from __future__ import annotations

import subprocess
import sys

import orjson
from rich.console import Console

from regions import load_geography
from suanwang.demo import DemoOptions, run_demo


def test_demo_command_tours_the_market_then_allocates_in_every_hub() -> None:
    """The `suanwang demo` command with no servers configured first shows, through the HTTP API: a quote that
    weighs moving 40 TB from Shanghai west against running near it, a hold committed at its price, a
    preemptible job giving way to an urgent one and coming back, and a failing site ranked below an equal one;
    then it places sample jobs in all 8 hubs."""
    result = subprocess.run(
        [sys.executable, "-m", "suanwang.cli", "demo", "--http", "127.0.0.1:0", "--duration", "15", "--rate", "8",
         "--quiet", "--json"],
        capture_output=True, timeout=180, check=True,
        env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "HOME": "/tmp"},
    )  # fmt: skip
    out = result.stdout.decode()
    assert "Broker HTTP API: http://127.0.0.1:" in out
    summary = orjson.loads(out[out.index("{") :])
    assert set(summary["allocated_by_hub"]) == set(load_geography().hubs)
    assert summary["events"]["allocated"] >= 8
    assert summary["events"].get("completed", 0) >= 1
    tour = summary["tour"]
    assert not [step for step, seen in tour.items() if "error" in seen], tour
    geo = load_geography()
    gravity = tour["data_gravity"]
    assert gravity["near_hub"] == "yangtze" and geo.hubs[gravity["moved_hub"]].side == "west", gravity
    assert gravity["transfer_hours"] > 1 and "40 TB" in gravity["text"], gravity
    held = tour["hold"]
    assert (held["placed_site"], held["placed_price"], held["hold_state"]) == (held["site"], held["price"], "used")
    preempted = tour["preemption"]
    assert preempted["reason"].startswith(f"preempted by job {preempted['by']}"), preempted
    assert preempted["came_back"] in ("running", "completed")
    ranked = dict(tour["reliability"]["ranked"])
    assert list(ranked)[:2] == ["guian-tour-good", "guian-tour-flaky"], ranked
    assert ranked["guian-tour-flaky"] < ranked["guian-tour-good"] == 100.0 and tour["reliability"]["failed"] >= 1


async def test_demo_runs_on_the_in_process_mqtt_broker() -> None:
    """Without Mosquitto the demo falls back to the embedded amqtt broker and still completes jobs."""
    summary = await run_demo(
        DemoOptions(http="127.0.0.1:0", duration=12, rate=6, quiet=True, embedded_mqtt="amqtt", tour=False),
        Console(quiet=True),
    )
    assert len(summary["allocated_by_hub"]) >= 6
    assert summary["events"]["allocated"] >= 8
    assert summary["events"].get("completed", 0) >= 1
