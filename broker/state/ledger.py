"""Who holds which devices, across two shards: the site shard's ledger and the job shard's records.

A site's devices are counted on its hub's shard (`HubKeys`): the ledger `site:<id>:held` (owner -> attempt,
model, count, seq) and its sum per model, `a:<model>`. Who the owner is, and in which state, is the job
shard's (`Keys`): the job or the hold. One script cannot touch both shards on Redis Cluster, so every change
of ownership that spans them is two fenced steps:

- Devices taken (an allocation, a hold, devices a preemption needs beyond its victims'): `reserve.lua` takes
  them on the site shard for (owner, attempt) on a lease of `LEASE_MS`, idempotent by owner and attempt; then
  the job shard's step (bind.lua, hold.lua's take, preempt.lua) checks what it must (the job still queued at
  that attempt, the tenant's limit, the lease not over) and binds them, or refuses. Then the entry is settled
  (bound: off the pending set) or released (refused).
- Devices given back or passed on (a job ends or goes back to the queue, a hold ends, a hold passes to its
  job, a preemption's victims' devices pass to its hold): the job shard's step decides it and writes the
  site shard's step into the outbox in the same script; the step (`ledger.lua`: release, merge) runs next,
  idempotent, and its outbox entry is removed once it is done. Steps on one owner may be done out of the
  order they were decided in (one left in the outbox is done later by the sweeper): a release that comes
  first leaves a tombstone, so the merge that comes after gives its devices back rather than make an entry
  for an owner that has moved on; a merge whose sources are not there yet waits in the outbox for the
  older merge that brings them, for at most `MERGE_WAIT_MS`: then it goes on with the sources that are
  there and buries the others, so the step that would bring one later gives its devices back.

Nothing is lost when a broker stops between two steps: the sweeper (`sweep_ledger`) takes every ledger entry
whose lease ended more than `MARGIN_MS` ago and still is not settled, reads its owner on the job shard, and
settles it (bound) or releases it (not): the job shard refuses a binding after the lease, so what it reads
can no longer change to bound. And it does again the outbox steps older than `OUTBOX_AGE_MS`. The margin
covers the clocks of two shards' servers differing (NTP keeps them within milliseconds).

The invariant, checked by the audit from both sides: an owner holds devices at a site exactly when the site
shard's ledger has its entry, except for the moments the pending set (a lease) or the outbox (a step on its
way) says so.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from broker.state.base import StoreBase
from broker.state.connection import text, translated
from broker.state.keys import HubKeys

LEASE_MS = 10_000  # how long a reservation waits for its binding on the job shard
MARGIN_MS = 5_000  # after the lease, before the sweeper judges it: more than two shards' clocks differ
OUTBOX_AGE_MS = 5_000  # an outbox step older than this was left behind: the sweeper does it
MERGE_WAIT_MS = 60_000  # how long a merge waits for a source an older step brings; then it goes on without it
GONE_MS = 3_600_000  # how long a tombstone is kept: far longer than any outbox step waits
PLACES_TTL_S = 10.0  # how long a replica trusts the places it read (the registry may move a cluster)
HOLD_OWNER = "hold:"


def hold_owner(hold_id: str) -> str:
    return HOLD_OWNER + hold_id


@dataclass(frozen=True)
class Place:
    hub: str
    cluster: str  # '' when the registry names none


@dataclass(frozen=True)
class Reserved:
    """What reserve.lua took: which pool (0 the first), the run's seq at the site, the lease's end (ms)."""

    choice: int
    seq: int
    lease_end: int


class Ledger(StoreBase):
    """Places (which hub's shard holds a site) and the two-step protocol's site-shard side."""

    def hub_keys(self, hub: str) -> HubKeys:
        return self.keys.hub(hub)

    # places --------------------------------------------------------------------------------------------
    async def places(self, sites: Iterable[str]) -> dict[str, Place]:
        """Where each of `sites` is (a site with no place is left out), from what this replica read in the
        last `PLACES_TTL_S`, else read now in one round trip."""
        cache = self.places_cache
        if time.monotonic() - self.places_read > PLACES_TTL_S:
            cache.clear()
            self.places_read = time.monotonic()
        wanted = list(dict.fromkeys(sites))
        missing = [s for s in wanted if s not in cache]
        if missing:
            async with translated():
                raw = await self.redis.hmget(self.keys.places, missing)
            for site, value in zip(missing, raw, strict=True):
                if value is not None:
                    hub, _, cluster = text(value).partition("\t")
                    cache[site] = Place(hub, cluster)
        return {s: cache[s] for s in wanted if s in cache}

    async def place(self, site: str) -> Place | None:
        return (await self.places([site])).get(site)

    async def hub_of(self, site: str) -> str | None:
        found = await self.place(site)
        return found.hub if found else None

    def forget_place(self, site: str) -> None:
        self.places_cache.pop(site, None)

    async def claim_place(self, site: str, hub: str) -> Place:
        """The site's place, made the hub it reports when it has none yet (its first message)."""
        async with translated():
            pipe = self.redis.pipeline(transaction=True)
            pipe.hsetnx(self.keys.places, site, f"{hub}\t")
            pipe.sadd(self.keys.hubs, hub)
            pipe.hget(self.keys.places, site)
            _, _, value = await pipe.execute()
        found_hub, _, cluster = text(value).partition("\t")
        found = Place(found_hub, cluster)
        self.places_cache[site] = found
        return found

    async def set_place(self, site: str, hub: str, cluster: str) -> None:
        """The registry's word on where a site is."""
        async with translated():
            pipe = self.redis.pipeline(transaction=True)
            pipe.hset(self.keys.places, site, f"{hub}\t{cluster}")
            pipe.sadd(self.keys.hubs, hub)
            await pipe.execute()
        self.places_cache[site] = Place(hub, cluster)

    async def hub_ids(self) -> list[str]:
        async with translated():
            return sorted(text(h) for h in await self.redis.smembers(self.keys.hubs))

    # the site shard's steps -----------------------------------------------------------------------------
    def reserve_call(self, hub: str, owner: str, attempt: int, pools: Sequence[tuple[str, str, int]],
                     headroom: int | None = None, call: str | None = None
                     ) -> tuple[Any, list[str], list[Any]]:  # fmt: skip
        """reserve.lua's call: take devices for (owner, attempt) at the first of `pools` (site, model, count)
        that can give them (and asks no more than `headroom`, when given). `call` names the call (a new id
        when None): only the same call sent again is given the reservation it made."""
        args: list[Any] = [owner, attempt, LEASE_MS, "" if headroom is None else headroom,
                           call if call is not None else uuid.uuid4().hex]  # fmt: skip
        for site, model, count in pools:
            args += [site, model, count]
        return self._reserve, [self.hub_keys(hub).prefix + ":"], args

    def ledger_call(self, hub: str, *args: Any) -> tuple[Any, list[str], list[Any]]:
        return self._ledger, [self.hub_keys(hub).prefix + ":"], list(args)

    def step_call(self, entry: str, late: bool = False) -> tuple[Any, list[str], list[Any]]:
        """The ledger.lua call an outbox entry (`op\\thub\\tsite\\t...`) stands for; `late`: a merge that has
        waited `MERGE_WAIT_MS` for its sources goes on without those still missing."""
        op, hub, site, *rest = entry.split("\t")
        return self.ledger_call(hub, "merge-now" if late and op == "merge" else op, site, *rest)

    async def run_steps(self, entries: Sequence[str], late: Collection[str] = ()) -> list[Any]:
        """Do outbox steps (site shard) in one round trip; the entries of those done are removed (job shard)
        with the next round trip (`steps_done`). The replies in order, an error in the place of a step not done
        (it stays in the outbox). The merges in `late` have waited long enough for their sources (`step_call`)."""
        if not entries:
            return []
        async with translated():
            replies = await self.run_scripts([self.step_call(e, e in late) for e in entries], raise_on_error=False)
        self.steps_done += [e for e, r in zip(entries, replies, strict=True) if not isinstance(r, Exception)]
        return replies

    async def flush_steps(self) -> None:
        """Remove now the outbox entries of the steps done (`steps_done`) rather than with the next round trip."""
        done, self.steps_done = self.steps_done, []
        if done:
            try:
                async with translated():
                    pipe = self.redis.pipeline(transaction=False)
                    for outbox, entries in self.by_outbox(done).items():
                        pipe.zrem(outbox, *entries)
                    await pipe.execute()
            except BaseException:
                self.steps_done[:0] = done
                raise

    async def sweep_ledger(self, now_ms: int, limit: int = 500) -> dict[str, int]:
        """Settle or release the ledger entries whose lease is long over, and do the outbox steps left behind;
        how many of each."""
        moved = {"settled": 0, "released": 0, "steps": 0}
        async with translated():
            pipe = self.redis.pipeline(transaction=False)
            for sk in self.keys.each_shard:
                pipe.zrangebyscore(sk.outbox, "-inf", now_ms - OUTBOX_AGE_MS, 0, limit, withscores=True)
            # oldest first across the shards: a merge waits for the older step that brings its sources
            rows = sorted(((e, at) for found in cast(list[list[tuple[bytes, float]]], await pipe.execute())
                           for e, at in found), key=lambda row: row[1])  # fmt: skip
        old = [text(e) for e, _ in rows]
        late = {text(e) for e, at in rows if at < now_ms - MERGE_WAIT_MS}
        moved["steps"] = sum(1 for r in await self.run_steps(old, late) if not isinstance(r, Exception))
        await self.flush_steps()  # a sweep leaves no step it did behind for the next to do again
        hubs = await self.hub_ids()
        if not hubs:
            return moved
        await self._forget_tombstones(hubs, now_ms - GONE_MS, limit)
        async with translated():
            pipe = self.redis.pipeline(transaction=False)
            for hub in hubs:
                pipe.zrangebyscore(self.hub_keys(hub).pending, "-inf", now_ms - MARGIN_MS, 0, limit)
            due = [(hub, text(m)) for hub, members in zip(hubs, await pipe.execute(), strict=True) for m in members]
        if not due:
            return moved
        entries = [(hub, *member.split("\t")) for hub, member in due]
        async with translated():
            pipe = self.redis.pipeline(transaction=False)
            for _hub, _site, owner, _attempt in entries:
                if owner.startswith(HOLD_OWNER):
                    hold = owner[len(HOLD_OWNER):]
                    pipe.hmget(self.keys.for_id(hold).hold(hold), "state", "site")
                else:
                    pipe.hmget(self.keys.for_id(owner).job(owner), "state", "site", "attempt")
            rows = await pipe.execute()
        calls = []
        for (hub, site, owner, attempt), row in zip(entries, rows, strict=True):
            values = [text(v) for v in row]
            if owner.startswith(HOLD_OWNER):
                # a used hold's devices pass to its job by an outbox step: the entry stays for it
                bound = values[1] == site and values[0] in ("held", "used")
            else:
                bound = values[0] in ("assigned", "running") and values[1] == site and values[2] == attempt
            calls.append(self.ledger_call(hub, "settle" if bound else "release", site, owner, attempt))
            moved["settled" if bound else "released"] += 1
        async with translated():
            await self.run_scripts(calls)
        return moved

    async def _forget_tombstones(self, hubs: Sequence[str], before_ms: int, limit: int) -> None:
        """The hubs' tombstones (owners taken off a ledger ahead of a merge, ledger.lua) older than `before_ms`."""
        async with translated():
            pipe = self.redis.pipeline(transaction=False)
            for hub in hubs:
                pipe.zrangebyscore(self.hub_keys(hub).prefix + ":gone-at", "-inf", before_ms, 0, limit)
            old = await pipe.execute()
            if not any(old):
                return
            pipe = self.redis.pipeline(transaction=False)
            for hub, members in zip(hubs, old, strict=True):
                if members:
                    pipe.hdel(self.hub_keys(hub).prefix + ":gone", *members)
                    pipe.zrem(self.hub_keys(hub).prefix + ":gone-at", *members)
            await pipe.execute()

    async def recheck_all(self) -> int:
        """Every ledger entry of every hub to the pending set (due now unless on its lease): the job shard's
        primary changed, so what it binds may be behind the ledger; the sweeper checks each entry."""
        hubs = await self.hub_ids()
        async with translated():
            replies = await self.run_scripts([self.ledger_call(hub, "recheck", "") for hub in hubs])
        return sum(int(r) for r in replies)
