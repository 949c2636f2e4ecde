"""MQTT messages duplicated, dropped and late: QoS 1 delivers at least once, and networks lose things."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from adapters.site import SiteLink
from broker.state.store import Store
from common.config import MqttTarget
from common.protocol import Assignments
from suanwang.servers import MosquittoServer, RedisClusterGroup, RedisServer
from suanwang.soak import Client
from tests.faults.conftest import MakeCluster
from tests.faults.helpers import LOAD_RATE, assert_recovered, bodies

# on a Redis of its own and on the three-master Redis Cluster (tests/faults/conftest.py `fault_redis`)
pytestmark = [pytest.mark.timeout(120), pytest.mark.parametrize("redis_kind", ["redis", "cluster"])]

FLAKY_MODEL = "Biren-BR104"  # only the flaky sites offer it, so its jobs must go through them
DROP_ACCEPTED = 0.3


class FlakySite:
    """A hand-driven site that sends every event twice (and `completed` once more, late); for about a third of
    its assignments the `accepted` is lost and `running`/`completed` come only after the accept timeout, the
    cancel for them ignored, as from a site whose messages were delayed."""

    def __init__(self, mqtt: MosquittoServer, site: str, late_s: float, seed: int) -> None:
        pool = {"arch": "GPU", "model": FLAKY_MODEL, "memory_gb": 32, "total": 64, "in_use_external": 0,
                "per_node": 8, "price_cny_per_hour": 3.0}  # fmt: skip
        self.link = SiteLink(MqttTarget.from_url(mqtt.url), site, "guizhou", [pool], cluster="guian",
                             on_assignments=self.on_assignments, interval=1.0)  # fmt: skip
        self.late_s = late_s
        self.rng = random.Random(seed)
        self.seen: set[tuple[str, int]] = set()
        self.seqs: dict[tuple[str, int], int] = {}
        self.dropped: set[tuple[str, int]] = set()
        self.tasks: dict[tuple[str, int], asyncio.Task[None]] = {}

    def twice(self, key: tuple[str, int], kind: str) -> None:
        self.link.emit(key[0], key[1], kind)
        self.link.emit(key[0], key[1], kind)

    def on_assignments(self, batch: Assignments) -> None:
        if batch.reconcile:
            ours = {(a.job, a.attempt) for a in batch.assignments}
            upto = batch.upto if batch.upto is not None else float("inf")
            for key in [k for k in self.tasks if k not in ours and k not in self.dropped
                        and self.seqs.get(k, 0) <= upto]:  # fmt: skip
                self.tasks.pop(key).cancel()
            return
        for item in batch.assignments:
            key = (item.job, item.attempt)
            if item.action == "cancel":
                if key in self.tasks and key not in self.dropped:
                    self.tasks.pop(key).cancel()
                continue
            if key in self.seen:
                continue
            self.seen.add(key)
            self.seqs[key] = item.seq or 0
            if self.rng.random() < DROP_ACCEPTED:
                self.dropped.add(key)
                self.tasks[key] = asyncio.create_task(self._run(key, item.duration_hours, delay=self.late_s))
            else:
                self.twice(key, "accepted")
                self.tasks[key] = asyncio.create_task(self._run(key, item.duration_hours))

    async def _run(self, key: tuple[str, int], seconds: float, delay: float = 0.0) -> None:
        await asyncio.sleep(delay)
        self.twice(key, "running")
        await asyncio.sleep(seconds)  # duration_hours at time scale 3600
        self.twice(key, "completed")
        await asyncio.sleep(0.5)
        self.link.emit(key[0], key[1], "completed")


@asynccontextmanager
async def flaky_sites(mqtt: MosquittoServer, n: int, late_s: float) -> AsyncIterator[list[FlakySite]]:
    sites = [FlakySite(mqtt, f"flaky-{i}", late_s, seed=i) for i in range(n)]
    runs = [asyncio.create_task(site.link.run()) for site in sites]
    try:
        async with asyncio.timeout(10):
            for site in sites:
                await site.link.connected.wait()
        yield sites
    finally:
        for site in sites:
            site.link.stop()
            for task in site.tasks.values():
                task.cancel()
        await asyncio.wait(runs, timeout=5)
        for task in runs:
            task.cancel()
        await asyncio.gather(*runs, return_exceptions=True)


async def test_duplicated_dropped_and_late_site_events_change_nothing_twice(
    make_cluster: MakeCluster, fault_redis: RedisServer | RedisClusterGroup, own_mosquitto: MosquittoServer
) -> None:
    """Every event twice, a third of `accepted` lost and their `running`/`completed` late: each lost accept
    returns the job to the queue once the accept timeout passes, late events of that attempt change
    nothing, duplicates are applied once, and every job completes."""
    cluster = await make_cluster(hubs=("guizhou",))
    store = Store.from_url(fault_redis.url, cluster.namespace)
    try:
        async with flaky_sites(own_mosquitto, 2, late_s=cluster.accept_timeout_s + 1.5) as sites:
            await cluster.ready()
            jobs = bodies(120, seed=5, model=FLAKY_MODEL, arch="GPU", hours=(0.5, 1.5)) + bodies(60, seed=6)
            random.Random(3).shuffle(jobs)
            client = Client(cluster.urls)
            await client.load(jobs, LOAD_RATE)
            found = await assert_recovered(store, client, timeout=90)
        dropped = {key for site in sites for key in site.dropped}
        assert dropped, "no accepted was dropped"
        expired, problems, kinds = 0, [], Counter[str]()
        for job in client.jobs:
            history = await store.history(job)
            twice = {k: n for k, n in Counter((e["event"], e.get("attempt")) for e in history).items() if n > 1}
            if twice:
                problems.append(f"{job}: applied more than once: {twice}")
                kinds.update(f"duplicate {event} applied twice" for event, _ in twice)
            for i, entry in enumerate(history):
                if entry["event"] == "requeued" and (job, entry["attempt"]) in dropped:
                    expired += 1
                    if "did not accept" not in entry["reason"]:
                        problems.append(f"{job}: requeued for another reason: {entry}")
                        kinds["requeued for another reason"] += 1
                    late = [e for e in history[i + 1 :] if e.get("attempt") == entry["attempt"]]
                    if late:
                        problems.append(f"{job}: late events of an expired attempt applied: {late}")
                        kinds["late event applied"] += 1
        assert expired, f"none of {len(dropped)} dropped accepts expired; states {dict(found.states)}"
        assert not problems, f"{dict(kinds)}:\n" + "\n".join(problems[:20])
    finally:
        await store.close()
