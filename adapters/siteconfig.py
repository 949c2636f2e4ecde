"""The site config file (TOML) of a real-inventory adapter: who the site is and how to price it.

    site = "guian-gpu-01"            # the site id the broker shows
    hub = "guizhou"                  # a hub id from GET /v1/hubs
    cluster = "guian"                # optional; must belong to the hub
    bandwidth_gbps = { yangtze = 25 } # optional: measured rate into the site per hub or cluster (Gbps)
    interval = 30                    # seconds between inventory reads
    [models]                         # a tool's name for a device -> catalog model
    "gpu:a100" = "A100-80G"
    [pools."A100-80G"]               # per-model overrides of what the catalog says
    price_cny_per_hour = 12.5
    stacks = ["cuda-12.4"]
    [slurm]                          # plus [nvidia], [ascend], [kubernetes], [lease]: per-source options
    time_scale = 1.0

Unknown keys are errors, and every error names the field ("pools.A100-80G.price_cny_per_hour: ...").
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from adapters.inventory import Inventory
from adapters.inventory.kubernetes import MODEL_LABELS
from adapters.inventory.slurm import DEVICE_GRES
from common.errors import InvalidInput
from common.protocol import Energy
from common.validation import Arch, Identifier, Model, Stack
from regions import load_devices, load_geography


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


class PoolOverride(_Strict):
    arch: Arch | None = None
    price_cny_per_hour: float | None = Field(default=None, ge=0, le=1_000_000)
    memory_gb: float | None = Field(default=None, ge=0, le=100_000)
    per_node: int | None = Field(default=None, ge=1, le=1024)
    interconnect: str | None = Field(default=None, max_length=32)
    stacks: tuple[Stack, ...] | None = Field(default=None, max_length=32)


class NvidiaOptions(_Strict):
    nvidia_smi: str = "nvidia-smi"
    busy_utilization: float = Field(default=10.0, ge=0, le=100, description="GPU % that marks a GPU busy")
    busy_memory_mib: int = Field(default=1024, ge=0, description="Memory in use that marks a GPU busy")


class AscendOptions(_Strict):
    npu_smi: str = "npu-smi"
    busy_aicore: float = Field(default=10.0, ge=0, le=100)


class KubernetesOptions(_Strict):
    kubectl: str = "kubectl"
    context: str | None = None
    kubeconfig: str | None = None
    resources: dict[str, Arch] = Field(default_factory=dict, description="Extra device resources and their arch")
    model_labels: tuple[str, ...] = MODEL_LABELS


class SlurmOptions(_Strict):
    partitions: tuple[str, ...] = Field(default=(), description="Only these partitions; empty means all")
    gres: tuple[str, ...] = tuple(sorted(DEVICE_GRES))
    time_scale: float = Field(default=1.0, gt=0, le=1_000_000, description="Job seconds per real second (tests)")
    command: str = Field(default="sleep {seconds}", min_length=1, description="What a Slurm job runs")
    workdir: str | None = None
    account: str | None = None
    qos: str | None = None
    sbatch_args: tuple[str, ...] = ()
    bin_dir: str | None = Field(default=None, description="Where sbatch/squeue/scancel/scontrol are")

    @field_validator("command")
    @classmethod
    def _known_placeholders(cls, command: str) -> str:
        try:
            command.format(seconds=1, hours=1.0, job="j", attempt=1, model="m", count=1)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"{command!r} may only use {{seconds}}, {{hours}}, {{job}}, {{attempt}}, {{model}}, {{count}} ({exc})"
            ) from None
        return command


class LeaseOptions(_Strict):
    time_scale: float = Field(default=1.0, gt=0, le=1_000_000, description="Lease seconds per real second (tests)")


class SiteConfig(_Strict):
    site: Identifier
    hub: Identifier
    cluster: Identifier | None = None
    interval: float = Field(default=30.0, gt=0, le=86_400, description="Seconds between inventory reads")
    heartbeat: float = Field(default=5.0, gt=0, le=3_600, description="Seconds between capacity heartbeats")
    energy: Energy | None = None
    bandwidth_gbps: dict[Identifier, Annotated[float, Field(gt=0, le=10_000)]] = Field(
        default_factory=dict, description="Measured sustained rate into the site from a hub or cluster id, Gbps")
    models: dict[str, Model] = Field(default_factory=dict)
    pools: dict[Model, PoolOverride] = Field(default_factory=dict)
    nvidia: NvidiaOptions = NvidiaOptions()
    ascend: AscendOptions = AscendOptions()
    kubernetes: KubernetesOptions = KubernetesOptions()
    slurm: SlurmOptions = SlurmOptions()
    lease: LeaseOptions = LeaseOptions()

    @model_validator(mode="after")
    def _known_place(self) -> SiteConfig:
        geo = load_geography()
        hub = geo.hubs.get(self.hub)
        if hub is None:
            raise ValueError(f"hub: unknown hub {self.hub!r}; one of {', '.join(geo.hubs)}")
        if self.cluster is not None and self.cluster not in hub.clusters:
            raise ValueError(f"cluster: {self.cluster!r} is not in hub {self.hub!r}; one of {', '.join(hub.clusters)}")
        return self

    def finish(self, inventory: Inventory) -> list[dict[str, Any]]:
        """The pools to publish: the parser's, with this site's overrides; unpriced unknown models are dropped.

        A model the catalog does not know has no typical price, and offering it at 0 CNY would be
        silently wrong, so it is left out (with an `unpriced` warning) until the config prices it.
        """
        devices = load_devices()
        out: list[dict[str, Any]] = []
        for pool in inventory.pools:
            model = pool["model"]
            override = self.pools.get(model, PoolOverride())
            if override.price_cny_per_hour is None and model not in devices:
                inventory.warn("unpriced", model, f"model {model!r} is not in the catalog and has no price in "
                                                  f"[pools.{model!r}]: left out")  # fmt: skip
                continue
            changes = override.model_dump(exclude_none=True)
            if "stacks" in changes:
                changes["stacks"] = list(changes["stacks"])
            finished = {**pool, **changes}
            if "arch" in changes:
                finished["arch"] = str(changes["arch"])
            out.append(finished)
        return out


def _field_error(error: ValidationError) -> tuple[str, str]:
    first = error.errors(include_url=False)[0]
    loc = ".".join(str(part) for part in first["loc"])
    message = str(first["msg"]).removeprefix("Value error, ")
    if not loc and ":" in message:  # a model-level check names its field itself ("hub: ...")
        loc = message.split(":", 1)[0]
        return loc, message
    return loc, f"{loc}: {message}" if loc else message


def parse_site_config(doc: dict[str, Any], source: str = "site config") -> SiteConfig:
    """Validate a parsed TOML document; InvalidInput names the offending field."""
    try:
        return SiteConfig.model_validate(doc)
    except ValidationError as exc:
        field, message = _field_error(exc)
        raise InvalidInput(f"{source}: {message}", field or None) from None


def load_site_config(path: str | Path) -> SiteConfig:
    """Read and validate a site config file."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            doc = tomllib.load(fh)
    except OSError as exc:
        raise InvalidInput(f"cannot read site config {path}: {exc.strerror}", "config") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInput(f"{path}: not valid TOML: {exc}", "config") from None
    return parse_site_config(doc, str(path))
