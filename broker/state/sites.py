"""Sites in Redis: capacity, status, the change log the matcher follows, and who holds what where."""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence
from typing import Any, cast

import orjson

from broker.model.records import Applied, SiteRecord
from broker.state.connection import replication_ids, text, translated
from broker.state.keys import Keys
from broker.state.reliability import SiteReliability, redis_ms, reliability_across
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
def _capacity_keys(k: Keys, hub: str, site: str) -> tuple[str, ...]:
    """capacity.lua's keys for a site, built once: every heartbeat needs them."""
    h = k.hub(hub)
    return (h.site(site), h.capacity(site), h.sites, h.seen, h.clock, h.site_status_log(site), h.wake)


class SiteState(SiteReliability):
    time_seen = 0  # Redis's clock (ms) as of the last changed_sites()

    async def apply_capacity(self, cap: Capacity, at_ms: int | None = None) -> Applied:
        """Record a capacity message, unless its seq is not newer than the last one applied."""
        (applied,) = await self.apply_capacities([cap], at_ms)
        if isinstance(applied, StoreUnavailable):
            raise applied
        return applied

    async def apply_capacities(self, caps: Sequence[Capacity], at_ms: int | None = None
                               ) -> list[Applied | StoreUnavailable]:  # fmt: skip
        """Record capacity messages in one pipelined round trip (each on its hub's shard), each as
        `apply_capacity` would and in their order. A message Redis failed on has the error in its place while
        the others stand, so a caller tries again only those; a lost connection raises `StoreUnavailable` for
        all. A message that names another hub than the site's place, or another cluster than the registry's,
        is refused (`Applied.MOVED`) without a write; a site's first message makes its place."""
        places = await self.places(c.site for c in caps)
        for cap in caps:
            if cap.site not in places:
                places[cap.site] = await self.claim_place(cap.site, cap.hub)
        out: list[Applied | StoreUnavailable | None] = [None] * len(caps)
        calls, at = [], []
        for i, cap in enumerate(caps):
            place = places[cap.site]
            cluster = cap.cluster or ""
            if place.hub != cap.hub or (place.cluster and cluster and cluster != place.cluster):
                out[i] = Applied.MOVED
                continue
            calls.append((self._capacity, *self._capacity_call(cap, place.hub, cluster or place.cluster, at_ms)))
            at.append(i)
        async with translated():
            replies = await self.run_scripts(calls, raise_on_error=False)
        for i, r in zip(at, replies, strict=True):
            out[i] = StoreUnavailable(f"Redis error: {r}") if isinstance(r, Exception) else Applied(int(r))
        return [o if o is not None else Applied.STALE for o in out]

    def _capacity_call(self, cap: Capacity, hub: str, cluster: str, at_ms: int | None = None
                       ) -> tuple[tuple[str, ...], list[Any]]:  # fmt: skip
        """capacity.lua's keys and arguments for one message."""
        meta = _site_meta(cap)
        when = at_ms if at_ms is not None else ""  # by default the heartbeat is timed by Redis's clock
        args: list[Any] = [cap.site, cap.seq, when, hub, cluster, meta, len(cap.pools)]
        for pool in cap.pools:
            args += [pool.model, pool.total, pool.in_use_external]
        args.append(cap.boot or "")
        return _capacity_keys(self.keys, hub, cap.site), args

    async def set_site_status(self, site: str, status: str, expect: str = "") -> bool:
        hub = await self.hub_of(site)
        if hub is None:
            return False
        h = self.hub_keys(hub)
        async with translated():
            return bool(await self._status(keys=[h.site(site), h.sites, h.clock, h.site_status_log(site), h.wake],
                                           args=[site, status, expect, ""]))  # fmt: skip

    async def changed_sites(self, since: int) -> list[tuple[str, int]]:
        """Sites changed after version `since`, each with the version after this read. The version is the sum
        of the change logs' positions (every hub's and every job shard's, each its own counter), so it only grows:
        given the version this replica's last call returned, only what changed since is read; given another
        (0: a first load), every site. Also reads the `wake` generation first (into `wake_seen`, the sum of
        job shards' and every hub's counters): a job found unplaceable on the view this loads is parked at
        it, so any capacity change after this read wakes the job again. And Redis's clock (into `time_seen`),
        that the view's reliability scores decay by. One round trip (two when a hub is new to this replica)."""
        cursors = self.cursors
        if since == 0 or since != sum(cursors.values()):
            cursors.clear()
            self.shares.clear()  # a full load: every share read again
        hubs = self.hubs_seen
        wakes: dict[str, int] = {}
        changed: dict[str, None] = {}

        def logs(of_hubs: Sequence[str]) -> list[tuple[str, str]]:
            """(wake counter, change log) of each of the hubs' shards."""
            return [(self.hub_keys(hub).wake, self.hub_keys(hub).sites) for hub in of_hubs]

        def read(pipe: Any, shards: Sequence[tuple[str, str]]) -> None:
            for wake, log in shards:
                pipe.get(wake)
                pipe.zrangebyscore(log, f"({cursors.get(log, 0)}", "+inf", withscores=True)

        job_logs = {sk.sites: sk.index for sk in self.keys.each_shard}

        def take(replies: Sequence[Any], shards: Sequence[tuple[str, str]]) -> None:
            for i, (_wake, log) in enumerate(shards):
                wakes[log] = int(replies[2 * i] or 0)
                for site, version in cast(list[tuple[bytes, float]], replies[2 * i + 1]):
                    changed[text(site)] = None
                    if log in job_logs:  # that job shard's share of the site's reliability changed
                        self.shares_stale.add((text(site), job_logs[log]))
                    cursors[log] = max(cursors.get(log, 0), int(version))

        async with translated():
            pipe = self.redis.pipeline(transaction=False)
            pipe.execute_command("TIME")  # as pipe.time() sends it, which a cluster pipeline refuses
            pipe.smembers(self.keys.hubs)
            shards = [(sk.wake, sk.sites) for sk in self.keys.each_shard] + logs(hubs)
            read(pipe, shards)
            now, members, *replies = await pipe.execute()
            take(replies, shards)
            new = sorted({text(h) for h in members} - set(hubs))
            if new:  # a hub this replica had not seen: its log and counter, read now
                pipe = self.redis.pipeline(transaction=False)
                read(pipe, logs(new))
                take(await pipe.execute(), logs(new))
                hubs.extend(new)
        self.wake_seen = sum(wakes.values())
        self.time_seen = redis_ms(now)
        version = sum(cursors.values())
        return [(site, version) for site in changed]

    async def all_site_ids(self) -> list[str]:
        hubs = await self.hub_ids()
        async with translated():
            pipe = self.redis.pipeline(transaction=False)
            for hub in hubs:
                pipe.zrange(self.hub_keys(hub).sites, 0, -1)
            return sorted(text(s) for members in await pipe.execute() for s in members)

    async def load_sites(self, ids: Sequence[str], known_meta: dict[str, int] | None = None, *,
                         cached: bool = False) -> list[SiteRecord]:  # fmt: skip
        """Load sites in one round trip (two when pool metadata changed since `known_meta` versions), each with
        its reliability record decayed to Redis's clock as of the read. `cached`: each job shard's share of a
        record is read only when this replica has none or changed_sites() found it changed since (the
        matcher's loads; a share that changes without a change of score is then read with the next one)."""
        places = await self.places(ids)
        ids = [site for site in ids if site in places]
        if not ids:
            return []
        shards = self.keys.each_shard

        # which job shards' shares of each site's record to read now
        reading = {(site, sk.index) for site in ids for sk in shards
                   if not cached or site not in self.shares or (site, sk.index) in self.shares_stale}  # fmt: skip

        def wanted(site: str, shard: int) -> bool:
            return (site, shard) in reading
        async with translated():
            pipe = self.redis.pipeline(transaction=False)
            pipe.execute_command("TIME")  # as pipe.time() sends it, which a cluster pipeline refuses
            for site in ids:
                h = self.hub_keys(places[site].hub)
                pipe.hmget(h.site(site), "hub", "cluster", "status", "seen", "mv")
                pipe.hgetall(h.capacity(site))
                for sk in shards:
                    if wanted(site, sk.index):
                        pipe.hgetall(sk.site_reliability(site))
            now, *flat = await pipe.execute()
            read_ms = redis_ms(now)
            replies = iter(flat)
            raw, rels = [], []
            for site in ids:
                raw += [next(replies), next(replies)]
                shares = self.shares.setdefault(site, [{}] * len(shards)) if cached else [{}] * len(shards)
                for sk in shards:
                    if wanted(site, sk.index):
                        shares[sk.index] = next(replies)
                        self.shares_stale.discard((site, sk.index))
                rels.append(shares)
            known = known_meta or {}
            need_meta = [
                site for i, site in enumerate(ids)
                if raw[2 * i][4] is not None and known.get(site) != int(raw[2 * i][4])
            ]  # fmt: skip
            metas: dict[str, dict[str, Any]] = {}
            if need_meta:
                pipe = self.redis.pipeline(transaction=False)
                for site in need_meta:
                    pipe.hget(self.hub_keys(places[site].hub).site(site), "meta")
                for site, blob in zip(need_meta, await pipe.execute(), strict=True):
                    if blob:
                        metas[site] = orjson.loads(blob)
        records = []
        for i, site in enumerate(ids):
            hub, cluster, status, seen, mv = raw[2 * i]
            capacity = {text(f): int(v) for f, v in raw[2 * i + 1].items()}
            if hub is None:  # a place made, its first message not yet applied
                continue
            records.append(
                SiteRecord(
                    id=site, hub=text(hub), cluster=text(cluster), status=text(status) or "unknown",
                    seen_ms=int(seen or 0), meta_version=int(mv or 0), meta=metas.get(site), capacity=capacity,
                    reliability=reliability_across(rels[i], read_ms),
                )
            )  # fmt: skip
        return records

    async def status_history(self, site: str) -> list[dict[str, Any]]:
        hub = await self.hub_of(site)
        if hub is None:
            return []
        async with translated():
            return [orjson.loads(i) for i in await self.redis.lrange(self.hub_keys(hub).site_status_log(site), 0, -1)]

    async def new_primary(self) -> list[str]:
        """The sites to reconcile when this replica is the first to find a shard on a primary the deployment
        has not run on before (a failover or a restart; primary.lua); [] otherwise. One INFO a node a call;
        the script runs only for a shard whose replication id is not the one this replica last saw recorded.
        A new primary of a job shard puts every ledger entry up for the sweeper's check (`recheck_all`)."""
        hubs = await self.hub_ids()
        shards = [*(("", sk.primary, sk.sites) for sk in self.keys.each_shard), *(
            (self.hub_keys(h).prefix + ":", self.hub_keys(h).primary, self.hub_keys(h).sites) for h in hubs)]
        seen = self.primaries_seen
        out: list[str] = []
        job_shard_moved = False
        async with translated():
            ids = await replication_ids(self.redis, [key for _, key, _ in shards])
            for (prefix, key, log), replication_id in zip(shards, ids, strict=True):
                if not replication_id or replication_id == seen.get(key):
                    continue
                reply = await self._primary(keys=[key, log], args=[replication_id, SEQ_AHEAD, prefix])
                seen[key] = replication_id
                if isinstance(reply, list):
                    out += [text(site) for site in reply]
                elif int(reply) == 1:
                    job_shard_moved = True
        if job_shard_moved:
            await self.recheck_all()
        return out

    async def silent_sites(self, older_than_ms: int) -> list[str]:
        hubs = await self.hub_ids()
        async with translated():
            pipe = self.redis.pipeline(transaction=False)
            for hub in hubs:
                pipe.zrangebyscore(self.hub_keys(hub).seen, "-inf", older_than_ms)
            return [text(s) for members in await pipe.execute() for s in members]
