"""The real-inventory adapter loop: read the source, publish capacity, run (or refuse) assignments.

One `InventoryAdapter` per site. Every `interval` seconds it reads its source (command or files),
applies the site config, and hands the pools to its `SiteLink`, which publishes at once when they
changed and heartbeats them in between. Assignments go to a `SlurmExecutor` (Slurm: real sbatch
jobs) or a `LeaseKeeper` (sources that cannot start work: nvidia-smi, npu-smi, Kubernetes nodes).
For Slurm the pools' in_use_external leaves out what our own jobs hold, since the broker accounts
for those itself and Slurm says exactly which allocations are ours. A leased device's use cannot be
told apart from local work, so it stays counted: the broker sees it busy twice until the lease
ends, which under-offers but never over-books.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from adapters.inventory import Finding, Inventory
from adapters.inventory.slurm import SlurmInventory
from adapters.lease import LeaseKeeper
from adapters.site import SiteLink
from adapters.siteconfig import SiteConfig
from adapters.slurm_jobs import SlurmExecutor
from adapters.sources import READERS, Reader, SourceError, slurm_command
from common import logs
from common.config import MqttTarget
from regions import load_geography

log = logs.get("adapters.runner")

# Consecutive failed reads after which the site publishes no pools rather than stale ones.
MAX_FAILURES = 3


def site_energy(config: SiteConfig) -> dict[str, float]:
    """The config's energy figures, else the hub's (as the seeded fleet does)."""
    if config.energy is not None:
        return config.energy.model_dump()
    hub = load_geography().hubs[config.hub]
    return {"pue": hub.pue, "green_share": hub.green_share, "tariff_cny_per_kwh": hub.tariff_cny_per_kwh}


class InventoryAdapter:
    """One real site: a reader, a SiteLink, and what runs its assignments (Slurm jobs or leases)."""

    def __init__(self, source: str, config: SiteConfig, link: SiteLink, reader: Reader,
                 executor: SlurmExecutor | None = None) -> None:  # fmt: skip
        self.source = source
        self.config = config
        self.link = link
        self.reader = reader
        self.executor = executor
        self.jobs: SlurmExecutor | LeaseKeeper = executor or LeaseKeeper(link, config.lease.time_scale)
        self.leases = self.jobs if isinstance(self.jobs, LeaseKeeper) else None
        self.failures = 0
        self.last: Inventory | None = None
        self._warned: set[Finding] = set()
        link.on_assignments = self.jobs.on_assignments

    def _log_new_warnings(self, warnings: list[Finding]) -> None:
        # Log a warning when it first appears, not on every read: a lost GPU stays lost for hours.
        current = set(warnings)
        for finding in warnings:
            if finding not in self._warned:
                log.warning("inventory." + finding.code, site=self.link.site, subject=finding.subject,
                            detail=finding.message)  # fmt: skip
        self._warned = current

    def pools(self, inventory: Inventory) -> list[dict[str, Any]]:
        """The pools to publish for an inventory: config applied, our own Slurm jobs not counted as outside use."""
        pools = self.config.finish(inventory)
        own = self.executor.own_usage() if self.executor else {}
        for pool in pools:
            pool["in_use_external"] = max(0, pool["in_use_external"] - own.get(pool["model"], 0))
        return pools

    async def refresh(self) -> bool:
        """Read the source once and publish what changed; False if the read failed."""
        try:
            inventory = await self.reader()
        except SourceError as exc:
            self.failures += 1
            log.warning("inventory.unreadable", site=self.link.site, error=str(exc), failures=self.failures)
            if self.failures == MAX_FAILURES and self.link.pools:
                log.error("inventory.withdrawn", site=self.link.site, after_failures=self.failures)
                self.link.set_capacity([])
            return False
        self.publish(inventory)
        return True

    def publish(self, inventory: Inventory) -> None:
        """Hand a fresh inventory to the link (which publishes only if the pools changed)."""
        self.failures = 0
        self.last = inventory
        if self.executor is not None and isinstance(inventory, SlurmInventory):
            self.executor.targets = inventory.targets
        pools = self.pools(inventory)
        self._log_new_warnings(inventory.warnings)
        if [p.model_dump(mode="json") for p in self.link.pools] != pools:
            self.link.set_capacity(pools)
            log.info("capacity", site=self.link.site, pools={p["model"]: (p["total"], p["in_use_external"])
                                                              for p in pools})  # fmt: skip

    async def step(self) -> None:
        """One round: follow our Slurm jobs, then re-read the inventory."""
        if self.executor is not None:
            try:
                await self.executor.poll()
            except SourceError as exc:
                log.warning("slurm.poll_failed", site=self.link.site, error=str(exc))
        await self.refresh()


def build_adapter(
    source: str, config: SiteConfig, mqtt: MqttTarget, *, files: Sequence[Path] = (), heartbeat: float | None = None
) -> InventoryAdapter:
    """An adapter (not yet running) for `source`, one of READERS."""
    reader = READERS[source](config, files)
    link = SiteLink(
        mqtt, config.site, config.hub, [], cluster=config.cluster, energy=site_energy(config),
        bandwidth_gbps=config.bandwidth_gbps, interval=heartbeat or config.heartbeat,
    )  # fmt: skip
    executor = None
    if source == "slurm":
        opts = config.slurm
        executor = SlurmExecutor(
            link, command=lambda name: slurm_command(config, name), job_command=opts.command,
            time_scale=opts.time_scale, workdir=opts.workdir,
            extra_args=[*(["--account", opts.account] if opts.account else []),
                        *(["--qos", opts.qos] if opts.qos else []), *opts.sbatch_args],
        )  # fmt: skip
    return InventoryAdapter(source, config, link, reader, executor)


async def run_adapter(
    source: str, config: SiteConfig, mqtt: MqttTarget, *, interval: float | None = None,
    files: Sequence[Path] = (), stop: asyncio.Event | None = None, heartbeat: float | None = None,
) -> None:  # fmt: skip
    """Run one site until `stop` is set (or the task is cancelled).

    The first read must succeed: a site that cannot read its inventory at start is misconfigured
    (wrong command, no permission), and saying so beats announcing an empty site.
    """
    adapter = build_adapter(source, config, mqtt, files=files, heartbeat=heartbeat)
    interval = interval or config.interval
    if adapter.executor is not None and not files:
        await adapter.executor.recover()
    try:
        adapter.publish(await adapter.reader())
    except SourceError as exc:
        raise SourceError(f"site {config.site}: cannot read {source} inventory: {exc}") from None
    stop = stop or asyncio.Event()
    log.info("adapter starting", site=config.site, source=source, mqtt=f"{mqtt.host}:{mqtt.port}", interval=interval)
    tasks = [asyncio.create_task(adapter.link.run(), name=f"site-{config.site}")]
    if adapter.executor is not None:
        tasks.append(asyncio.create_task(adapter.executor.work(), name=f"slurm-{config.site}"))
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await stop.wait()
            if stop.is_set():
                break
            for task in tasks:
                if task.done():  # a link or worker only ends by crashing: surface it
                    task.result()
            await adapter.step()
    finally:
        if adapter.leases is not None:
            await adapter.leases.close()
        adapter.link.stop()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5.0):
                await asyncio.gather(tasks[0], return_exceptions=True)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
