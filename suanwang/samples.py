"""Sample jobs of the kinds users of the network submit, for the demo and the benchmark."""

from __future__ import annotations

import random
from typing import Any

EAST_ORIGINS = ("beijing", "shanghai", "guangzhou", "shenzhen", "hangzhou", "nanjing", "suzhou", "tianjin")
ALL_ORIGINS = (*EAST_ORIGINS, "chengdu", "chongqing", "wuhan", "xian", "hefei", "changsha")

# (weight, template): latency-tolerant work goes anywhere; latency-sensitive work carries a cap.
_KINDS: tuple[tuple[int, dict[str, Any]], ...] = (
    (3, {"name": "llm-finetune", "workload": "training",
         "resources": {"arch": "GPU", "models": ["A800", "H800", "A100-80G"], "count": (8, 64), "min_memory_gb": 80},
         "max_price_cny_per_hour": 30, "duration_hours": (4, 24)}),
    (3, {"name": "pretrain-ascend", "workload": "training",
         "resources": {"arch": "ASIC", "models": ["Ascend-910B"], "count": (16, 128)},
         "duration_hours": (6, 48)}),
    (4, {"name": "chat-inference", "workload": "inference",
         "resources": {"arch": "GPU", "models": ["L20", "RTX-4090", "T4"], "count": (1, 4)},
         "max_latency_ms": 15, "duration_hours": (1, 8)}),
    (3, {"name": "domestic-inference", "workload": "inference",
         "resources": {"arch": "ASIC", "models": ["Ascend-310P", "MLU370-X8", "Kunlun-R200", "Enflame-i20"],
                       "count": (1, 8)},
         "max_latency_ms": 30, "duration_hours": (1, 12)}),
    (2, {"name": "cfd-hpc", "workload": "hpc", "resources": {"arch": "CPU", "count": (128, 2048)},
         "duration_hours": (2, 12)}),
    (2, {"name": "render-farm", "workload": "rendering",
         "resources": {"arch": "GPU", "models": ["RTX-4090", "L20"], "count": (8, 32)}, "duration_hours": (2, 10)}),
    (1, {"name": "risk-fpga", "workload": "inference",
         "resources": {"arch": "FPGA", "count": (2, 8)}, "max_latency_ms": 25, "duration_hours": (1, 6)}),
    (3, {"name": "llm-equivalent", "workload": "training",
         "resources": {"equivalent": {"units": (16, 64)}, "archs": ["GPU", "ASIC"]},
         "software": [{"stack": "cann", "versions": ">=8.0", "image": "registry.example.cn/llm:cann8"},
                      {"stack": "cuda", "versions": ">=12.1", "image": "registry.example.cn/llm:cu121"}],
         "residency": {"allow_hubs": ["yangtze", "neimenggu", "guizhou", "gansu", "ningxia"]},
         "max_price_cny_per_hour": 12, "duration_hours": (6, 24)}),
    (1, {"name": "xinchuang-gov", "workload": "inference", "resources": {"equivalent": {"units": (2, 8)}},
         "domestic_only": True, "max_latency_ms": 25, "duration_hours": (2, 12)}),
    (2, {"name": "dcu-batch", "workload": "batch",
         "resources": {"arch": "GPU", "models": ["Hygon-DCU-K100", "Hygon-DCU-Z100"], "count": (4, 16)},
         "duration_hours": (2, 16)}),
)  # fmt: skip


def _pick(value: Any, rng: random.Random) -> Any:
    if isinstance(value, tuple):
        low, high = value
        return rng.randint(low, high) if isinstance(low, int) and isinstance(high, int) else rng.uniform(low, high)
    if isinstance(value, dict):
        return {k: _pick(v, rng) for k, v in value.items()}
    return value


def sample_job(rng: random.Random, tenant: str | None = None) -> dict[str, Any]:
    """One job of a random kind, with sizes drawn from that kind's ranges."""
    weights = [w for w, _ in _KINDS]
    template = rng.choices([t for _, t in _KINDS], weights)[0]
    job = _pick(template, rng)
    sensitive = "max_latency_ms" in job
    job["origin"] = rng.choice(ALL_ORIGINS if sensitive else EAST_ORIGINS)
    job["duration_hours"] = round(float(job["duration_hours"]), 2)
    job["priority"] = rng.choices(["high", "normal", "low"], [1, 6, 3])[0]
    if tenant:
        job["tenant"] = tenant
    return job
