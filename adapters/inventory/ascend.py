"""Huawei Ascend NPUs from the `npu-smi info` table.

The table shows each NPU as a header row (`| NPU Name | Health | Power Temp Hugepages |`) followed
by one row per chip (`| Chip [Device|Phy-ID] | Bus-Id | AICore(%) Memory-Usage [HBM-Usage] |`).
A 310P Duo card has two chips under one NPU id, and some versions repeat the NPU row per chip; the
chip (one schedulable device) is what this parser counts. The process section lists `| NPU Chip |
pid | name | memory |` rows.

Choices:
  * Health "OK" and "Warning" (a minor alert) are usable; "Alarm", "Critical" and anything else
    are left out of `total` with an `npu_unhealthy` warning ("Warning" also warns, and stays in).
  * A chip with a process on it, or AICore use at or above `busy_aicore` %, is in_use_external.
  * Memory is the chip's HBM when the table shows HBM (910 series), else its DDR (310P).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from adapters.inventory import Inventory, catalog_model, make_pool, to_float

USABLE_HEALTH = ("OK", "Warning")

_BUS = re.compile(r"^[0-9A-Fa-f]{4}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.[0-9A-Fa-f]$")
_PAIR = re.compile(r"(\d+)\s*/\s*(\d+)")


@dataclass
class _Chip:
    npu: int
    chip: int
    name: str
    health: str
    bus: str
    aicore: float | None
    memory_mib: int | None


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _model_name(name: str) -> str:
    # npu-smi prints "910B3", "310P3", "Ascend910"; the catalog speaks of "Ascend-910B".
    return name if name.lower().startswith("ascend") else f"Ascend{name}"


def _parse_processes(lines: list[str]) -> set[tuple[int, int]]:
    busy: set[tuple[int, int]] = set()
    for line in lines:
        cells = _cells(line)
        if len(cells) < 2:
            continue
        ids, pid = cells[0].split(), cells[1]
        if len(ids) >= 2 and all(i.isdigit() for i in ids[:2]) and pid.isdigit():
            busy.add((int(ids[0]), int(ids[1])))
    return busy


def parse_npu_smi(
    text: str,
    *,
    models: Mapping[str, str] | None = None,
    busy_aicore: float = 10.0,
) -> Inventory:
    """Pools (one per NPU model) from `npu-smi info`; see the module text for the rules."""
    inv = Inventory()
    chips: list[_Chip] = []
    lines = text.splitlines()
    process_start = next((i for i, ln in enumerate(lines) if "Process id" in ln or "Process ID" in ln), len(lines))
    header: tuple[int, str, str] | None = None  # npu id, name, health of the last NPU row
    for line in lines[:process_start]:
        if not line.strip().startswith("|"):
            continue
        cells = _cells(line)
        if len(cells) < 3:
            continue
        first = cells[0].split()
        if len(first) == 2 and first[0].isdigit() and not first[1].isdigit():
            header = (int(first[0]), first[1], cells[1])
        elif first and all(part.isdigit() for part in first) and _BUS.match(cells[1]):
            if header is None:
                inv.warn("unparsed_line", cells[1], f"chip row before any NPU row: {line.strip()!r}")
                continue
            metrics = cells[2].split()
            pairs = _PAIR.findall(cells[2])
            memory = int(pairs[-1][1]) if pairs else None
            chips.append(
                _Chip(header[0], int(first[0]), header[1], header[2], cells[1],
                      to_float(metrics[0]) if metrics else None, memory)
            )  # fmt: skip
    busy = _parse_processes(lines[process_start:])

    by_model: dict[str, list[_Chip]] = {}
    left_out: dict[str, int] = {}
    guessed: set[str] = set()
    for chip in chips:
        subject = f"npu {chip.npu} chip {chip.chip} ({chip.bus})"
        model, known = catalog_model(_model_name(chip.name), models)
        if chip.health not in USABLE_HEALTH:
            left_out[model] = left_out.get(model, 0) + 1
            inv.warn("npu_unhealthy", subject, f"{subject} health {chip.health!r}: left out")
            continue
        if chip.health != "OK":
            inv.warn("npu_warning", subject, f"{subject} health {chip.health!r}: still offered")
        if not known and chip.name not in guessed:
            guessed.add(chip.name)
            inv.warn("model_unknown", chip.name, f"{chip.name!r} is not in the catalog; published as {model!r}")
        by_model.setdefault(model, []).append(chip)

    for model, group in by_model.items():
        in_use = sum(
            1 for c in group
            if (c.npu, c.chip) in busy or (c.aicore is not None and c.aicore >= busy_aicore)
        )  # fmt: skip
        memories = [c.memory_mib for c in group if c.memory_mib]
        # per_node is the host's size: unhealthy chips still occupy their slots in the machine.
        per_node = len(group) + left_out.get(model, 0)
        inv.pools.append(
            make_pool(model, "ASIC", len(group), in_use, memory_mib=min(memories) if memories else None,
                      per_node=per_node)
        )  # fmt: skip
    return inv
