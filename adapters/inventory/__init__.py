"""Pure inventory parsers: a tool's text or JSON in, capacity-message pools and warnings out.

Every parser returns an `Inventory`. Pools are complete `common.protocol.Pool` dicts: what the tool
says (model, count, memory, outside use) plus catalog defaults for the rest (arch, stack, price).
The site config (`adapters.siteconfig`) then applies the site's own prices, stacks and overrides.
Parsers never raise on odd input: a line they cannot read becomes a warning, so one broken device
cannot hide the rest of a site.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from regions import load_devices

# A model's catalog memory is used when the tool's figure is within this share of it: tools report
# usable memory (minus ECC and firmware reservations), but jobs ask for the marketed size.
MEMORY_TOLERANCE = 0.15


@dataclass(frozen=True)
class Finding:
    """One thing a parser wants an operator to know: `code` for machines, `message` for people."""

    code: str
    subject: str
    message: str


@dataclass
class Inventory:
    """What a parser found: the pools to publish and the warnings about what it left out or guessed."""

    pools: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)

    def warn(self, code: str, subject: str, message: str) -> None:
        self.warnings.append(Finding(code, subject, message))

    def codes(self) -> list[str]:
        return [w.code for w in self.warnings]

    def pool(self, model: str) -> dict[str, Any] | None:
        return next((p for p in self.pools if p["model"] == model), None)


# Product-name patterns (matched on the upper-cased name) -> catalog model. Order matters: the more
# specific pattern first (A100 80 GB before A100, GB200 before B200, K100-AI before K100). Short names are
# fenced on both sides ((?<![A-Z0-9]) ... (?![A-Z0-9])) so A10 is not A100/A10G, A30 not A3000, H20 not
# H200, L40S not L40; GV100/GA100/GH100 (lspci chip names before the bracketed product) never match.
_V100 = r"(?<![A-Z0-9])(?<!MR[\s_-])(?<!BI[\s_-])V100"  # not Iluvatar's MR-V100 / BI-V100
_NAME_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"(?<![A-Z0-9])A100(?![0-9]).*\b80\s*G", "A100-80G"),
    (r"(?<![A-Z0-9])A100(?![0-9])", "A100-40G"),  # not the RTX A1000 workstation card
    (r"(?<![A-Z0-9])A800", "A800"),
    (r"(?<![A-Z0-9])A10(?![A-Z0-9])", "A10"),  # the A10G (AWS) is another part: left to the site's mapping
    (r"(?<![A-Z0-9])A30(?![A-Z0-9])", "A30"),
    (r"(?<![A-Z0-9])H800", "H800"),
    (r"(?<![A-Z0-9])H100", "H100"),
    (r"(?<![A-Z0-9])H200", "H200"),  # not GH200 (Grace Hopper), which the catalog lacks
    (r"(?<![A-Z0-9])H20(?![A-Z0-9])", "H20"),
    (r"GB200", "GB200"),
    (r"\bB200", "B200"),
    (r"\bL20\b", "L20"),
    (r"(?<![A-Z0-9])L40S(?![A-Z0-9])", "L40S"),  # the L40 and L4 are not in the catalog
    (r"RTX[\s_-]*4090|\b4090\b", "RTX-4090"),
    (r"\bT4\b", "T4"),
    # Iluvatar before NVIDIA's V100. V100S exists only with 32 GB; a V100 without a size is the 16 GB part.
    (r"(?<![A-Z0-9])MR[\s_-]*V100(?![0-9])", "Iluvatar-MR-V100"),
    (r"(?<![A-Z0-9])BI[\s_-]*V100(?![0-9])", "Iluvatar-BI-V100"),
    (r"(?<![A-Z0-9])BI[\s_-]*V150(?![0-9])", "Iluvatar-BI-V150"),
    (_V100 + r"(?:S(?![A-Z0-9])|(?![A-Z0-9]).*(?<![0-9])32\s*G)", "V100-32G"),
    (_V100 + r"(?![A-Z0-9])", "V100-16G"),
    (r"910C|910_93\d\d", "Ascend-910C"),  # Ascend910_93xx: CANN's SoC names for the A3 (910C) dies
    (r"910B", "Ascend-910B"),
    (r"310P", "Ascend-310P"),
    (r"MLU[\s_-]*370", "MLU370-X8"),
    (r"MLU[\s_-]*590", "MLU590"),
    (r"\bZ100", "Hygon-DCU-Z100"),
    (r"(?<![A-Z0-9])K100[\s_-]*AI(?![A-Z0-9])", "Hygon-DCU-K100-AI"),
    (r"\bK100", "Hygon-DCU-K100"),
    (r"MXC[\s_-]*500(?![0-9])|METAX.*(?<![A-Z0-9])C500(?![0-9])", "MetaX-C500"),
    (r"(?<![A-Z0-9])BR[\s_-]*100(?![0-9])", "Biren-BR100"),
    (r"(?<![A-Z0-9])BR[\s_-]*104(?![0-9])", "Biren-BR104"),
    # Bare "P800"/"R200" only for Kunlun names: NVIDIA's Quadro P800 must not become a Kunlun card.
    (r"(?:KUNLUN|XPU)[\s_-]*R200|^R200$", "Kunlun-R200"),
    (r"(?:KUNLUN|XPU)[\s_-]*P800|^P800$", "Kunlun-P800"),
)
_COMPILED = tuple((re.compile(p), model) for p, model in _NAME_PATTERNS)
_VENDOR_WORDS = re.compile(r"^(?:NVIDIA|Tesla|GeForce|Huawei)[\s_-]+", re.IGNORECASE)
_BAD_CHARS = re.compile(r"[^A-Za-z0-9._+-]+")


def sanitize_model(raw: str) -> str:
    """A valid model id made from a product name the catalog does not know ("NVIDIA GH200 480GB" -> "GH200-480GB")."""
    name = raw.strip()
    while _VENDOR_WORDS.match(name):
        name = _VENDOR_WORDS.sub("", name, count=1)
    name = _BAD_CHARS.sub("-", name).strip("-._+")
    name = re.sub(r"-{2,}", "-", name)[:64].rstrip("-._+")
    return name or "unknown"


def catalog_model(raw: str, mapping: Mapping[str, str] | None = None) -> tuple[str, bool]:
    """(model, known): the site's own mapping first, then the name table, else a sanitized id.

    `known` is False when the name matched nothing, so callers can warn that the model is a guess.
    """
    if mapping:
        for key in (raw, raw.strip(), raw.strip().lower()):
            if key in mapping:
                return mapping[key], True
    devices = load_devices()
    upper = raw.upper()
    for pattern, model in _COMPILED:
        if pattern.search(upper) and model in devices:
            return model, True
    if raw.strip() in devices:
        return raw.strip(), True
    return sanitize_model(raw), False


def pool_memory_gb(model: str, measured_mib: float | None) -> float:
    """The memory to advertise: the catalog's when the measurement agrees with it, else the measurement."""
    device = load_devices().get(model)
    measured = None if measured_mib is None else measured_mib / 1024.0
    if device is not None:
        if measured is None or abs(measured - device.memory_gb) <= MEMORY_TOLERANCE * device.memory_gb:
            return float(device.memory_gb)
    return round(measured, 1) if measured is not None else 0.0


def make_pool(
    model: str,
    arch: str,
    total: int,
    in_use_external: int,
    *,
    memory_mib: float | None = None,
    memory_gb: float | None = None,
    per_node: int = 1,
    interconnect: str | None = None,
) -> dict[str, Any]:
    """A complete pool dict; arch, stack, price and interconnect default to the catalog's for known models."""
    device = load_devices().get(model)
    if memory_gb is None:
        memory_gb = pool_memory_gb(model, memory_mib)
    return {
        "arch": device.arch if device else arch,
        "model": model,
        "memory_gb": float(memory_gb),
        "total": int(total),
        "in_use_external": max(0, min(int(in_use_external), int(total))),
        "per_node": max(1, min(int(per_node), 1024)),
        "interconnect": interconnect or (device.interconnect if device else "none"),
        "stacks": [device.stack_tag] if device else [],
        "price_cny_per_hour": float(device.price_cny_per_hour) if device else 0.0,
    }


def to_int(text: str | None) -> int | None:
    """An integer from a tool's field, or None for "[N/A]", "-", "NA" and the like."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(-?\d+)(?:\.\d+)?\s*", text)
    return int(match.group(1)) if match else None


def to_float(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(text.strip())
    except ValueError:
        return None


__all__ = [
    "Finding",
    "Inventory",
    "catalog_model",
    "make_pool",
    "pool_memory_gb",
    "sanitize_model",
    "to_float",
    "to_int",
]
