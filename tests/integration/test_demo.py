"""`suanwang demo` on its own servers: what a newcomer sees with one command."""

from __future__ import annotations

import subprocess
import sys

import orjson
from rich.console import Console

from regions import load_geography
from suanwang.demo import DemoOptions, run_demo


def test_demo_command_allocates_in_every_hub() -> None:
    """The `suanwang demo` command with no servers configured places sample jobs in all 8 hubs."""
    result = subprocess.run(
        [sys.executable, "-m", "suanwang.cli", "demo", "--http", "127.0.0.1:0", "--duration", "15", "--rate", "8",
         "--quiet", "--json"],
        capture_output=True, timeout=90, check=True,
        env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "HOME": "/tmp"},
    )  # fmt: skip
    out = result.stdout.decode()
    assert "Broker HTTP API: http://127.0.0.1:" in out
    summary = orjson.loads(out[out.index("{") :])
    assert set(summary["allocated_by_hub"]) == set(load_geography().hubs)
    assert summary["events"]["allocated"] >= 8
    assert summary["events"].get("completed", 0) >= 1


async def test_demo_runs_on_the_in_process_mqtt_broker() -> None:
    """Without Mosquitto the demo falls back to the embedded amqtt broker and still completes jobs."""
    summary = await run_demo(
        DemoOptions(http="127.0.0.1:0", duration=12, rate=6, quiet=True, embedded_mqtt="amqtt"), Console(quiet=True)
    )
    assert len(summary["allocated_by_hub"]) >= 6
    assert summary["events"]["allocated"] >= 8
    assert summary["events"].get("completed", 0) >= 1
