"""Real-inventory adapters fed from recorded tool output, against a real Mosquitto and an in-process broker.

Each test has its own Mosquitto (site topics are not namespaced) and its own Redis key namespace.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import orjson

from adapters.runner import run_adapter
from adapters.siteconfig import parse_site_config
from broker.service import Broker
from common.config import MqttTarget
from suanwang.servers import MosquittoServer
from tests.support import eventually

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "adapters"
WAIT = 15.0
T = TypeVar("T")


async def site(broker: Broker, site_id: str) -> dict[str, Any] | None:
    async with aiohttp.ClientSession() as http, http.get(f"{broker.url}/v1/sites/{site_id}") as response:
        return orjson.loads(await response.read()) if response.status == 200 else None


def pools_of(view: dict[str, Any] | None) -> dict[str, tuple[int, int, int]]:
    """model -> (total, in_use_external, free) as the broker shows them."""
    return {p["model"]: (p["total"], p["in_use_external"], p["free"]) for p in (view or {}).get("pools", [])}


async def test_nvidia_smi_adapter_capacity_reaches_the_broker(
    broker: Broker, own_mosquitto: MosquittoServer, tmp_path: Path
) -> None:
    """nvidia-smi output's pools show in GET /v1/sites/{id}; a change in the output follows; stop says offline."""
    gpus, apps = tmp_path / "gpus.csv", tmp_path / "apps.csv"
    shutil.copy(FIXTURES / "nvidia" / "driver550-l20-4090.csv", gpus)
    shutil.copy(FIXTURES / "nvidia" / "driver550-l20-4090-apps.csv", apps)
    config = parse_site_config({"site": "guian-gpu-07", "hub": "guizhou", "cluster": "guian",
                                "pools": {"H20": {"price_cny_per_hour": 7.0, "memory_gb": 96}},
                                "lease": {"time_scale": 3600.0}})  # 1 hour leases 1 s  # fmt: skip
    stop = asyncio.Event()
    target = MqttTarget.from_url(own_mosquitto.url)
    task = asyncio.create_task(run_adapter("nvidia-smi", config, target, interval=0.2, files=[gpus, apps], stop=stop))
    try:
        expected = {"L20": (4, 1, 3), "RTX-4090": (2, 1, 1), "H20": (1, 0, 1)}

        async def shown() -> dict[str, Any] | None:
            view = await site(broker, "guian-gpu-07")
            return view if pools_of(view) == expected and view and view["status"] == "online" else None

        view = await eventually(shown, "the site's pools in the broker")
        assert (view["hub"], view["cluster"]) == ("guizhou", "guian")
        h20 = next(p for p in view["pools"] if p["model"] == "H20")
        assert (h20["price_cny_per_hour"], h20["memory_gb"]) == (7.0, 96)

        # A job placed here is a lease: it holds the devices for its duration, then they come back.
        body = {"name": "lease", "origin": "guiyang", "duration_hours": 1.5,
                "resources": {"arch": "GPU", "models": ["L20"], "count": 3}}  # fmt: skip
        async with aiohttp.ClientSession() as http, http.post(f"{broker.url}/v1/jobs", json=body) as response:
            job_id = orjson.loads(await response.read())["id"]

        async def job_state(wanted: str) -> bool:
            async with aiohttp.ClientSession() as http, http.get(f"{broker.url}/v1/jobs/{job_id}") as response:
                return orjson.loads(await response.read())["state"] == wanted

        await eventually(lambda: job_state("running"), "the lease running")
        assert pools_of(await site(broker, "guian-gpu-07"))["L20"] == (4, 1, 0)
        await eventually(lambda: job_state("completed"), "the lease completed")

        async def freed() -> bool:
            return pools_of(await site(broker, "guian-gpu-07")).get("L20") == (4, 1, 3)

        await eventually(freed, "the leased GPUs back")

        # The 4090's process ends (it stays busy: 93 % utilization) and an L20 starts one: the next read shows it.
        apps.write_text(gpus.read_text().splitlines()[0].split(", ")[1] + ", 5120, 30000\n")

        async def updated() -> dict[str, tuple[int, int, int]] | None:
            pools = pools_of(await site(broker, "guian-gpu-07"))
            return pools if pools.get("RTX-4090") == (2, 1, 1) and pools.get("L20") == (4, 2, 2) else None

        await eventually(updated, "the updated capacity")
    finally:
        stop.set()
        await asyncio.wait_for(task, WAIT)

    async def offline() -> bool:
        view = await site(broker, "guian-gpu-07")
        return bool(view and view["status"] == "offline")

    await eventually(offline, "the site going offline")


async def test_adapter_command_line(broker: Broker, own_mosquitto: MosquittoServer, tmp_path: Path) -> None:
    """`suanwang adapter kubernetes --config ... --from-file ...` publishes the cluster; SIGTERM takes it offline."""
    config = tmp_path / "site.toml"
    config.write_text('site = "wuhu-k8s-01"\nhub = "yangtze"\ncluster = "wuhu"\ninterval = 0.5\n'
                      '[models]\n"cambricon.com/mlu" = "MLU370-X8"\n')  # fmt: skip
    argv = [sys.executable, "-m", "suanwang.cli", "adapter", "kubernetes", "--config", str(config),
            "--mqtt", own_mosquitto.url, "--log-level", "warning",
            "--from-file", str(FIXTURES / "kubernetes" / "nodes.json"),
            "--from-file", str(FIXTURES / "kubernetes" / "pods.json")]  # fmt: skip
    root = Path(__file__).parents[2]
    proc = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=root,
                                                env={**os.environ, "PYTHONPATH": str(root)})  # fmt: skip
    try:
        expected = {"A100-80G": (16, 5, 11), "Ascend-910B": (8, 3, 5), "Ascend-310P": (4, 0, 4), "MLU370-X8": (8, 2, 6)}

        async def shown() -> dict[str, tuple[int, int, int]] | None:
            if proc.returncode is not None:
                raise AssertionError(f"adapter exited: {await proc.communicate()}")
            pools = pools_of(await site(broker, "wuhu-k8s-01"))
            return pools if pools == expected else None

        await eventually(shown, "the cluster's pools in the broker")
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), WAIT) == 0

        async def offline() -> bool:
            view = await site(broker, "wuhu-k8s-01")
            return bool(view and view["status"] == "offline")

        await eventually(offline, "the site going offline")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_adapter_command_rejects_a_bad_config(tmp_path: Path) -> None:
    """A config error stops the adapter at once with the field named, before any connection is tried."""
    config = tmp_path / "site.toml"
    config.write_text('site = "x1"\nhub = "guizhou"\n[pools."A100-80G"]\nprice_cny_per_hour = -3\n')
    gpus = FIXTURES / "nvidia" / "driver470-a100-40g.csv"
    argv = [sys.executable, "-m", "suanwang.cli", "adapter", "nvidia-smi", "--config", str(config),
            "--from-file", str(gpus), "--mqtt", "mqtt://127.0.0.1:1"]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=Path(__file__).parents[2])
    assert result.returncode == 1
    assert "pools.A100-80G.price_cny_per_hour" in result.stderr
