"""Simulated sites: publish a hub's seeded (or synthesised) capacity, run assignments as timers.

Each simulated site keeps its own ledger, as a real site would: it checks an assignment against what
it has free locally, so a broker that over-allocates sees rejections rather than silent success.
Capacity messages report totals and outside use only; the broker accounts for its own allocations.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import signal

from adapters.fleet import sites_for_hub
from adapters.ledger import Held, Ledger
from adapters.site import SiteLink
from common import logs
from common.config import MqttTarget
from common.protocol import SiteEventKind
from regions import SiteSeed

log = logs.get("adapters.sim")


class SimSite(Ledger):
    """One simulated site: its MQTT link plus the ledger of the jobs it runs; some fail on purpose."""

    def __init__(self, seed: SiteSeed, link: SiteLink, time_scale: float, fail_rate: float,
                 rng: random.Random) -> None:  # fmt: skip
        super().__init__(link, time_scale)
        self.seed = seed
        self.fail_rate = fail_rate
        self.rng = rng

    @property
    def running(self) -> dict[tuple[str, int], Held]:
        return self.held

    async def _work(self, key: tuple[str, int], seconds: float) -> None:
        if self.fail_rate > 0 and self.rng.random() < self.fail_rate:
            # a failure strikes part-way through, as a crashed node would
            await asyncio.sleep(seconds * self.rng.random())
            self.link.emit(key[0], key[1], SiteEventKind.FAILED, "simulated failure")
            log.info("job failed", site=self.link.site, job=key[0], attempt=key[1])
            return
        await super()._work(key, seconds)


def build_sites(
    mqtt: MqttTarget,
    seeds: list[SiteSeed],
    *,
    time_scale: float = 3600.0,
    interval: float = 5.0,
    fail_rate: float = 0.0,
    seed: int = 0,
) -> list[SimSite]:
    """A SimSite (not yet running) for each seed; split out so callers can drive the links themselves."""
    if time_scale <= 0:
        raise ValueError("time_scale must be positive")
    if not 0.0 <= fail_rate <= 1.0:
        raise ValueError("fail_rate must be within [0, 1]")
    out: list[SimSite] = []
    for site_seed in seeds:
        link = SiteLink(
            mqtt, site_seed.id, site_seed.hub, site_seed.pools,
            cluster=site_seed.cluster, energy=site_seed.energy, interval=interval,
        )  # fmt: skip
        sim = SimSite(
            seed=site_seed, link=link, time_scale=time_scale, fail_rate=fail_rate,
            rng=random.Random(f"{seed}:{site_seed.id}"),  # per site, so results do not depend on timing
        )  # fmt: skip
        link.on_assignments = sim.on_assignments
        out.append(sim)
    return out


async def run_sim(
    mqtt: MqttTarget,
    hub: str,
    sites: int | None = None,
    *,
    time_scale: float = 3600.0,
    interval: float = 5.0,
    fail_rate: float = 0.0,
    seed: int = 0,
    stop: asyncio.Event | None = None,
    site_ids: list[str] | None = None,
) -> None:
    """Run the simulated sites of `hub` until `stop` is set (or the task is cancelled).

    `site_ids`, if given, runs only those sites out of `sites_for_hub(hub, sites, seed)`, so one hub
    can be spread over several processes.
    """
    seeds = sites_for_hub(hub, sites, seed)
    if site_ids is not None:
        wanted = set(site_ids)
        unknown = wanted - {s.id for s in seeds}
        if unknown:
            raise ValueError(f"unknown site ids for hub {hub}: {sorted(unknown)}")
        seeds = [s for s in seeds if s.id in wanted]
    sims = build_sites(mqtt, seeds, time_scale=time_scale, interval=interval, fail_rate=fail_rate, seed=seed)
    log.info("simulated sites starting", hub=hub, sites=len(sims), mqtt=f"{mqtt.host}:{mqtt.port}")
    await run_sites(sims, stop)


async def run_sites(sims: list[SimSite], stop: asyncio.Event | None = None) -> None:
    """Run simulated sites until `stop` is set (or the task is cancelled), then take them offline."""
    stop = stop or asyncio.Event()
    links = [asyncio.create_task(sim.link.run(), name=f"site-{sim.link.site}") for sim in sims]
    waiter = asyncio.create_task(stop.wait())
    try:
        # A link only returns early if it crashed; surface that instead of running on short-handed.
        done, _ = await asyncio.wait([waiter, *links], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not waiter:
                task.result()
    finally:
        waiter.cancel()
        for sim in sims:
            sim.link.stop()
        await asyncio.gather(*(sim.close() for sim in sims), return_exceptions=True)
        # Give links a moment to say `offline`; the Last Will covers any that cannot.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5.0):
                await asyncio.gather(*links, return_exceptions=True)
        for task in links:
            task.cancel()
        await asyncio.gather(*links, return_exceptions=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m adapters.sim", description="Simulated Suanwang sites")
    parser.add_argument("--mqtt", default="mqtt://127.0.0.1:1883", help="mqtt://user:pass@host:port")
    parser.add_argument("--hub", required=True)
    parser.add_argument("--sites", type=int, default=None, help="number of sites (default: the seeded ones)")
    parser.add_argument("--time-scale", type=float, default=3600.0, help="simulated seconds per real second")
    parser.add_argument("--interval", type=float, default=5.0, help="capacity heartbeat seconds")
    parser.add_argument("--fail-rate", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logs.configure(args.log_level, json=True)

    async def _main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run_sim(
            MqttTarget.from_url(args.mqtt), args.hub, args.sites, time_scale=args.time_scale,
            interval=args.interval, fail_rate=args.fail_rate, seed=args.seed, stop=stop,
        )  # fmt: skip

    asyncio.run(_main())


if __name__ == "__main__":
    main()
