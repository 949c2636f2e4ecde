"""NVIDIA GPUs from `nvidia-smi` CSV queries.

Inputs (all `--format=csv,noheader,nounits`):
  * `--query-gpu=index,uuid,name,memory.total,memory.used,utilization.gpu,pci.bus_id[,mig.mode.current]`
  * `--query-compute-apps=gpu_uuid,pid,used_memory` (optional)
  * `nvidia-smi -L` (optional; only used to spot MIG partitions on drivers without `mig.mode.current`)

Choices:
  * One pool per model; every GPU of this host counts in it, so per_node is the host's GPU count.
  * A GPU is busy with local work (in_use_external) when a compute process runs on it, its
    utilization is at or above `busy_utilization` %, or more than `busy_memory_mib` of its memory is
    in use (processes in other containers are invisible to `--query-compute-apps`, their memory is not).
  * MIG: the broker places whole devices, and a GPU split into MIG instances cannot run a whole-GPU
    job. Such a GPU stays in `total` (it is there) but counts as in use, with a `mig_enabled` warning;
    MIG instances listed as devices of their own (names containing "MIG") are not offered.
  * A GPU that fell off the bus ("[GPU is lost]", "ERR!", "Unknown Error", "requires reset") is
    left out of `total` entirely, with a `gpu_lost` warning.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from adapters.inventory import Inventory, catalog_model, make_pool, to_float, to_int

QUERY_GPU = "index,uuid,name,memory.total,memory.used,utilization.gpu,pci.bus_id"
QUERY_APPS = "gpu_uuid,pid,used_memory"

_LOST = re.compile(r"GPU is lost|ERR!|Unknown Error|requires reset|Requires Reset", re.IGNORECASE)
_BUS_ID = r"[0-9A-Fa-f]{4,8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.[0-9A-Fa-f]"
_NO_HANDLE = re.compile(rf"Unable to determine the device handle for (?:GPU\s*)?({_BUS_ID})?")
_MIG_NAME = re.compile(r"\bMIG\b")
_LIST_GPU = re.compile(r"^GPU\s+\d+:.*\(UUID:\s*(GPU-[^)\s]+)\)")
_LIST_MIG = re.compile(r"^\s+MIG\s+\S+\s+Device\s+\d+:")


@dataclass
class _Gpu:
    index: str
    uuid: str
    name: str
    memory_total_mib: int | None
    memory_used_mib: int | None
    utilization: float | None
    bus: str
    mig: bool = False


def _split(line: str) -> list[str]:
    return [part.strip() for part in line.split(",")]


def _mig_uuids(listing: str) -> set[str]:
    """GPU UUIDs that `nvidia-smi -L` shows with MIG devices under them."""
    out: set[str] = set()
    current: str | None = None
    for line in listing.splitlines():
        gpu = _LIST_GPU.match(line)
        if gpu:
            current = gpu.group(1)
        elif current and _LIST_MIG.match(line):
            out.add(current)
    return out


def _busy_uuids(apps_csv: str) -> set[str]:
    busy: set[str] = set()
    for line in apps_csv.splitlines():
        fields = _split(line)
        # "No running processes found" and blank lines have no UUID in front.
        if fields and fields[0].startswith(("GPU-", "MIG-")):
            busy.add(fields[0])
    return busy


def _interconnect(names: list[str]) -> str | None:
    upper = [n.upper() for n in names]
    if all("SXM" in n for n in upper):
        return "nvlink"
    if any("PCIE" in n for n in upper):
        return "pcie"
    return None  # the catalog's default for the model


def parse_nvidia_smi(
    gpus_csv: str,
    apps_csv: str = "",
    listing: str = "",
    *,
    models: Mapping[str, str] | None = None,
    busy_utilization: float = 10.0,
    busy_memory_mib: int = 1024,
) -> Inventory:
    """Pools (one per GPU model) from `nvidia-smi` query output; see the module text for the rules."""
    inv = Inventory()
    gpus: list[_Gpu] = []
    lost_count = 0
    mig_buses: set[str] = set()
    for raw in gpus_csv.splitlines():
        line = raw.strip()
        if not line or line.startswith("No devices were found") or line.startswith("index,"):
            continue
        lost = _NO_HANDLE.search(line)
        if lost:
            subject = lost.group(1) or "?"
            inv.warn("gpu_lost", subject, f"GPU {subject} left out: {line}")
            lost_count += 1
            continue
        fields = _split(line)
        if len(fields) < 7:
            inv.warn("unparsed_line", line[:40], f"expected at least 7 fields, got {len(fields)}: {line!r}")
            continue
        index, uuid, name, mem_total, mem_used, util, bus = fields[:7]
        subject = bus if bus and not _LOST.search(bus) else f"index {index}"
        if any(_LOST.search(f) for f in fields[:7]):
            inv.warn("gpu_lost", subject, f"GPU {subject} ({name}) left out: {line}")
            lost_count += 1
            continue
        if _MIG_NAME.search(name):
            # A MIG instance listed as a device: its parent GPU (same bus) is partitioned.
            mig_buses.add(bus)
            inv.warn("mig_instance", uuid or subject, f"MIG instance {name} on {bus} is not offered")
            continue
        gpu = _Gpu(index, uuid, name, to_int(mem_total), to_int(mem_used), to_float(util), bus)
        gpu.mig = len(fields) > 7 and fields[7].strip().lower() == "enabled"
        gpus.append(gpu)

    mig_uuids = _mig_uuids(listing)
    busy = _busy_uuids(apps_csv)
    by_model: dict[str, list[_Gpu]] = {}
    guessed: set[str] = set()
    for gpu in gpus:
        if gpu.bus in mig_buses or gpu.uuid in mig_uuids:
            gpu.mig = True
        if gpu.mig:
            inv.warn("mig_enabled", gpu.bus, f"GPU {gpu.bus} ({gpu.name}) is in MIG mode: counted as in use")
        model, known = catalog_model(gpu.name, models)
        if not known and gpu.name not in guessed:
            guessed.add(gpu.name)
            inv.warn("model_unknown", gpu.name, f"{gpu.name!r} is not in the catalog; published as {model!r}")
        by_model.setdefault(model, []).append(gpu)

    for model, group in by_model.items():
        in_use = sum(
            1 for g in group
            if g.mig or g.uuid in busy
            or (g.utilization is not None and g.utilization >= busy_utilization)
            or (g.memory_used_mib is not None and g.memory_used_mib > busy_memory_mib)
        )  # fmt: skip
        memories = [g.memory_total_mib for g in group if g.memory_total_mib]
        # per_node is the host's size, lost GPUs included (they come back after a reset); a lost GPU's
        # model is unknowable, so it counts only when the host has a single model.
        per_node = len(group) + (lost_count if len(by_model) == 1 else 0)
        pool = make_pool(
            model, "GPU", len(group), in_use, memory_mib=min(memories) if memories else None,
            per_node=per_node, interconnect=_interconnect([g.name for g in group]),
        )  # fmt: skip
        inv.pools.append(pool)
    return inv
