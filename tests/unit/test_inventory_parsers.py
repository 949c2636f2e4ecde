"""Inventory parsers on recorded tool output, site config validation, and the Slurm job ledger (no servers)."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from adapters.inventory import Inventory, catalog_model, sanitize_model
from adapters.inventory.ascend import parse_npu_smi
from adapters.inventory.kubernetes import parse_kubernetes
from adapters.inventory.nvidia import parse_nvidia_smi
from adapters.inventory.slurm import SlurmTarget, parse_gres, parse_slurm
from adapters.lease import LeaseKeeper
from adapters.runner import InventoryAdapter
from adapters.siteconfig import load_site_config, parse_site_config
from adapters.slurm_jobs import SlurmExecutor, gres_args
from adapters.sources import Output
from common.errors import InvalidInput
from common.protocol import CAPACITY_SCHEMA, Assignment, Assignments, Capacity, Pool
from regions import load_devices

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "adapters"
EXAMPLES = Path(__file__).resolve().parents[2] / "adapters" / "examples"


def text(*parts: str) -> str:
    return (FIXTURES.joinpath(*parts)).read_text()


def nvidia(gpus: str, apps: str | None = None, listing: str | None = None, **kw: Any) -> Inventory:
    return parse_nvidia_smi(text("nvidia", gpus), text("nvidia", apps) if apps else "",
                            text("nvidia", listing) if listing else "", **kw)  # fmt: skip


def kube(nodes: str, pods: str | None = None, **kw: Any) -> Inventory:
    pods_doc = json.loads(text("kubernetes", pods)) if pods else None
    return parse_kubernetes(json.loads(text("kubernetes", nodes)), pods_doc, **kw)


def summary(inv: Inventory) -> dict[str, tuple[str, int, int, float, int]]:
    """model -> (arch, total, in_use_external, memory_gb, per_node)."""
    return {p["model"]: (p["arch"], p["total"], p["in_use_external"], p["memory_gb"], p["per_node"]) for p in inv.pools}


S22 = {"gpu:a100": "A100-80G", "h800": "H800", "cpu": "Xeon-8480"}

# (id, parse, expected pools, expected warning codes with counts)
CASES: list[tuple[str, Any, dict[str, tuple[str, int, int, float, int]], dict[str, int]]] = [
    # nvidia-smi: driver 470 names have no "NVIDIA " prefix; GPU 1 has a process, GPU 5 is at 100 %.
    ("nvidia-470-a100-40g", lambda: nvidia("driver470-a100-40g.csv", "driver470-a100-40g-apps.csv"),
     {"A100-40G": ("GPU", 8, 2, 40.0, 8)}, {}),
    # driver 535: one GPU "[GPU is lost]", one "ERR!", one without a device handle; processes on two.
    ("nvidia-535-h800-lost", lambda: nvidia("driver535-h800-lost.csv", "driver535-h800-lost-apps.csv"),
     {"H800": ("GPU", 5, 2, 80.0, 8)}, {"gpu_lost": 3}),
    # MIG mode from the mig.mode.current column: partitioned GPUs count but are in use.
    ("nvidia-535-mig-column", lambda: nvidia("driver535-a100-80g-mig.csv"),
     {"A100-80G": ("GPU", 4, 2, 80.0, 4)}, {"mig_enabled": 2}),
    # The same host on a query without that column: `nvidia-smi -L` shows the MIG devices.
    ("nvidia-535-mig-listing",
     lambda: nvidia("driver535-a100-80g-mig-7col.csv", listing="driver535-a100-80g-mig-list.txt"),
     {"A100-80G": ("GPU", 4, 2, 80.0, 4)}, {"mig_enabled": 2}),
    # A container that sees only a MIG instance offers nothing.
    ("nvidia-mig-instance", lambda: nvidia("container-mig-instance.csv"), {}, {"mig_instance": 1}),
    # driver 550: three catalog models (the H20's 95.6 GB measured is published as its catalog 96); busy rules.
    ("nvidia-550-mixed", lambda: nvidia("driver550-l20-4090.csv", "driver550-l20-4090-apps.csv"),
     {"L20": ("GPU", 4, 1, 48.0, 4), "RTX-4090": ("GPU", 2, 1, 24.0, 2), "H20": ("GPU", 1, 0, 96.0, 1)}, {}),
    # The site maps the H20 to a model the catalog lacks: the measured memory is kept.
    ("nvidia-550-mapped-and-strict", lambda: nvidia("driver550-l20-4090.csv", "driver550-l20-4090-apps.csv",
                                                    models={"NVIDIA H20": "H20-96G"}, busy_memory_mib=4096),
     {"L20": ("GPU", 4, 0, 48.0, 4), "RTX-4090": ("GPU", 2, 1, 24.0, 2), "H20-96G": ("GPU", 1, 0, 95.6, 1)}, {}),
    ("nvidia-empty", lambda: parse_nvidia_smi("No devices were found\n"), {}, {}),
    # npu-smi 23.0, eight 910B3: NPU 5 in Alarm is left out; processes on NPU 0 and 1.
    ("ascend-23.0-910b3", lambda: parse_npu_smi(text("ascend", "npu-smi-23.0-910b3.txt")),
     {"Ascend-910B": ("ASIC", 7, 2, 64.0, 8)}, {"npu_unhealthy": 1}),
    # npu-smi 24.1, eight 910B4 (32 GB HBM, not the catalog's 64): Warning stays, Critical goes, AICore busy.
    ("ascend-24.1-910b4", lambda: parse_npu_smi(text("ascend", "npu-smi-24.1-910b4.txt")),
     {"Ascend-910B": ("ASIC", 7, 1, 32.0, 8)}, {"npu_warning": 1, "npu_unhealthy": 1}),
    # 310P3 Duo cards: two chips per NPU, the Alarm card's two chips left out, one chip with a process.
    ("ascend-23.0-310p3-duo", lambda: parse_npu_smi(text("ascend", "npu-smi-23.0-310p3-duo.txt")),
     {"Ascend-310P": ("ASIC", 4, 1, 24.0, 6)}, {"npu_unhealthy": 2}),
    # kubectl: GPU, Ascend (910/310P) and MLU nodes; one cordoned, one NotReady; finished pods ignored.
    ("kubernetes-mixed", lambda: kube("nodes.json", "pods.json"),
     {"A100-80G": ("GPU", 16, 5, 80.0, 8), "Ascend-910B": ("ASIC", 8, 3, 64.0, 8),
      "Ascend-310P": ("ASIC", 4, 0, 24.0, 4), "MLU370-X8": ("ASIC", 8, 2, 48.0, 8)},
     {"node_cordoned": 1, "node_not_ready": 1, "model_guessed": 1, "pods_unbound": 1}),
    ("kubernetes-nodes-only", lambda: kube("nodes.json", models={"cambricon.com/mlu": "MLU590"}),
     {"A100-80G": ("GPU", 16, 0, 80.0, 8), "Ascend-910B": ("ASIC", 8, 0, 64.0, 8),
      "Ascend-310P": ("ASIC", 4, 0, 24.0, 4), "MLU590": ("ASIC", 8, 0, 80.0, 8)},
     {"node_cordoned": 1, "node_not_ready": 1}),
    # GKE labels; a MIG-sliced node is left out; an instance type counts only through the mapping.
    ("kubernetes-gke", lambda: kube("nodes-gke.json", models={"g2-standard-8": "L4"}),
     {"T4": ("GPU", 4, 0, 16.0, 4), "L4": ("GPU", 1, 0, 0.0, 1)}, {"mig_enabled": 1}),
    # scontrol 22.05: drained and down nodes out; a node in two partitions counted once; CPU-only nodes.
    ("slurm-22.05", lambda: parse_slurm(text("slurm", "scontrol-22.05-show-node.txt"), models=S22),
     {"A100-80G": ("GPU", 16, 2, 80.0, 8), "H800": ("GPU", 8, 8, 80.0, 8), "L20": ("GPU", 4, 3, 48.0, 4),
      "T4": ("GPU", 2, 0, 16.0, 2), "Xeon-8480": ("CPU", 256, 64, 3.93, 128)},
     {"node_unavailable": 3, "model_guessed": 2}),
    ("slurm-22.05-one-partition", lambda: parse_slurm(text("slurm", "scontrol-22.05-show-node.txt"), models=S22,
                                                      partitions=["debug"]),
     {"A100-80G": ("GPU", 8, 2, 80.0, 8)}, {}),
    # scontrol 23.11: untyped GRES with (null) types, mps ignored, draining / not responding nodes out.
    ("slurm-23.11", lambda: parse_slurm(text("slurm", "scontrol-23.11-show-node.txt"),
                                        models={"train/gpu": "A800", "arm/cpu": "Kunpeng-920"}),
     {"A800": ("GPU", 16, 3, 80.0, 8), "Kunpeng-920": ("CPU", 192, 0, 7.83, 192)}, {"node_unavailable": 2}),
    ("slurm-sinfo-O",
     lambda: parse_slurm(text("slurm", "sinfo-O.txt"), models={"a100": "A100-80G", "cpu": "EPYC-9654"}),
     {"A100-80G": ("GPU", 16, 2, 80.0, 8), "EPYC-9654": ("CPU", 256, 64, 3.93, 128)}, {"node_unavailable": 2}),
    ("slurm-sinfo-plain", lambda: parse_slurm(text("slurm", "sinfo-o-plain.txt")),
     {"A100-40G": ("GPU", 16, 0, 40.0, 8)}, {"gres_used_unknown": 2, "model_guessed": 1, "node_unavailable": 1}),
]  # fmt: skip


@pytest.mark.parametrize(("parse", "pools", "warnings"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_parser_pools_and_warnings(parse: Any, pools: dict[str, Any], warnings: dict[str, int]) -> None:
    """Each recorded output gives the expected pools and exactly the expected kinds of warnings."""
    inv = parse()
    assert summary(inv) == pools
    assert Counter(inv.codes()) == Counter(warnings)


@pytest.mark.parametrize("parse", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_every_pool_is_a_valid_capacity_pool(parse: Any) -> None:
    """Every produced pool validates as common.protocol.Pool, and together they make a valid capacity message."""
    pools = [Pool.model_validate(p) for p in parse().pools]
    Capacity(schema=CAPACITY_SCHEMA, site="s1", hub="guizhou", seq=1, pools=tuple(pools))  # type: ignore[arg-type]


def test_lost_gpus_name_their_bus() -> None:
    """Warnings about lost GPUs say which GPU, so an operator can find it."""
    inv = nvidia("driver535-h800-lost.csv")
    assert {w.subject for w in inv.warnings} == {"00000000:4E:00.0", "00000000:B7:00.0", "0000:BD:00.0"}


def test_kubernetes_warnings_name_the_nodes() -> None:
    inv = kube("nodes.json", "pods.json")
    subjects = {w.code: w.subject for w in inv.warnings}
    assert subjects["node_cordoned"] == "gpu-l20-01"
    assert subjects["node_not_ready"] == "npu-910b-02"


def test_kubernetes_interconnect_from_labels() -> None:
    pools = {p["model"]: p for p in kube("nodes.json").pools}
    assert pools["A100-80G"]["interconnect"] == "nvlink"  # SXM in the GPU product label
    assert pools["Ascend-310P"]["interconnect"] == "pcie"  # accelerator-type=card


def test_slurm_targets_say_how_to_submit() -> None:
    inv = parse_slurm(text("slurm", "scontrol-22.05-show-node.txt"), models=S22)
    assert inv.targets["A100-80G"] == SlurmTarget(("gpu", "debug"), "gpu", "a100", 8)
    assert inv.targets["Xeon-8480"] == SlurmTarget(("cpu",), None, None, 128)


@pytest.mark.parametrize(
    ("gres", "expected"),
    [
        ("gpu:a100:8(S:0-1)", {("gpu", "a100"): 8}),
        ("gpu:a100:3(IDX:0-1,3)", {("gpu", "a100"): 3}),
        ("gpu:l20:4(S:0),gpu:t4:2(S:1)", {("gpu", "l20"): 4, ("gpu", "t4"): 2}),
        ("gpu:(null):3(IDX:0,2,5),mps:0(IDX:N/A)", {("gpu", None): 3, ("mps", None): 0}),
        ("gpu:8", {("gpu", None): 8}),
        ("(null)", {}),
        ("", {}),
    ],
)
def test_parse_gres(gres: str, expected: dict[tuple[str, str | None], int]) -> None:
    assert parse_gres(gres) == expected


@pytest.mark.parametrize(
    ("name", "model", "known"),
    [
        ("NVIDIA A100-SXM4-80GB", "A100-80G", True),
        ("A100-PCIE-40GB", "A100-40G", True),
        ("NVIDIA-A100-SXM4-80GB", "A100-80G", True),
        ("NVIDIA H800", "H800", True),
        ("NVIDIA H100 80GB HBM3", "H100", True),
        ("NVIDIA L20", "L20", True),
        ("NVIDIA GeForce RTX 4090", "RTX-4090", True),
        ("Tesla T4", "T4", True),
        ("nvidia-tesla-t4", "T4", True),
        ("Ascend910B3", "Ascend-910B", True),
        ("huawei-Ascend310P", "Ascend-310P", True),
        ("NVIDIA Quadro P800", "Quadro-P800", False),
        ("NVIDIA GH200 480GB", "GH200-480GB", False),
        # nvidia-smi names of the China installed base, and their neighbours that must not match them
        ("NVIDIA H20", "H20", True),
        ("NVIDIA H200", "H200", True),
        ("NVIDIA H200 NVL", "H200", True),
        ("NVIDIA L40S", "L40S", True),
        ("NVIDIA L40", "L40", False),  # not in the catalog, and not an L40S
        ("NVIDIA L4", "L4", False),
        ("NVIDIA A10", "A10", True),
        ("NVIDIA A10G", "A10G", False),  # AWS's variant, not the A10
        ("NVIDIA A10-24Q", "A10", True),  # a vGPU profile on an A10
        ("NVIDIA A100 80GB PCIe", "A100-80G", True),
        ("NVIDIA A800-SXM4-80GB", "A800", True),
        ("NVIDIA A30", "A30", True),
        ("NVIDIA RTX A3000 Laptop GPU", "RTX-A3000-Laptop-GPU", False),
        ("NVIDIA RTX A1000 6GB Laptop GPU", "RTX-A1000-6GB-Laptop-GPU", False),  # not an A100
        ("Tesla V100-SXM2-32GB", "V100-32G", True),
        ("Tesla V100-PCIE-32GB", "V100-32G", True),
        ("Tesla V100S-PCIE-32GB", "V100-32G", True),
        ("Tesla V100-SXM2-16GB", "V100-16G", True),
        ("Tesla V100-PCIE-16GB", "V100-16G", True),
        # lspci names: the chip (GV100GL, GA100GL, GH100) is not the product
        ("GV100GL [Tesla V100 SXM2 32GB]", "V100-32G", True),
        ("GA102GL [A10]", "A10", True),
        ("GA100GL [A30 PCIe]", "A30", True),
        ("GH100 [H20]", "H20", True),
        ("AD102GL [L40S]", "L40S", True),
        # Slurm GRES types and Kubernetes product labels
        ("h20", "H20", True),
        ("l40s", "L40S", True),
        ("a10", "A10", True),
        ("v100", "V100-16G", True),
        ("v100s", "V100-32G", True),
        ("V100_32GB", "V100-32G", True),
        ("Tesla-V100-SXM2-16GB", "V100-16G", True),
        ("NVIDIA-L40S", "L40S", True),
        # domestic parts, and Iluvatar's V100-named cards that are not NVIDIA's
        ("Iluvatar MR-V100", "Iluvatar-MR-V100", True),
        ("Iluvatar BI-V100", "Iluvatar-BI-V100", True),
        ("Ascend910_9392", "Ascend-910C", True),
        ("Ascend910C", "Ascend-910C", True),
        ("K100_AI", "Hygon-DCU-K100-AI", True),
        ("K100", "Hygon-DCU-K100", True),
        ("MetaX C500", "MetaX-C500", True),
        ("MXC500", "MetaX-C500", True),
        ("BR100", "Biren-BR100", True),
        ("BR104P", "Biren-BR104", True),
    ],
)
def test_catalog_model(name: str, model: str, known: bool) -> None:
    assert catalog_model(name) == (model, known)


def test_every_catalog_model_names_itself() -> None:
    """A catalog id given as a name maps to that id, so no name pattern steals another model's id."""
    wrong = {m: catalog_model(m) for m in load_devices() if catalog_model(m) != (m, True)}
    assert wrong == {}


@pytest.mark.parametrize(
    ("name", "mib", "model", "memory_gb"),
    [
        ("NVIDIA H20", 97871, "H20", 96.0),
        ("NVIDIA L40S", 46068, "L40S", 48.0),
        ("NVIDIA A10", 23028, "A10", 24.0),
        ("Tesla V100-SXM2-32GB", 32510, "V100-32G", 32.0),
        ("Tesla V100-SXM2-16GB", 16160, "V100-16G", 16.0),
        ("NVIDIA A30", 24258, "A30", 24.0),
    ],
)
def test_nvidia_smi_host_of_added_model(name: str, mib: int, model: str, memory_gb: float) -> None:
    """An 8-GPU host of one of these models becomes one priced catalog pool with the marketed memory, no warnings."""
    csv = "".join(f"{i}, GPU-{i:08d}-0000-0000-0000-000000000000, {name}, {mib}, 1, 0, 00000000:{i + 16:02X}:00.0\n"
                  for i in range(8))  # fmt: skip
    inv = parse_nvidia_smi(csv)
    assert summary(inv) == {model: ("GPU", 8, 0, memory_gb, 8)}
    assert inv.warnings == []
    assert inv.pools[0]["price_cny_per_hour"] == load_devices()[model].price_cny_per_hour > 0
    assert inv.pools[0]["interconnect"] == load_devices()[model].interconnect


def test_sanitize_model_always_valid() -> None:
    for raw in ("Tesla V100-SXM2-32GB", "  ??? ", "a" * 100, "GeForce RTX 3090 Ti (rev a1)"):
        Pool(arch="GPU", model=sanitize_model(raw), memory_gb=1, total=1, price_cny_per_hour=1)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- site config

BASE = {"site": "guian-gpu-01", "hub": "guizhou", "cluster": "guian"}


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"site": "Bad Site"}, "site"),
        ({"hub": "atlantis"}, "hub"),
        ({"cluster": "shaoguan"}, "cluster"),
        ({"interval": 0}, "interval"),
        ({"pools": {"A100-80G": {"price_cny_per_hour": -1}}}, "pools.A100-80G.price_cny_per_hour"),
        ({"pools": {"A100-80G": {"stacks": ["CUDA 12"]}}}, "pools.A100-80G.stacks.0"),
        ({"pools": {"A100-80G": {"prize": 3}}}, "pools.A100-80G.prize"),
        ({"models": {"gpu:a100": "A100 80G"}}, "models.gpu:a100"),
        ({"slurm": {"time_scale": 0}}, "slurm.time_scale"),
        ({"slurm": {"command": "run {script}"}}, "slurm.command"),
        ({"nvidia": {"busy_utilization": 150}}, "nvidia.busy_utilization"),
        ({"kubernetes": {"resources": {"x.com/npu": "TPU"}}}, "kubernetes.resources.x.com/npu"),
        ({"energy": {"pue": 0.5}}, "energy.pue"),
        ({"sites": "x"}, "sites"),
    ],
)
def test_site_config_errors_name_the_field(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_site_config({**BASE, **changes})
    assert caught.value.field == field
    assert field in caught.value.message


def test_missing_site_is_named() -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_site_config({"hub": "guizhou"})
    assert caught.value.field == "site"


def test_bad_toml_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_text('site = "x"\nhub = \n')
    with pytest.raises(InvalidInput, match="not valid TOML"):
        load_site_config(path)


def test_config_overrides_and_unpriced_models() -> None:
    """The config's prices and stacks win; a model the catalog lacks is offered only once priced."""
    unknown = {"NVIDIA H20": "H20-site"}  # the site names its H20s after a model the catalog lacks
    inv = nvidia("driver550-l20-4090.csv", "driver550-l20-4090-apps.csv", models=unknown)
    config = parse_site_config({**BASE, "pools": {"L20": {"price_cny_per_hour": 4.2, "stacks": ["cuda-12.6"],
                                                          "per_node": 8}}})  # fmt: skip
    pools = {p["model"]: p for p in config.finish(inv)}
    assert set(pools) == {"L20", "RTX-4090"}
    l20 = pools["L20"]
    assert (l20["price_cny_per_hour"], l20["stacks"], l20["per_node"]) == (4.2, ["cuda-12.6"], 8)
    assert "unpriced" in inv.codes()
    priced = parse_site_config({**BASE, "pools": {"H20-site": {"price_cny_per_hour": 7}}})
    assert "H20-site" in {p["model"] for p in priced.finish(nvidia("driver550-l20-4090.csv", models=unknown))}
    # Named as nvidia-smi prints it, the H20 is a catalog model and carries the catalog's price.
    catalog_inv = nvidia("driver550-l20-4090.csv")
    h20 = next(p for p in parse_site_config(BASE).finish(catalog_inv) if p["model"] == "H20")
    assert h20["price_cny_per_hour"] == load_devices()["H20"].price_cny_per_hour
    assert "unpriced" not in catalog_inv.codes()


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.toml")))
def test_example_configs_load(example: str) -> None:
    config = load_site_config(EXAMPLES / example)
    assert config.site and config.hub


# --------------------------------------------------------------------------- Slurm submission and ledger


@pytest.mark.parametrize(
    ("target", "count", "expected"),
    [
        (SlurmTarget(("gpu",), "gpu", "a100", 8), 2, ["--nodes=1", "--gres=gpu:a100:2"]),
        (SlurmTarget(("gpu",), "gpu", "a100", 8), 16, ["--nodes=2", "--gres=gpu:a100:8"]),
        (SlurmTarget(("gpu",), "gpu", "a100", 8), 12, ["--gpus=a100:12"]),
        (SlurmTarget(("gpu",), "gpu", None, 4), 4, ["--nodes=1", "--gres=gpu:4"]),
        (SlurmTarget(("cpu",), None, None, 128), 32, ["--nodes=1", "--ntasks=1", "--cpus-per-task=32"]),
        (SlurmTarget(("cpu",), None, None, 128), 256, ["--ntasks=256", "--cpus-per-task=1"]),
    ],
)
def test_gres_args(target: SlurmTarget, count: int, expected: list[str]) -> None:
    assert gres_args(target, count) == expected


class FakeLink:
    site = "hpc-01"

    def __init__(self) -> None:
        self.events: list[tuple[str, int, str, str | None]] = []

    def emit(self, job: str, attempt: int, event: str, reason: str | None = None) -> None:
        self.events.append((job, attempt, str(event), reason))


UNAVAILABLE = "Requested node configuration is not available"


class FakeSlurm:
    """Canned answers for sbatch/squeue/scontrol/scancel, recording every call."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.states: dict[str, str] = {}
        self.next_id = 100

    async def __call__(self, argv: Sequence[str]) -> Output:
        argv = list(argv)
        self.calls.append(argv)
        if argv[0] == "sbatch":
            if "--gpus=a100:9" in argv:
                return Output(1, "", f"sbatch: error: Batch job submission failed: {UNAVAILABLE}\n")
            self.next_id += 1
            self.states[str(self.next_id)] = "PENDING"
            return Output(0, f"{self.next_id}\n", "")
        if argv[0] == "squeue":
            ids = argv[argv.index("-j") + 1].split(",")
            return Output(0, "".join(f"{i}|{self.states[i]}|None\n" for i in ids if i in self.states), "")
        if argv[0] == "scancel":
            self.states[argv[1]] = "CANCELLED"
            return Output(0, "", "")
        return Output(1, "", "slurm_load_jobs error: Invalid job id specified\n")


def executor(slurm: FakeSlurm) -> tuple[SlurmExecutor, FakeLink]:
    link = FakeLink()
    ex = SlurmExecutor(link, command=lambda name: name, time_scale=3600.0, run=slurm)  # type: ignore[arg-type]
    ex.targets = {"A100-80G": SlurmTarget(("gpu",), "gpu", "a100", 8)}
    return ex, link


def run(job: str, count: int = 2, attempt: int = 1, model: str = "A100-80G", action: str = "run") -> Assignments:
    item = Assignment(job=job, attempt=attempt, action=action, model=model, count=count, duration_hours=2)  # type: ignore[arg-type]
    return Assignments(schema="suanwang.assignments/1", site="hpc-01", assignments=(item,))  # type: ignore[arg-type]


async def drain(ex: SlurmExecutor) -> None:
    while not ex._queue.empty():
        item = ex._queue.get_nowait()
        await (ex._cancel(item) if item.action == "cancel" else ex._submit(item))


async def test_slurm_ledger_lifecycle() -> None:
    """sbatch once per (job, attempt); states become events; our running jobs are not outside use."""
    slurm = FakeSlurm()
    ex, link = executor(slurm)
    ex.on_assignments(run("j1"))
    ex.on_assignments(run("j1"))  # QoS 1 redelivery
    await drain(ex)
    sbatches = [c for c in slurm.calls if c[0] == "sbatch"]
    assert len(sbatches) == 1
    assert "--job-name=j1" in sbatches[0] and "--gres=gpu:a100:2" in sbatches[0] and "--time=1" in sbatches[0]
    assert "--wrap=sleep 2" in sbatches[0]  # 2 hours at time_scale 3600
    slurm.states["101"] = "RUNNING"
    await ex.poll()
    assert ex.own_usage() == {"A100-80G": 2}
    slurm.states["101"] = "COMPLETED"
    await ex.poll()
    assert [e[2] for e in link.events] == ["accepted", "running", "completed"]
    assert ex.own_usage() == {} and not ex.ledger
    ex.on_assignments(run("j1"))  # late duplicate after completion
    await drain(ex)
    assert len([c for c in slurm.calls if c[0] == "sbatch"]) == 1


async def test_slurm_failures_rejections_and_cancels() -> None:
    slurm = FakeSlurm()
    ex, link = executor(slurm)
    for batch in (run("bad", count=9), run("nomodel", model="H100"), run("fails"), run("gone"), run("mine")):
        ex.on_assignments(batch)
    await drain(ex)
    slurm.states.update({"101": "TIMEOUT", "102": "CANCELLED"})
    ex.on_assignments(run("mine", action="cancel"))
    await drain(ex)
    await ex.poll()
    by_job = {(e[0], e[2]): e[3] for e in link.events}
    assert UNAVAILABLE in (by_job[("bad", "rejected")] or "")
    assert "not offered" in (by_job[("nomodel", "rejected")] or "")
    assert "TIMEOUT" in (by_job[("fails", "failed")] or "")
    assert "cancelled outside Suanwang" in (by_job[("gone", "failed")] or "")
    assert ("mine", "failed") not in by_job  # the broker's own cancel reports nothing back
    assert ["scancel", "103"] in slurm.calls


async def test_adapter_subtracts_own_jobs_from_outside_use() -> None:
    slurm = FakeSlurm()
    ex, _ = executor(slurm)
    ex.on_assignments(run("j1", count=2))
    await drain(ex)
    slurm.states["101"] = "RUNNING"
    await ex.poll()
    config = parse_site_config({**BASE, "models": S22})
    adapter = InventoryAdapter("slurm", config, FakeLink(), reader=None, executor=ex)  # type: ignore[arg-type]
    inventory = parse_slurm(text("slurm", "scontrol-22.05-show-node.txt"), models=S22)
    pools = {p["model"]: p for p in adapter.pools(inventory)}
    assert pools["A100-80G"]["in_use_external"] == 0  # GresUsed 2 were ours
    assert pools["H800"]["in_use_external"] == 8


async def test_leases_hold_devices_and_refuse_overbooking() -> None:
    """A site without a scheduler leases devices: local use and other leases limit what it accepts."""
    link = FakeLink()
    link.pools = tuple(Pool.model_validate(p) for p in nvidia("driver550-l20-4090.csv").pools)  # type: ignore[attr-defined]
    keeper = LeaseKeeper(link, time_scale=3600.0 * 1000)  # type: ignore[arg-type]
    keeper.on_assignments(run("a", count=2, model="L20"))  # L20: 4 total, 1 busy locally
    keeper.on_assignments(run("a", count=2, model="L20"))  # redelivery
    keeper.on_assignments(run("b", count=2, model="L20"))  # only 1 left
    keeper.on_assignments(run("c", count=1, model="A100-80G"))
    assert keeper.own_usage() == {"L20": 2}
    events = [(e[0], e[2]) for e in link.events]
    assert events == [("a", "accepted"), ("a", "running"), ("b", "rejected"), ("c", "rejected")]
    await asyncio.sleep(0.01)  # 2 hours at this scale
    assert ("a", "completed") in [(e[0], e[2]) for e in link.events]
    assert keeper.own_usage() == {}
    keeper.on_assignments(run("d", count=3, model="L20"))
    keeper.on_assignments(run("d", action="cancel"))
    assert keeper.own_usage() == {}
    await keeper.close()


async def test_slurm_recover_adopts_only_this_sites_jobs() -> None:
    """After a restart the adapter finds its running Slurm jobs again (by comment), not other sites' jobs."""

    async def squeue(argv: Sequence[str]) -> Output:
        return Output(0, "201|suanwang:hpc-01:j9:2:A100-80G:4|RUNNING\n202|suanwang:other:j8:1:A100-80G:1|RUNNING\n"
                         "203|(null)|PENDING\n", "")  # fmt: skip

    ex = SlurmExecutor(FakeLink(), command=lambda name: name, run=squeue)  # type: ignore[arg-type]
    await ex.recover()
    assert list(ex.ledger) == [("j9", 2)]
    assert ex.own_usage() == {"A100-80G": 4}
    ex.on_assignments(run("j9", attempt=2))  # the broker redelivers: nothing is submitted again
    await drain(ex)
    assert list(ex.ledger) == [("j9", 2)]
