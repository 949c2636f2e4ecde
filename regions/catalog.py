"""Device catalog and the simulated demo fleet.

The catalog holds the facts a site should not have to repeat (architecture, memory, software stack,
relative performance, a typical price), so fleet entries can be short and site adapters can still
publish complete capacity messages. Units: accelerators and FPGAs are counted and priced per device;
CPUs per core (price per core-hour, memory_gb per core). perf_* are relative to A100-80G = 1.0 and
0.0 means "not suited" (guard divisions).
"""

from __future__ import annotations

import copy
import functools
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import seeds
from regions.geo import Geography, load_geography

ARCHES = ("CPU", "GPU", "ASIC", "FPGA")
MODEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
SITE_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
STACK_RE = re.compile(r"^[a-z0-9][a-z0-9._+-]*$")  # same as common.validation.Stack
POOL_KEYS = (
    "arch",
    "model",
    "memory_gb",
    "total",
    "in_use_external",
    "per_node",
    "interconnect",
    "stacks",
    "price_cny_per_hour",
)
_FLEET_POOL_KEYS = {
    "model",
    "total",
    "in_use_external",
    "price_cny_per_hour",
    "memory_gb",
    "per_node",
    "interconnect",
    "stacks",
}
_ENERGY_KEYS = {"pue", "green_share", "tariff_cny_per_kwh"}
_DEVICE_KEYS = {
    "model",
    "arch",
    "vendor",
    "domestic",
    "memory_gb",
    "stack",
    "stack_version",
    "interconnect",
    "per_node",
    "perf_training",
    "perf_inference",
    "price_cny_per_hour",
    "available_in_china",
}
_DOC_KEYS = {"source", "sources", "note"}  # provenance only; not part of the runtime model


@dataclass(frozen=True)
class Device:
    model: str
    arch: str
    vendor: str
    domestic: bool
    memory_gb: float
    stack: str
    stack_version: str
    interconnect: str
    per_node: int
    perf_training: float
    perf_inference: float
    price_cny_per_hour: float
    available_in_china: bool = True

    @property
    def stack_tag(self) -> str:
        """The "stack-version" string sites advertise, e.g. "cuda-12.4"."""
        return f"{self.stack}-{self.stack_version}"


@dataclass(frozen=True)
class SiteSeed:
    """One simulated site. pools are complete capacity-message pool dicts; treat them as read-only."""

    id: str
    hub: str
    cluster: str
    operator: str
    energy: Mapping[str, float]
    pools: tuple[Mapping[str, object], ...]

    def capacity_pools(self) -> list[dict[str, object]]:
        """Fresh deep copies of the pools, safe to mutate (e.g. to update in_use_external) and serialize."""
        return [copy.deepcopy(dict(pool)) for pool in self.pools]


def _read(name: str) -> dict[str, Any]:
    with seeds.path(name).open("rb") as fh:
        return tomllib.load(fh)


def build_devices(doc: Mapping[str, Any]) -> Mapping[str, Device]:
    """Validate a parsed devices document; unknown keys are errors so typos cannot become defaults."""
    devices: dict[str, Device] = {}
    for rec in doc.get("device", []):
        model = rec.get("model", "?")
        extra = set(rec) - _DEVICE_KEYS - _DOC_KEYS
        if extra:
            raise ValueError(f"device {model!r}: unknown keys {sorted(extra)}")
        if not MODEL_RE.match(str(model)):
            raise ValueError(f"device model {model!r} does not match {MODEL_RE.pattern}")
        if model in devices:
            raise ValueError(f"device {model!r} is defined twice")
        if rec.get("arch") not in ARCHES:
            raise ValueError(f"device {model!r}: arch must be one of {ARCHES}, not {rec.get('arch')!r}")
        try:
            device = Device(**{k: v for k, v in rec.items() if k in _DEVICE_KEYS})
        except TypeError as exc:
            raise ValueError(f"device {model!r}: {exc}") from None
        if not STACK_RE.match(device.stack_tag):
            raise ValueError(f"device {model!r}: stack tag {device.stack_tag!r} is not a valid stack")
        if device.per_node < 1 or device.memory_gb < 0 or device.price_cny_per_hour < 0:
            raise ValueError(f"device {model!r}: per_node, memory_gb and price must be positive")
        devices[model] = device
    return MappingProxyType(devices)


@functools.cache
def load_devices() -> Mapping[str, Device]:
    """The shipped catalog, keyed by model, parsed once per process."""
    return build_devices(_read("devices.toml"))


def _complete_pool(site: str, rec: Mapping[str, Any], devices: Mapping[str, Device]) -> dict[str, object]:
    model = str(rec.get("model"))
    if model not in devices:
        raise ValueError(f"site {site!r}: model {model!r} is not in the device catalog")
    extra = set(rec) - _FLEET_POOL_KEYS
    if extra:
        raise ValueError(f"site {site!r}, pool {model!r}: unknown keys {sorted(extra)}")
    dev = devices[model]
    total = int(rec["total"]) if "total" in rec else -1
    used = int(rec.get("in_use_external", 0))
    if total < 0 or used < 0:
        raise ValueError(f"site {site!r}, pool {model!r}: total and in_use_external must be given and >= 0")
    if used > total:
        raise ValueError(f"site {site!r}, pool {model!r}: in_use_external {used} exceeds total {total}")
    stacks = [str(s) for s in rec.get("stacks", [dev.stack_tag])]
    for tag in stacks:
        if not STACK_RE.match(tag):
            raise ValueError(f"site {site!r}, pool {model!r}: stack {tag!r} is not a valid stack")
    pool: dict[str, object] = {
        "arch": dev.arch,
        "model": dev.model,
        "memory_gb": float(rec.get("memory_gb", dev.memory_gb)),
        "total": total,
        "in_use_external": used,
        "per_node": int(rec.get("per_node", dev.per_node)),
        "interconnect": str(rec.get("interconnect", dev.interconnect)),
        "stacks": stacks,
        "price_cny_per_hour": float(rec.get("price_cny_per_hour", dev.price_cny_per_hour)),
    }
    return pool


def build_fleet(doc: Mapping[str, Any], devices: Mapping[str, Device], geo: Geography) -> tuple[SiteSeed, ...]:
    """Validate a parsed fleet document against catalog and geography, filling catalog/hub defaults."""
    sites: list[SiteSeed] = []
    seen: set[str] = set()
    for rec in doc.get("site", []):
        sid = str(rec.get("id", ""))
        if not SITE_RE.match(sid):
            raise ValueError(f"site id {sid!r} does not match {SITE_RE.pattern}")
        if sid in seen:
            raise ValueError(f"site {sid!r} is defined twice")
        seen.add(sid)
        hub, cluster = rec.get("hub"), rec.get("cluster")
        if hub not in geo.hubs:
            raise ValueError(f"site {sid!r}: unknown hub {hub!r}")
        if cluster not in geo.clusters:
            raise ValueError(f"site {sid!r}: unknown cluster {cluster!r}")
        if geo.clusters[cluster].hub != hub:
            raise ValueError(f"site {sid!r}: cluster {cluster!r} belongs to {geo.clusters[cluster].hub!r}, not {hub!r}")
        h = geo.hubs[hub]
        energy = {"pue": h.pue, "green_share": h.green_share, "tariff_cny_per_kwh": h.tariff_cny_per_kwh}
        given = dict(rec.get("energy", {}))
        if set(given) - _ENERGY_KEYS:
            raise ValueError(f"site {sid!r}: unknown energy keys {sorted(set(given) - _ENERGY_KEYS)}")
        energy.update({k: float(v) for k, v in given.items()})
        pools = tuple(_complete_pool(sid, p, devices) for p in rec.get("pools", []))
        models = [p["model"] for p in pools]
        if len(set(models)) != len(models):
            raise ValueError(f"site {sid!r}: a model appears in two pools")
        if not pools:
            raise ValueError(f"site {sid!r} has no pools")
        sites.append(
            SiteSeed(
                sid,
                hub,
                cluster,
                str(rec.get("operator", "unknown (simulated)")),
                MappingProxyType(energy),
                pools,
            )
        )
    return tuple(sites)


@functools.cache
def load_fleet() -> tuple[SiteSeed, ...]:
    """The shipped demo fleet, validated and completed once per process."""
    return build_fleet(_read("fleet.toml"), load_devices(), load_geography())
