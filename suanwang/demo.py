"""`suanwang demo`: the whole network on one machine, with its own Redis and MQTT when none is given."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from rich.console import Console

from adapters.sim import build_sites, run_sim, run_sites
from broker.service import Broker, start_broker
from broker.state.tokens import Tokens
from common.config import MqttTarget, Settings
from regions import load_geography
from suanwang.samples import sample_job
from suanwang.servers import EmbeddedMqtt, MosquittoServer, RedisServer, mosquitto_available
from suanwang.tour import run_tour, tour_sites
from suanwang.view import event_line

SHOWN = {"allocated", "completed", "failed", "requeued", "cancelled"}
DEMO_TENANTS = ("sjtu-ai-lab", "fintech-risk", "render-studio", "gov-cloud")


@dataclass
class DemoOptions:
    redis_url: str | None = None
    mqtt_url: str | None = None
    http: str = "127.0.0.1:8080"
    sites_per_hub: int | None = None
    time_scale: float = 1800.0
    rate: float = 2.0
    duration: float | None = None
    seed: int = 7
    quiet: bool = False
    summary_json: bool = False
    embedded_mqtt: str = "auto"  # auto (mosquitto if installed, else amqtt), mosquitto, amqtt
    tour: bool = True  # show data gravity, a hold, a preemption and reliability first (suanwang.tour)


class Servers:
    """Whatever Redis and MQTT the demo had to start itself."""

    def __init__(self) -> None:
        self.redis: RedisServer | None = None
        self.mqtt_process: MosquittoServer | None = None
        self.mqtt_embedded: EmbeddedMqtt | None = None

    async def start(self, options: DemoOptions, console: Console) -> tuple[str, str, str]:
        redis_url = options.redis_url
        if not redis_url:
            self.redis = RedisServer()
            await asyncio.to_thread(self.redis.start)
            redis_url = self.redis.url
            console.print(f"[dim]embedded Redis on {redis_url}[/]")
        mqtt_url, share_group = options.mqtt_url, "suanwang"
        if not mqtt_url:
            if options.embedded_mqtt == "mosquitto" or (options.embedded_mqtt == "auto" and mosquitto_available()):
                self.mqtt_process = MosquittoServer()
                await asyncio.to_thread(self.mqtt_process.start)
                mqtt_url = self.mqtt_process.url
                console.print(f"[dim]embedded Mosquitto on {mqtt_url}[/]")
            else:
                self.mqtt_embedded = EmbeddedMqtt()
                await self.mqtt_embedded.start()
                mqtt_url, share_group = self.mqtt_embedded.url, ""  # amqtt has no shared subscriptions
                console.print(f"[dim]embedded MQTT broker (amqtt) on {mqtt_url}[/]")
        return redis_url, mqtt_url, share_group

    async def stop(self) -> None:
        if self.mqtt_embedded:
            await self.mqtt_embedded.stop()
        for server in (self.mqtt_process, self.redis):
            if server:
                await asyncio.to_thread(server.cleanup)


@dataclass(frozen=True)
class DemoTokens:
    """The tokens the demo makes: an admin, an operator, and a user per sample tenant."""

    admin: str
    operator: str
    users: dict[str, str]  # tenant -> token


async def _make_tokens(broker: Broker) -> DemoTokens:
    tokens = Tokens(broker.store.redis, broker.store.keys)
    admin, _ = await tokens.create("admin", "ops", "demo admin")
    operator, _ = await tokens.create("operator", "ops", "demo operator")
    users = {tenant: (await tokens.create("user", tenant, "demo user"))[0] for tenant in DEMO_TENANTS}
    return DemoTokens(admin, operator, users)


async def _submit_jobs(url: str, rate: float, seed: int, stop: asyncio.Event, users: dict[str, str]) -> None:
    """Submit sample jobs over HTTP, as users would: each tenant's with its own user token."""
    rng = random.Random(seed)
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            tenant = rng.choice(DEMO_TENANTS)
            job = sample_job(rng, tenant=tenant)
            headers = {"Content-Type": "application/json"}
            if tenant in users:
                headers["Authorization"] = f"Bearer {users[tenant]}"
            with contextlib.suppress(aiohttp.ClientError):
                async with session.post(f"{url}/v1/jobs", data=orjson.dumps(job), headers=headers) as response:
                    await response.read()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), rng.expovariate(rate))


def _banner(console: Console, broker: Broker, options: DemoOptions, tokens: DemoTokens | None) -> None:
    url = broker.url
    console.rule("[bold]Suanwang 算网 demo[/]")
    console.print(f"Broker HTTP API: [bold cyan]{url}[/]   (1 simulated hour = {3600 / options.time_scale:g} s)")
    auth = op = ""
    if tokens is not None:
        tenant, user = next(iter(tokens.users.items()))
        console.print(f"Dashboard (operator): {url}/?token={tokens.operator}", markup=False, highlight=False,
                      soft_wrap=True)  # fmt: skip
        console.print(f"API tokens (made for this run):\n  user of {tenant}: {user}\n  operator: {tokens.operator}\n"
                      f"  admin:    {tokens.admin}", markup=False, highlight=False, soft_wrap=True)  # fmt: skip
        auth, op = f" -H 'Authorization: Bearer {user}'", f" -H 'Authorization: Bearer {tokens.operator}'"
    console.print("Submit your own job:")
    console.print(
        f"  curl -s -X POST {url}/v1/jobs{auth} -H 'Content-Type: application/json' -d "
        '\'{"name":"my-train","workload":"training","resources":{"arch":"ASIC","models":["Ascend-910B"],'
        '"count":16},"origin":"shanghai","duration_hours":2}\'',
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    console.print(f"  curl -N{op} {url}/v1/allocations/stream\n  curl -s{auth} {url}/v1/jobs\n"
                  f"  suanwang jobs --http {url} --token <user token>", markup=False, highlight=False,
                  soft_wrap=True)  # fmt: skip
    console.print("Press Ctrl-C to stop.")
    console.rule()


async def run_demo(options: DemoOptions, console: Console | None = None) -> dict[str, Any]:
    """Run until Ctrl-C (or `duration` seconds); returns a summary of what was allocated where."""
    console = console or Console()
    servers = Servers()
    stop = asyncio.Event()
    tasks: list[asyncio.Task[Any]] = []
    broker: Broker | None = None
    placed_by_hub: Counter[str] = Counter()
    tour: dict[str, Any] | None = None
    kinds: Counter[str] = Counter()
    try:
        redis_url, mqtt_url, share_group = await servers.start(options, console)
        settings = Settings.from_env(
            redis_url=redis_url, mqtt_url=mqtt_url, http=options.http, namespace="demo", share_group=share_group
        )
        broker = await start_broker(settings)
        tokens = await _make_tokens(broker) if settings.auth == "required" else None
        target = MqttTarget.from_url(mqtt_url)
        for hub in load_geography().hubs:
            tasks.append(
                asyncio.create_task(
                    run_sim(target, hub, options.sites_per_hub, time_scale=options.time_scale, interval=5.0, stop=stop)
                )
            )
        users = tokens.users if tokens else {}
        if options.tour:
            working, failing = tour_sites()
            for seeds, fail_rate in ((working, 0.0), (failing, 1.0)):
                sims = build_sites(target, list(seeds), time_scale=options.time_scale, interval=5.0,
                                   fail_rate=fail_rate, seed=options.seed)  # fmt: skip
                tasks.append(asyncio.create_task(run_sites(sims, stop)))
        if options.quiet:
            console.print(f"Broker HTTP API: {broker.url}", highlight=False)
            if tokens is not None:
                console.print(f"Operator token: {tokens.operator}", highlight=False)
        else:
            _banner(console, broker, options, tokens)
        if options.tour:
            tour = await run_tour(broker.url, users, tokens.operator if tokens else None, options.time_scale,
                                  Console(quiet=True) if options.quiet else console)  # fmt: skip
        tasks.append(asyncio.create_task(_submit_jobs(broker.url, options.rate, options.seed, stop, users)))
        started = time.monotonic()
        async with broker.feed.subscribe() as subscription:
            while options.duration is None or time.monotonic() - started < options.duration:
                try:
                    _, data = await asyncio.wait_for(subscription.queue.get(), 1.0)
                except TimeoutError:
                    continue
                event = orjson.loads(data)
                kinds[event["type"]] += 1
                if event["type"] == "allocated":
                    placed_by_hub[event.get("hub", "?")] += 1
                if not options.quiet and event["type"] in SHOWN:
                    console.print(event_line(event), highlight=False)
    except asyncio.CancelledError:
        pass
    finally:
        stop.set()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, 8)
        if broker is not None:
            await broker.close()
        await servers.stop()
    summary: dict[str, Any] = {"allocated_by_hub": dict(placed_by_hub), "events": dict(kinds)}
    if tour is not None:
        summary["tour"] = tour
    return summary
