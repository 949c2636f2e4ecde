"""Sites in Redis: capacity, status, the change log the matcher follows, and who holds what where."""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence
from typing import Any, cast

import orjson

from broker.model.records import Applied, SiteRecord
from broker.state.connection import text, translated
from broker.state.keys import Keys
from broker.state.reliability import SiteReliability, redis_ms, reliability_of
from common.errors import StoreUnavailable
from common.protocol import Capacity, Pool

_COUNTS = frozenset({"total", "in_use_external"})  # what a pool reports each time; the rest is its metadata
_POOL_META = operator.attrgetter(*(f for f in Pool.model_fields if f not in _COUNTS))
_METAS: dict[tuple[Any, ...], bytes] = {}
_METAS_KEPT = 4096
# How far a new primary moves every site's assignment sequence (primary.lua): more assignments than one site
# is given in any replication lag, so every seq the old primary gave out lies below the new stamps.
SEQ_AHEAD = 1_000_000


def _site_meta(cap: Capacity) -> bytes:
    """The site's metadata as stored (its pools without their counts, energy, latency, measured bandwidth), JSON
    with sorted keys. Kept by content: heartbeats repeat it with only their counts changed, and encoding it is
    most of the cost of preparing a message for Redis."""
    key = (tuple(map(_POOL_META, cap.pools)), cap.energy, tuple(cap.latency_ms.items()),
           tuple(cap.bandwidth_gbps.items()))  # fmt: skip
    meta = _METAS.get(key)
    if meta is None:
        if len(_METAS) >= _METAS_KEPT:
            _METAS.clear()
        meta = _METAS[key] = orjson.dumps(
            {
                "pools": [p.model_dump(mode="json", exclude={"total", "in_use_external"}) for p in cap.pools],
                "energy": cap.energy.model_dump(),
                "latency_ms": cap.latency_ms,
                **({"bandwidth_gbps": cap.bandwidth_gbps} if cap.bandwidth_gbps else {}),
            },
            option=orjson.OPT_SORT_KEYS,
        )
    return meta


@functools.lru_cache(maxsize=65_536)
def _capacity_keys(k: Keys, site: str) -> tuple[str, ...]:
    """capacity.lua's keys for a site, built once: every heartbeat needs them."""
    return (k.site(site), k.capacity(site), k.sites, k.seen, k.clock, k.site_status_log(site), k.site_registry,
            k.wake)  # fmt: skip


class SiteState(SiteReliability):
    time_seen = 0  # Redis's clock (ms) as of the last changed_sites()

    async def apply_capacity(self, cap: Capacity, at_ms: int | None = None) -> Applied:
        """Record a capacity message, unless its seq is not newer than the last one applied."""
        keys, args = self._capacity_call(cap, at_ms)
        async with translated():
            return Applied(int(await self._capacity(keys=keys, args=args)))

    async def apply_capacities(self, caps: Sequence[Capacity]) -> list[Applied | StoreUnavailable]:
        """Record capacity messages in one pipelined round trip, each as `apply_capacity` would and in their
        order. A message Redis failed on has the error in its place while the others stand, so a caller
        tries again only those; a lost connection raises `StoreUnavailable` for all."""
        calls = [(self._capacity, *self._capacity_call(cap)) for cap in caps]
        async with translated():
            replies = await self.run_scripts(calls, raise_on_error=False)
        return [StoreUnavailable(f"Redis error: {r}") if isinstance(r, Exception) else Applied(int(r)) for r in replies]

    def _capacity_call(self, cap: Capacity, at_ms: int | None = None) -> tuple[tuple[str, ...], list[Any]]:
        """capacity.lua's keys and arguments for one message."""
        meta = _site_meta(cap)
        when = at_ms if at_ms is not None else ""  # by default the heartbeat is timed by Redis's clock
        args: list[Any] = [cap.site, cap.seq, when, cap.hub, cap.cluster or "", meta, len(cap.pools)]
        for pool in cap.pools:
            args += [pool.model, pool.total, pool.in_use_external]
        args.append(cap.boot or "")
        return _capacity_keys(self.keys, cap.site), args

    async def set_site_status(self, site: str, status: str, expect: str = "") -> bool:
        k = self.keys
        async with translated():
            return bool(await self._status(keys=[k.site(site), k.sites, k.clock, k.site_status_log(site), k.wake],
                                           args=[site, status, expect, ""]))  # fmt: skip

    async def changed_sites(self, since: int) -> list[tuple[str, int]]:
        """Sites changed after version `since`, with their versions, oldest first. Also reads the `wake`
        generation first (into `wake_seen`): a job found unplaceable on the view this loads is parked at it,
        so any capacity change after this read wakes the job again. And Redis's clock (into `time_seen`), that
        the view's reliability scores decay by."""
        async with translated():
            pipe = self.redis.pipeline(transaction=False)
            pipe.get(self.keys.wake)
            pipe.zrangebyscore(self.keys.sites, f"({since}", "+inf", withscores=True)
            pipe.execute_command("TIME")  # as pipe.time() sends it, which a cluster pipeline refuses
            wake, raw, now = await pipe.execute()
        self.wake_seen = int(wake or 0)
        self.time_seen = redis_ms(now)
        rows = cast(list[tuple[bytes, float]], raw)
        return [(text(site), int(version)) for site, version in rows]

    async def all_site_ids(self) -> list[str]:
        async with translated():
            return [text(s) for s in await self.redis.zrange(self.keys.sites, 0, -1)]

    async def load_sites(self, ids: Sequence[str], known_meta: dict[str, int] | None = None) -> list[SiteRecord]:
        """Load sites in one round trip (two when pool metadata changed since `known_meta` versions), each with
        its reliability record decayed to Redis's clock as of the read."""
        if not ids:
            return []
        k = self.keys
        async with translated():
            pipe = self.redis.pipeline(transaction=False)
            pipe.execute_command("TIME")  # as pipe.time() sends it, which a cluster pipeline refuses
            for site in ids:
                pipe.hmget(k.site(site), "hub", "cluster", "status", "seen", "mv")
                pipe.hgetall(k.capacity(site))
                pipe.hgetall(k.site_reliability(site))
            now, *flat = await pipe.execute()
            read_ms = redis_ms(now)
            raw = [item for i, item in enumerate(flat) if i % 3 != 2]
            rels = flat[2::3]
            known = known_meta or {}
            need_meta = [
                site for i, site in enumerate(ids)
                if raw[2 * i][4] is not None and known.get(site) != int(raw[2 * i][4])
            ]  # fmt: skip
            metas: dict[str, dict[str, Any]] = {}
            if need_meta:
                pipe = self.redis.pipeline(transaction=False)
                for site in need_meta:
                    pipe.hget(k.site(site), "meta")
                for site, blob in zip(need_meta, await pipe.execute(), strict=True):
                    if blob:
                        metas[site] = orjson.loads(blob)
        records = []
        for i, site in enumerate(ids):
            hub, cluster, status, seen, mv = raw[2 * i]
            capacity = {text(f): int(v) for f, v in raw[2 * i + 1].items()}
            records.append(
                SiteRecord(
                    id=site, hub=text(hub), cluster=text(cluster), status=text(status) or "unknown",
                    seen_ms=int(seen or 0), meta_version=int(mv or 0), meta=metas.get(site), capacity=capacity,
                    reliability=reliability_of(rels[i], read_ms),
                )
            )  # fmt: skip
        return records

    async def status_history(self, site: str) -> list[dict[str, Any]]:
        async with translated():
            return [orjson.loads(item) for item in await self.redis.lrange(self.keys.site_status_log(site), 0, -1)]

    async def new_primary(self) -> list[str]:
        """The sites to reconcile when this replica is the first to find Redis on a primary the deployment has
        not run on before (a failover or a restart; primary.lua); [] otherwise. One INFO a call; the script
        runs only when the replication id is not the one this replica last saw recorded."""
        async with translated():
            info = await self.redis.info("replication")
            replication_id = text(info.get("master_replid", ""))
            if not replication_id or replication_id == self._primary_seen:
                return []
            k = self.keys
            sites = await self._primary(keys=[k.primary, k.sites, k.prefix + ":"], args=[replication_id, SEQ_AHEAD])
        self._primary_seen = replication_id
        return [text(site) for site in sites]

    async def silent_sites(self, older_than_ms: int) -> list[str]:
        async with translated():
            return [text(s) for s in await self.redis.zrangebyscore(self.keys.seen, "-inf", older_than_ms)]
