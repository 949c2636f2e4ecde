"""Prometheus metrics (prometheus_client: the exposition format, histograms and registries done right).

Counters are bumped where things happen (scheduler, ingest); gauges that describe the whole network
(queue depth, capacity by hub and architecture) are computed when scraped, from Redis and from the
replica's snapshot, so they cost nothing between scrapes. Each broker has its own registry, so several
brokers in one process (tests) do not share counters.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import TYPE_CHECKING

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from broker.matching.snapshot import Snapshot
    from broker.state.store import Store


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.placements = Counter("suanwang_placements", "Jobs placed on a site", ["hub", "arch"], registry=r)
        self.rejections = Counter(
            "suanwang_rejections", "Placements refused or returned, by reason", ["reason"], registry=r
        )
        self.submit_to_allocation = Histogram(
            "suanwang_submit_to_allocation_seconds", "From submission to allocation", registry=r,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600),
        )  # fmt: skip
        self.fallbacks = Counter("suanwang_commit_fallbacks", "Placements a runner-up took at commit because the "
                                 "chosen pool had filled meanwhile (another replica)", registry=r)  # fmt: skip
        self.holds = Counter("suanwang_holds", "Holds by what became of them (taken, used, expired, released)",
                             ["outcome"], registry=r)  # fmt: skip
        self.holds_standing = Gauge("suanwang_holds_standing", "Holds standing now (their devices reserved)",
                                    registry=r)  # fmt: skip
        self.preemptions = Counter("suanwang_preemptions", "Jobs preempted (given back to the queue) for "
                                   "higher-priority work", registry=r)  # fmt: skip
        self.data_moves = Counter("suanwang_data_moves", "Placements whose datasets must be moved to the site, by "
                                  "the site's hub", ["hub"], registry=r)  # fmt: skip
        self.data_transfer_hours = Histogram(
            "suanwang_data_transfer_hours", "Estimated hours to move a placed job's data to its site", registry=r,
            buckets=(0.1, 0.5, 1, 2, 4, 8, 12, 24, 48, 96),
        )  # fmt: skip
        self.mqtt_in = Counter("suanwang_mqtt_messages", "MQTT messages received, by type", ["type"], registry=r)
        self.mqtt_dropped = Counter("suanwang_mqtt_dropped", "MQTT messages dropped, by reason", ["reason"], registry=r)
        self.redis_rtt = Histogram(
            "suanwang_redis_roundtrip_seconds", "Redis round trip (PING)", registry=r,
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1),
        )  # fmt: skip
        self.queue_depth = Gauge("suanwang_queue_depth", "Queued jobs, by priority", ["priority"], registry=r)
        self.capacity = Gauge(
            "suanwang_capacity_devices", "Devices by hub, architecture and kind (total, external, allocated)",
            ["hub", "arch", "kind"], registry=r,
        )  # fmt: skip
        self.utilization = Gauge(
            "suanwang_utilization_ratio", "(allocated + external) / total, by hub and architecture",
            ["hub", "arch"], registry=r,
        )  # fmt: skip
        self.site_reliability = Gauge(
            "suanwang_site_reliability_score", "Each site's reliability score, 0-100 (what it delivered of its "
            "recent work), as in the replica's view", ["site"], registry=r,
        )  # fmt: skip
        self._reliability_shown: dict[str, float] = {}

    async def observe_redis(self, store: Store) -> None:
        started = time.perf_counter()
        if await store.ping():
            self.redis_rtt.observe(time.perf_counter() - started)

    def observe_capacity(self, snapshot: Snapshot) -> None:
        """Sum every pool of the replica's snapshot by hub and architecture."""
        sums: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
        hub_of_cluster = snapshot.cluster_hub
        for table in snapshot.tables.values():
            n = table.size
            if n == 0:
                continue
            clusters = table.cluster[:n]
            for c in np.unique(clusters):
                rows = clusters == c
                totals = sums[(hub_of_cluster[int(c)] or "unknown", table.arch)]
                totals[0] += int(table.total[:n][rows].sum())
                totals[1] += int(table.external[:n][rows].sum())
                totals[2] += int(table.allocated[:n][rows].sum())
        for (hub, arch), (total, external, allocated) in sums.items():
            self.capacity.labels(hub, arch, "total").set(total)
            self.capacity.labels(hub, arch, "external").set(external)
            self.capacity.labels(hub, arch, "allocated").set(allocated)
            self.utilization.labels(hub, arch).set((allocated + external) / total if total else 0.0)
        self.observe_reliability(snapshot)

    def observe_reliability(self, snapshot: Snapshot) -> None:
        """Every site's reliability score as the snapshot holds it; only scores that moved since the last
        scrape are set again (at 100,000 sites, setting each costs more than the scrape's other gauges)."""
        shown = self._reliability_shown
        for site, info in snapshot.sites.items():
            if shown.get(site) != info.reliability:
                shown[site] = info.reliability
                self.site_reliability.labels(site).set(info.reliability)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
