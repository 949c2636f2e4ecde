"""Reading each inventory source: run its command (or read saved output from files) and parse it.

A reader is an async callable returning an `Inventory`; it raises `SourceError` when the source
cannot be read at all, so the runner can tell "no GPUs" from "nvidia-smi is broken".
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters.inventory import Inventory
from adapters.inventory.ascend import parse_npu_smi
from adapters.inventory.kubernetes import parse_kubernetes
from adapters.inventory.nvidia import QUERY_APPS, QUERY_GPU, parse_nvidia_smi
from adapters.inventory.slurm import parse_slurm
from adapters.siteconfig import SiteConfig
from common.errors import SuanwangError

Reader = Callable[[], Awaitable[Inventory]]
CSV = "--format=csv,noheader,nounits"
COMMAND_TIMEOUT = 60.0


class SourceError(SuanwangError):
    """The inventory source could not be read (command missing, failing, timing out, bad file)."""

    code = "source_unavailable"


@dataclass(frozen=True)
class Output:
    returncode: int
    stdout: str
    stderr: str

    def check(self, argv: Sequence[str]) -> str:
        if self.returncode != 0:
            detail = (self.stderr or self.stdout).strip()[:300]
            raise SourceError(f"{' '.join(argv)} exited with {self.returncode}: {detail}")
        return self.stdout


async def run_command(argv: Sequence[str], timeout: float = COMMAND_TIMEOUT) -> Output:
    """Run a command without a shell; SourceError if it cannot start or outlives `timeout`."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
    except OSError as exc:
        raise SourceError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise SourceError(f"{' '.join(argv)} did not finish within {timeout:.0f} s") from None
    assert proc.returncode is not None
    return Output(proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"))


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc.strerror or exc}") from None


def _json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise SourceError(f"{what} is not JSON: {exc}") from None


def _files(files: Sequence[Path], least: int, most: int, names: str) -> list[Path]:
    if not least <= len(files) <= most:
        raise SourceError(f"--from-file takes {names} ({least} to {most} files), got {len(files)}")
    return list(files)


def nvidia_reader(config: SiteConfig, files: Sequence[Path] = ()) -> Reader:
    """`--from-file GPUS.csv [APPS.csv [LIST.txt]]`, else nvidia-smi itself."""
    opts = config.nvidia

    def parse(gpus: str, apps: str, listing: str) -> Inventory:
        return parse_nvidia_smi(gpus, apps, listing, models=config.models, busy_utilization=opts.busy_utilization,
                                busy_memory_mib=opts.busy_memory_mib)  # fmt: skip

    if files:
        paths = _files(files, 1, 3, "GPUS.csv [APPS.csv [LIST.txt]]")

        async def from_files() -> Inventory:
            texts = [_read(p) for p in paths] + ["", ""]
            return parse(texts[0], texts[1], texts[2])

        return from_files

    async def from_command() -> Inventory:
        argv = [opts.nvidia_smi, f"--query-gpu={QUERY_GPU},mig.mode.current", CSV]
        gpus = await run_command(argv)
        listing = ""
        if gpus.returncode != 0 and "not a valid field" in gpus.stdout + gpus.stderr:
            # Drivers before MIG existed do not know mig.mode.current; `-L` shows MIG devices instead.
            argv = [opts.nvidia_smi, f"--query-gpu={QUERY_GPU}", CSV]
            gpus = await run_command(argv)
            listing = (await run_command([opts.nvidia_smi, "-L"])).stdout
        # nvidia-smi exits non-zero when one GPU is lost but still lists the others: keep what it printed.
        if gpus.returncode != 0 and "," not in gpus.stdout:
            gpus.check(argv)
        apps = await run_command([opts.nvidia_smi, f"--query-compute-apps={QUERY_APPS}", CSV])
        return parse(gpus.stdout + "\n" + gpus.stderr, apps.stdout, listing)

    return from_command


def ascend_reader(config: SiteConfig, files: Sequence[Path] = ()) -> Reader:
    """`--from-file INFO.txt`, else `npu-smi info`."""
    opts = config.ascend
    paths = _files(files, 1, 1, "INFO.txt") if files else []

    async def read() -> Inventory:
        if paths:
            text = _read(paths[0])
        else:
            argv = [opts.npu_smi, "info"]
            text = (await run_command(argv)).check(argv)
        return parse_npu_smi(text, models=config.models, busy_aicore=opts.busy_aicore)

    return read


def kubernetes_reader(config: SiteConfig, files: Sequence[Path] = ()) -> Reader:
    """`--from-file NODES.json [PODS.json]`, else kubectl."""
    opts = config.kubernetes
    paths = _files(files, 1, 2, "NODES.json [PODS.json]") if files else []
    base = [opts.kubectl]
    if opts.kubeconfig:
        base += ["--kubeconfig", opts.kubeconfig]
    if opts.context:
        base += ["--context", opts.context]
    resources = {name: str(arch) for name, arch in opts.resources.items()}

    async def read() -> Inventory:
        if paths:
            nodes = _json(_read(paths[0]), str(paths[0]))
            pods = _json(_read(paths[1]), str(paths[1])) if len(paths) > 1 else None
        else:
            argv = [*base, "get", "nodes", "-o", "json"]
            nodes = _json((await run_command(argv)).check(argv), "kubectl get nodes")
            # Finished pods hold nothing; leaving them out keeps the answer small on busy clusters.
            unfinished = "--field-selector=status.phase!=Succeeded,status.phase!=Failed"
            argv = [*base, "get", "pods", "-A", "-o", "json", unfinished]
            pods = _json((await run_command(argv)).check(argv), "kubectl get pods")
        return parse_kubernetes(nodes, pods, models=config.models, resources=resources, model_labels=opts.model_labels)

    return read


def slurm_command(config: SiteConfig, name: str) -> str:
    """The path of a Slurm client command (`slurm.bin_dir` if set)."""
    return str(Path(config.slurm.bin_dir) / name) if config.slurm.bin_dir else name


def slurm_reader(config: SiteConfig, files: Sequence[Path] = ()) -> Reader:
    """`--from-file SCONTROL_OR_SINFO.txt`, else `scontrol -d show node --oneliner`."""
    opts = config.slurm
    paths = _files(files, 1, 1, "SCONTROL_OR_SINFO.txt") if files else []

    async def read() -> Inventory:
        if paths:
            text = _read(paths[0])
        else:
            argv = [slurm_command(config, "scontrol"), "-d", "show", "node", "--oneliner"]
            text = (await run_command(argv)).check(argv)
        return parse_slurm(text, models=config.models, partitions=opts.partitions, device_gres=opts.gres)

    return read


READERS: dict[str, Callable[[SiteConfig, Sequence[Path]], Reader]] = {
    "nvidia-smi": nvidia_reader,
    "npu-smi": ascend_reader,
    "kubernetes": kubernetes_reader,
    "slurm": slurm_reader,
}
