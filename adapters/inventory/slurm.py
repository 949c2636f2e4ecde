"""A Slurm cluster's GPUs (GRES) and CPUs from `scontrol -d show node --oneliner` or `sinfo`.

`scontrol` needs `-d` (details) to print `GresUsed`. The `sinfo` form this parser reads is
`sinfo -N -h -O "NodeHost:0|,Partition:0|,StateComplete:0|,CPUsState:0|,Gres:0|,GresUsed:0|,Memory:0|"`
(one line per node and partition); the plain `sinfo -N -h -o "%N|%P|%T|%C|%G|%m"` form, without
GresUsed, is read too, with a `gres_used_unknown` warning.

Choices:
  * One pool per model. A GRES type maps to a model through the site's mapping, tried as
    "<partition>/gpu:a100", "gpu:a100", "a100" (and "<partition>/cpu", "cpu" for CPU pools); an
    unmapped type is guessed from the catalog's name table with a `model_guessed` warning. A node in
    several partitions is counted once; the pool remembers every partition it came from, so jobs
    are submitted to `--partition=p1,p2`.
  * Nodes that are down, drained or draining, failed, in maintenance, not responding, reserved or
    not yet registered are left out of `total` (`node_unavailable` warning).
  * A node with no countable GRES (only gpu-like names count, not mps/shard) gives CPU cores:
    `CPUEfctv` (or `CPUTot`) in total, `CPUAlloc` in use, memory per core from `RealMemory`.
  * In-use figures include Suanwang's own Slurm jobs; the runner subtracts those, since the broker
    accounts for its own allocations.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from adapters.inventory import Inventory, catalog_model, make_pool, sanitize_model, to_int

DEVICE_GRES = frozenset({"gpu", "npu", "mlu", "dcu", "xpu", "gcu"})
UNAVAILABLE_STATES = frozenset({
    "DOWN", "DRAIN", "DRAINED", "DRAINING", "FAIL", "FAILING", "FUTURE", "MAINT", "MAINTENANCE",
    "NOT_RESPONDING", "NO_RESPOND", "INVALID_REG", "INVAL", "UNKNOWN", "REBOOT_ISSUED", "RESERVED",
})  # fmt: skip
# sinfo's short state suffixes: * not responding, $ maintenance reservation.
UNAVAILABLE_SUFFIXES = ("*", "$")
_KEY = re.compile(r"(?:^|\s)([A-Za-z][A-Za-z0-9_]*)=")


@dataclass(frozen=True)
class SlurmTarget:
    """How to ask Slurm for a pool's devices: partitions and the GRES (or CPU cores) to request."""

    partitions: tuple[str, ...]
    gres_name: str | None  # None for a CPU pool
    gres_type: str | None
    max_per_node: int


@dataclass
class SlurmInventory(Inventory):
    targets: dict[str, SlurmTarget] = field(default_factory=dict)


@dataclass
class _Node:
    name: str
    partitions: list[str]
    state: str
    cpus: int = 0
    cpus_alloc: int = 0
    memory_mb: int = 0
    arch: str = ""
    gres: dict[tuple[str, str | None], int] = field(default_factory=dict)
    gres_used: dict[tuple[str, str | None], int] | None = field(default_factory=dict)


@dataclass
class _Pool:
    arch: str
    gres_name: str
    gres_type: str | None
    total: int = 0
    used: int = 0
    per_node: int = 0
    partitions: list[str] = field(default_factory=list)
    memory_per_unit_mb: list[float] = field(default_factory=list)


def parse_gres(text: str | None) -> dict[tuple[str, str | None], int]:
    """{(name, type): count} from "gpu:a100:8(S:0-1),gpu:t4:2,mps:400" (also GresUsed's "(IDX:0-1,3)")."""
    out: dict[tuple[str, str | None], int] = {}
    if not text or text.strip() in ("(null)", "N/A", ""):
        return out
    items, depth, current = [], 0, ""
    for ch in text.strip():  # split on commas outside parentheses: "(IDX:0-1,3)" holds commas
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    items.append(current)
    for item in items:
        parts = re.sub(r"\([^()]*\)$", "", item.strip()).split(":")
        if not parts[0]:
            continue
        count = to_int(parts[-1]) if len(parts) > 1 else None
        kind = parts[1] if len(parts) == 3 else (parts[1] if len(parts) == 2 and count is None else None)
        kind = None if kind in (None, "(null)", "") else kind
        key = (parts[0], kind)
        out[key] = out.get(key, 0) + (count if count is not None else 1)
    return out


def _fields(line: str) -> dict[str, str]:
    starts = list(_KEY.finditer(line))
    return {
        m.group(1): line[m.end() : starts[i + 1].start() if i + 1 < len(starts) else len(line)].strip()
        for i, m in enumerate(starts)
    }


def _scontrol_nodes(text: str) -> list[_Node]:
    nodes = []
    for line in text.splitlines():
        if not line.strip().startswith("NodeName="):
            continue
        f = _fields(line)
        gres_used = parse_gres(f["GresUsed"]) if "GresUsed" in f else None
        nodes.append(
            _Node(
                name=f["NodeName"], partitions=[p for p in f.get("Partitions", "").split(",") if p and p != "(null)"],
                state=f.get("State", "UNKNOWN"), cpus=to_int(f.get("CPUEfctv")) or to_int(f.get("CPUTot")) or 0,
                cpus_alloc=to_int(f.get("CPUAlloc")) or 0, memory_mb=to_int(f.get("RealMemory")) or 0,
                arch=f.get("Arch", ""), gres=parse_gres(f.get("Gres")), gres_used=gres_used,
            )
        )  # fmt: skip
    return nodes


def _sinfo_nodes(text: str) -> list[_Node]:
    nodes: dict[str, _Node] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().rstrip("|").split("|")]
        if len(cells) < 6 or cells[0] in ("HOSTNAMES", "NODELIST"):
            continue
        name, partition, state, cpus_state, gres = cells[:5]
        memory = cells[6] if len(cells) >= 7 else cells[5]
        alloc, _idle, _other, total = ([*(to_int(x) for x in cpus_state.split("/")), 0, 0, 0, 0])[:4]
        node = nodes.get(name)
        if node is None:
            node = nodes[name] = _Node(
                name=name, partitions=[], state=state.upper(), cpus=total or 0, cpus_alloc=alloc or 0,
                memory_mb=to_int(memory) or 0, gres=parse_gres(gres),
                gres_used=parse_gres(cells[5]) if len(cells) >= 7 else None,
            )  # fmt: skip
        node.partitions.append(partition.rstrip("*"))  # "*" marks the default partition
    return list(nodes.values())


def _unavailable(state: str) -> bool:
    flags = state.upper().split("+")
    return any(f.endswith(UNAVAILABLE_SUFFIXES) or f.rstrip("*$~#!%@^-") in UNAVAILABLE_STATES for f in flags)


def _model(keys: Iterable[str], guess: str, models: Mapping[str, str]) -> tuple[str, bool]:
    for key in keys:
        if key in models:
            return models[key], True
    return catalog_model(guess)[0], False


def parse_slurm(
    text: str,
    *,
    models: Mapping[str, str] | None = None,
    partitions: Iterable[str] | None = None,
    device_gres: Iterable[str] = DEVICE_GRES,
) -> SlurmInventory:
    """Pools from `scontrol -d show node --oneliner` (or the `sinfo` forms above); see the module text."""
    inv = SlurmInventory()
    models = dict(models or {})
    wanted = set(partitions or ())
    device_names = set(device_gres)
    nodes = _scontrol_nodes(text) if "NodeName=" in text else _sinfo_nodes(text)
    acc: dict[str, _Pool] = {}
    guessed: set[str] = set()
    for node in nodes:
        parts = [p for p in node.partitions if not wanted or p in wanted]
        if not parts:
            continue
        if _unavailable(node.state):
            inv.warn("node_unavailable", node.name, f"node {node.name} is {node.state}: left out")
            continue
        devices = {k: n for k, n in node.gres.items() if k[0] in device_names and n > 0}
        if node.gres_used is None and devices:
            inv.warn("gres_used_unknown", node.name, f"no GresUsed for {node.name}: its devices count as free")
        items: list[tuple[str, str | None, int, int]] = [
            (name, kind, n, min(n, (node.gres_used or {}).get((name, kind), 0))) for (name, kind), n in devices.items()
        ]
        if not items:
            items = [("cpu", None, node.cpus, min(node.cpus, node.cpus_alloc))]
        for name, kind, total, used in items:
            label = f"{name}:{kind}" if kind else name
            keys = [f"{p}/{label}" for p in parts] + [label] + ([kind] if kind else [])
            model, mapped = _model(keys, kind or name, models)
            if name == "cpu" and not mapped:
                # The catalog cannot tell a CPU from "cpu"; name the pool after the node's architecture.
                model = sanitize_model(f"CPU-{node.arch}" if node.arch else "CPU")
            if not mapped and model not in guessed:
                guessed.add(model)
                inv.warn("model_guessed", label, f"no model mapping for {label!r}: published as {model!r}")
            pool = acc.setdefault(model, _Pool("CPU" if name == "cpu" else "GPU", name, kind))
            pool.total += total
            pool.used += used
            pool.per_node = max(pool.per_node, total)
            pool.partitions.extend(p for p in parts if p not in pool.partitions)
            if name == "cpu" and node.memory_mb and node.cpus:
                pool.memory_per_unit_mb.append(node.memory_mb / node.cpus)
    for model, p in acc.items():
        memory_gb = round(min(p.memory_per_unit_mb) / 1024, 2) if p.memory_per_unit_mb else None
        inv.pools.append(make_pool(model, p.arch, p.total, p.used, memory_gb=memory_gb, per_node=p.per_node))
        inv.targets[model] = SlurmTarget(
            partitions=tuple(p.partitions), gres_name=None if p.gres_name == "cpu" else p.gres_name,
            gres_type=p.gres_type, max_per_node=p.per_node,
        )  # fmt: skip
    return inv
