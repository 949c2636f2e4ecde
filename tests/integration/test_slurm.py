"""The Slurm adapter end to end against a real Slurm controller and node daemon (Debian's slurm-wlm).

The fixture starts munged, slurmctld and slurmd on this machine in a temp dir with a private
slurm.conf (one node `localhost` with four fake a100 GPUs, private ports, private munge socket),
installing slurm-wlm and munge with apt-get if they are missing. A job submitted to Suanwang over
HTTP is placed on the Slurm site, runs as a real Slurm job, completes, and the capacity comes back;
a second job is cancelled through the broker and becomes an scancel.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import orjson
import pytest

from adapters.runner import run_adapter
from adapters.siteconfig import parse_site_config
from broker.service import Broker
from common.config import MqttTarget
from suanwang.servers import MosquittoServer, free_port
from tests.support import eventually

WAIT = 30.0
SITE = "guian-hpc-01"
DAEMONS = {"slurmctld": "slurm-wlm", "slurmd": "slurm-wlm", "sbatch": "slurm-wlm", "munged": "munge"}
T = TypeVar("T")


async def site(broker: Broker, site_id: str) -> dict[str, Any] | None:
    async with aiohttp.ClientSession() as http, http.get(f"{broker.url}/v1/sites/{site_id}") as response:
        return orjson.loads(await response.read()) if response.status == 200 else None


def pools_of(view: dict[str, Any] | None) -> dict[str, tuple[int, int, int]]:
    """model -> (total, in_use_external, free) as the broker shows them."""
    return {p["model"]: (p["total"], p["in_use_external"], p["free"]) for p in (view or {}).get("pools", [])}


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    env: dict[str, str]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def run(self, *argv: str) -> str:
        return subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=30).stdout

    def logs(self) -> str:
        logs = sorted(self.root.glob("*.log"))
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}" for p in logs)


def _install_missing() -> str | None:
    """apt-get install what is missing; the reason it cannot be had, or None."""
    missing = sorted({pkg for binary, pkg in DAEMONS.items() if not shutil.which(binary)})
    if not missing:
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return f"{', '.join(missing)} not installed, and apt-get is unavailable (needs root on Debian)"
    result = subprocess.run(["apt-get", "install", "-y", "-q", *missing], capture_output=True, text=True,
                            timeout=600, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})  # fmt: skip
    if result.returncode != 0:
        return f"apt-get install {' '.join(missing)} failed: {result.stderr.strip()[-500:]}"
    return None


def _slurm_conf(root: Path) -> str:
    # select/cons_tres for per-GPU scheduling; linuxproc + task/none need no cgroups (none in a container);
    # no accounting daemon, so finished jobs are followed with squeue/scontrol while slurmctld keeps them.
    return f"""ClusterName=suanwangtest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge.sock
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
GresTypes=gpu
MinJobAge=600
NodeName=localhost NodeAddr=127.0.0.1 CPUs={os.cpu_count() or 1} RealMemory=1000 Gres=gpu:a100:4 State=UNKNOWN
PartitionName=gpu Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def _start(cluster: SlurmCluster, argv: list[str], log: str) -> None:
    out = (cluster.root / log).open("wb")
    cluster.procs.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=cluster.env,
                                          start_new_session=True))  # fmt: skip


def _wait_for(check: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return False


@pytest.fixture
def slurm_cluster() -> Iterator[SlurmCluster]:
    why = _install_missing()
    if why:
        pytest.skip(f"Slurm is not available: {why}")
    root = Path(tempfile.mkdtemp(prefix="sw-slurm-"))  # short: the munge socket path has a length limit
    cluster = SlurmCluster(root, root / "slurm.conf", {**os.environ, "SLURM_CONF": str(root / "slurm.conf")})
    try:
        for sub in ("state", "spool", "dev"):
            (root / sub).mkdir()
        key = root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        # Fake device files: slurmd only needs a path per GPU when nothing checks the hardware.
        for i in range(4):
            (root / "dev" / f"gpu{i}").touch()
        gres = f"AutoDetect=off\nNodeName=localhost Name=gpu Type=a100 File={root}/dev/gpu[0-3]\n"
        (root / "gres.conf").write_text(gres)
        cluster.conf.write_text(_slurm_conf(root))
        _start(cluster, ["munged", "-F", "--force", f"--socket={root}/munge.sock", f"--key-file={key}",
                         f"--log-file={root}/munged.log", f"--pid-file={root}/munged.pid",
                         f"--seed-file={root}/munged.seed"], "munged.out.log")  # fmt: skip
        if not _wait_for((root / "munge.sock").exists, 10):
            pytest.fail(f"munged did not start:\n{cluster.logs()}")
        _start(cluster, ["slurmctld", "-D", "-f", str(cluster.conf)], "slurmctld.out.log")
        _start(cluster, ["slurmd", "-D", "-f", str(cluster.conf), "-N", "localhost"], "slurmd.out.log")

        def node_idle() -> bool:
            return "State=IDLE" in cluster.run("scontrol", "show", "node", "localhost", "--oneliner")

        if not _wait_for(node_idle, WAIT):
            pytest.fail(f"slurmctld/slurmd did not bring node localhost to IDLE within {WAIT:.0f} s:\n{cluster.logs()}")
        yield cluster
    finally:
        for proc in reversed(cluster.procs):
            proc.terminate()
        for proc in reversed(cluster.procs):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(root, ignore_errors=True)


async def call(broker: Broker, method: str, path: str, body: Any = None) -> Any:
    async with aiohttp.ClientSession() as http, http.request(method, broker.url + path, json=body) as response:
        payload = orjson.loads(await response.read())
        assert response.status < 300, payload
        return payload


def job(count: int, hours: float) -> dict[str, Any]:
    return {"name": "slurm-e2e", "workload": "training", "origin": "guiyang", "duration_hours": hours,
            "resources": {"arch": "GPU", "models": ["A100-80G"], "count": count}}  # fmt: skip


async def test_slurm_site_runs_broker_jobs(
    slurm_cluster: SlurmCluster, broker: Broker, own_mosquitto: MosquittoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job placed on the Slurm site runs as a real Slurm job, completes and frees the capacity; a cancel scancels."""
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))  # for the adapter's sbatch/squeue/scontrol
    config = parse_site_config({
        "site": SITE, "hub": "guizhou", "cluster": "guian", "models": {"gpu:a100": "A100-80G"},
        "slurm": {"time_scale": 720.0, "workdir": str(slurm_cluster.root)},  # 1 hour runs 5 s
    })  # fmt: skip
    stop = asyncio.Event()
    adapter = asyncio.create_task(
        run_adapter("slurm", config, MqttTarget.from_url(own_mosquitto.url), interval=0.3, stop=stop)
    )
    try:

        async def capacity(expected: tuple[int, int, int]) -> dict[str, Any] | None:
            view = await site(broker, SITE)
            return view if view and view["status"] == "online" and pools_of(view).get("A100-80G") == expected else None

        await eventually(lambda: capacity((4, 0, 4)), "the Slurm site's 4 GPUs in the broker", WAIT)

        # 1. A job runs to completion as a Slurm job.
        job_id = (await call(broker, "POST", "/v1/jobs", job(count=2, hours=1)))["id"]

        async def state(wanted: str) -> dict[str, Any] | None:
            found = await call(broker, "GET", f"/v1/jobs/{job_id}")
            return found if found["state"] == wanted else None

        running = await eventually(lambda: state("running"), "the job running", WAIT)
        assert running["allocation"]["site"] == SITE
        line = slurm_cluster.run("squeue", "-h", "-n", job_id, "-o", "%i|%j|%T|%b").strip()
        slurm_id, name, slurm_state, gres = line.split("|")
        assert (name, slurm_state) == (job_id, "RUNNING") and "a100:2" in gres, line
        # While it runs the broker counts it as allocated, and the site does not count it again as outside use.
        view = await eventually(lambda: capacity((4, 0, 2)), "2 GPUs allocated, none outside use", WAIT)
        assert next(p for p in view["pools"] if p["model"] == "A100-80G")["allocated"] == 2

        await eventually(lambda: state("completed"), "the job completed", WAIT)
        shown = slurm_cluster.run("scontrol", "show", "job", slurm_id, "--oneliner")
        assert "JobState=COMPLETED" in shown and "ExitCode=0:0" in shown, shown
        await eventually(lambda: capacity((4, 0, 4)), "the capacity back", WAIT)

        # 2. A cancel through the broker becomes an scancel.
        job_id = (await call(broker, "POST", "/v1/jobs", job(count=3, hours=100)))["id"]
        await eventually(lambda: state("running"), "the long job running", WAIT)
        await call(broker, "DELETE", f"/v1/jobs/{job_id}")

        def slurm_cancelled() -> str | None:
            line = slurm_cluster.run("squeue", "-h", "-t", "all", "-n", job_id, "-o", "%T").strip()
            return line if line == "CANCELLED" else None

        await eventually(lambda: asyncio.to_thread(slurm_cancelled), "the Slurm job cancelled", WAIT)
        await eventually(lambda: capacity((4, 0, 4)), "the capacity back after the cancel", WAIT)
        assert (await call(broker, "GET", f"/v1/jobs/{job_id}"))["state"] == "cancelled"
    except AssertionError:
        print(slurm_cluster.logs())
        raise
    finally:
        stop.set()
        await asyncio.wait_for(adapter, WAIT)
