"""Accelerators of a Kubernetes cluster from `kubectl get nodes -o json` and `kubectl get pods -A -o json`.

Choices:
  * A node counts only when it is Ready and schedulable: cordoned (`spec.unschedulable`) and
    NotReady nodes are left out of `total` with `node_cordoned` / `node_not_ready` warnings.
  * `total` is the nodes' `status.allocatable` of each device resource; `in_use_external` is what
    pods bound to those nodes request, for pods not yet finished (phase other than Succeeded/Failed).
    A pod's request is the larger of its containers' sum and its largest init container (the
    scheduler's rule); a container that gives only a limit requests that limit (extended resources
    must have request == limit). Pods not yet bound to a node are not counted (no pool is known for
    them); they appear as a `pods_unbound` warning.
  * The model comes from node labels (GPU feature discovery's `nvidia.com/gpu.product`, Ascend's
    `accelerator`, cloud labels ...) through the catalog's name table or the site's mapping, else
    from the resource's default, with a `model_guessed` warning. A node whose GPUs are MIG slices
    (`nvidia.com/mig.strategy` single, or a product naming MIG) is left out, as in the nvidia-smi
    adapter: the broker places whole devices.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from adapters.inventory import Inventory, catalog_model, make_pool, sanitize_model, to_int

# Device-plugin resource -> (arch, model when no label says better)
RESOURCES: dict[str, tuple[str, str | None]] = {
    "nvidia.com/gpu": ("GPU", None),
    "huawei.com/Ascend910": ("ASIC", "Ascend-910B"),
    "huawei.com/Ascend910B": ("ASIC", "Ascend-910B"),
    "huawei.com/Ascend310P": ("ASIC", "Ascend-310P"),
    "huawei.com/Ascend310": ("ASIC", "Ascend-310"),
    "cambricon.com/mlu": ("ASIC", "MLU370-X8"),
    "hygon.com/dcu": ("GPU", "Hygon-DCU-Z100"),
    "baidu.com/kunlun": ("ASIC", "Kunlun-R200"),
    "kunlunxin.com/xpu": ("ASIC", "Kunlun-R200"),
    "iluvatar.ai/gpu": ("GPU", None),
    "enflame.com/gcu": ("ASIC", None),
    "metax-tech.com/gpu": ("GPU", None),
    "mthreads.com/gpu": ("GPU", None),
}

# Labels that name a device model, most specific first. instance-type names a machine, not a model,
# so it only counts through the site's own mapping.
MODEL_LABELS: tuple[str, ...] = (
    "nvidia.com/gpu.product",
    "node.kubernetes.io/npu.chip.name",
    "accelerator",
    "cloud.google.com/gke-accelerator",
    "aliyun.accelerator/nvidia_name",
    "node.kubernetes.io/instance-type",
)
MAPPING_ONLY_LABELS = frozenset({"node.kubernetes.io/instance-type"})
INTERCONNECT_LABEL = "suanwang.io/interconnect"
FINISHED_PHASES = frozenset({"Succeeded", "Failed"})


def _ready(node: Mapping[str, Any]) -> bool:
    conditions = node.get("status", {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _quantity(value: Any) -> int:
    # Device resources are whole numbers ("8"); anything else (CPU "500m", memory "1Gi") is not ours.
    if value is None:
        return 0
    return to_int(str(value)) or 0


def _pod_request(pod: Mapping[str, Any], resource: str) -> int:
    spec = pod.get("spec", {})

    def one(container: Mapping[str, Any]) -> int:
        resources = container.get("resources") or {}
        requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
        return _quantity(requests.get(resource, limits.get(resource)))

    main = sum(one(c) for c in spec.get("containers") or [])
    init = max((one(c) for c in spec.get("initContainers") or []), default=0)
    return max(main, init)


def _model_for(
    labels: Mapping[str, str], resource: str, models: Mapping[str, str], label_order: Sequence[str]
) -> tuple[str, bool]:
    """(model, guessed) for one node's resource."""
    first_product: str | None = None
    for label in label_order:
        value = labels.get(label)
        if not value:
            continue
        if value in models:
            return models[value], False
        if label in MAPPING_ONLY_LABELS:
            continue
        model, known = catalog_model(value)
        if known:
            return model, False
        first_product = first_product or value
    default = RESOURCES.get(resource, ("GPU", None))[1]
    if resource in models:
        return models[resource], False
    if first_product:
        return sanitize_model(first_product), True
    return default or sanitize_model(resource.replace("/", "-")), True


def _interconnect(labels: Mapping[str, str]) -> str | None:
    if labels.get(INTERCONNECT_LABEL):
        return labels[INTERCONNECT_LABEL]
    product = labels.get("nvidia.com/gpu.product", "").upper()
    if "SXM" in product:
        return "nvlink"
    if "PCIE" in product:
        return "pcie"
    kind = labels.get("accelerator-type", "").lower()
    if kind.startswith("card"):
        return "pcie"
    if kind.startswith("module"):
        return "hccs"
    return None


def parse_kubernetes(
    nodes_doc: Mapping[str, Any],
    pods_doc: Mapping[str, Any] | None = None,
    *,
    models: Mapping[str, str] | None = None,
    resources: Mapping[str, str] | None = None,
    model_labels: Sequence[str] = MODEL_LABELS,
) -> Inventory:
    """Pools (one per device model) from kubectl's JSON; `resources` adds resource -> arch entries."""
    inv = Inventory()
    models = dict(models or {})
    known_resources = {name: arch for name, (arch, _) in RESOURCES.items()} | dict(resources or {})
    # model -> accumulated figures
    pools: dict[str, dict[str, Any]] = {}
    where: dict[tuple[str, str], str] = {}  # (node, resource) -> model
    guessed: set[str] = set()
    for node in nodes_doc.get("items") or []:
        name = node.get("metadata", {}).get("name", "?")
        labels = node.get("metadata", {}).get("labels") or {}
        allocatable = node.get("status", {}).get("allocatable") or {}
        counts = {r: _quantity(allocatable.get(r)) for r in known_resources}
        devices = {r: n for r, n in counts.items() if n > 0}
        if not devices:
            continue
        held = sum(devices.values())
        if node.get("spec", {}).get("unschedulable"):
            inv.warn("node_cordoned", name, f"node {name} is cordoned: its {held} devices are left out")
            continue
        if not _ready(node):
            inv.warn("node_not_ready", name, f"node {name} is not Ready: its {held} devices are left out")
            continue
        if labels.get("nvidia.com/mig.strategy") == "single" or "MIG" in labels.get("nvidia.com/gpu.product", ""):
            inv.warn("mig_enabled", name, f"node {name} offers MIG slices, not whole GPUs: left out")
            devices.pop("nvidia.com/gpu", None)
        for resource, count in devices.items():
            model, guess = _model_for(labels, resource, models, model_labels)
            if guess and model not in guessed:
                guessed.add(model)
                inv.warn("model_guessed", name, f"no label names the model of {resource} on {name}: using {model!r}")
            pool = pools.setdefault(model, {"arch": known_resources[resource], "total": 0, "used": 0, "per_node": 0,
                                            "memory": [], "interconnect": _interconnect(labels)})  # fmt: skip
            pool["total"] += count
            pool["per_node"] = max(pool["per_node"], count)
            memory = to_int(labels.get("nvidia.com/gpu.memory")) if resource == "nvidia.com/gpu" else None
            if memory:
                pool["memory"].append(memory)
            where[(name, resource)] = model

    unbound = 0
    for pod in (pods_doc or {}).get("items") or []:
        if pod.get("status", {}).get("phase") in FINISHED_PHASES:
            continue
        node_name = pod.get("spec", {}).get("nodeName")
        for resource in known_resources:
            wanted = _pod_request(pod, resource)
            if not wanted:
                continue
            if not node_name:
                unbound += 1
            elif (node_name, resource) in where:
                pools[where[(node_name, resource)]]["used"] += wanted
    if unbound:
        inv.warn("pods_unbound", "pods", f"{unbound} pending pods want devices but are not bound to a node yet")

    for model, p in pools.items():
        inv.pools.append(
            make_pool(model, p["arch"], p["total"], p["used"], memory_mib=min(p["memory"]) if p["memory"] else None,
                      per_node=p["per_node"], interconnect=p["interconnect"])
        )  # fmt: skip
    return inv
