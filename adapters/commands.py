"""`suanwang adapter nvidia-smi|npu-smi|kubernetes|slurm`: one command per real inventory source.

Kept free of heavy imports (the runner, pydantic models, MQTT) so `suanwang --help` stays fast; the
command body imports what it needs.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import click

from common.config import DEFAULT_MQTT

# source -> (what it reads, what --from-file takes)
SOURCES: dict[str, tuple[str, str]] = {
    "nvidia-smi": ("NVIDIA GPUs of this host, from nvidia-smi", "GPUS.csv [APPS.csv [LIST.txt]]"),
    "npu-smi": ("Huawei Ascend NPUs of this host, from npu-smi info", "INFO.txt"),
    "kubernetes": ("Accelerators of a Kubernetes cluster, from kubectl get nodes/pods", "NODES.json [PODS.json]"),
    "slurm": ("A Slurm cluster's GPUs and CPUs; assignments run as sbatch jobs", "SCONTROL_OR_SINFO.txt"),
}


def _command(source: str) -> click.Command:
    what, files_help = SOURCES[source]

    @click.command(source, help=f"{what}.\n\nSite identity, prices and options come from the TOML --config file "
                                f"(examples in adapters/examples/).")  # fmt: skip
    @click.option("--config", "config_path", required=True, type=click.Path(exists=True, dir_okay=False),
                  help="Site config file (TOML)")  # fmt: skip
    @click.option("--mqtt", "mqtt_url", envvar="SUANWANG_MQTT_URL", show_envvar=True,
                  help=f"MQTT URL, mqtt://user:pass@host:port [default: {DEFAULT_MQTT}]")  # fmt: skip
    @click.option("--interval", type=float, default=None,
                  help="Seconds between inventory reads [default: the config's interval, 30]")  # fmt: skip
    @click.option("--from-file", "from_files", multiple=True, type=click.Path(exists=True, dir_okay=False),
                  help=f"Read saved output instead of running the tool (repeat for: {files_help})")  # fmt: skip
    @click.option("--log-level", default="info", show_default=True,
                  type=click.Choice(["debug", "info", "warning", "error"]))  # fmt: skip
    def run(config_path: str, mqtt_url: str | None, interval: float | None, from_files: tuple[str, ...],
            log_level: str) -> None:  # fmt: skip
        from adapters.runner import run_adapter
        from adapters.siteconfig import load_site_config
        from common import logs
        from common.config import MqttTarget
        from common.errors import SuanwangError

        if interval is not None and interval <= 0:
            raise click.BadParameter("must be positive", param_hint="--interval")
        logs.configure(log_level)

        async def _main() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            config = load_site_config(config_path)
            target = MqttTarget.from_url(mqtt_url or DEFAULT_MQTT)
            await run_adapter(source, config, target, interval=interval, files=[Path(f) for f in from_files],
                              stop=stop)  # fmt: skip

        try:
            asyncio.run(_main())
        except SuanwangError as exc:
            raise click.ClickException(str(exc)) from None

    return run


def register(group: click.Group) -> None:
    """Add one command per real inventory source to `group` (the `suanwang adapter` group)."""
    for source in SOURCES:
        group.add_command(_command(source))
