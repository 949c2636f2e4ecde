"""What every part of the store shares: the connection, the key layout and the Lua scripts."""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from broker.state.cluster import NamespaceCluster
from broker.state.connection import translated
from broker.state.keys import Keys
from common.errors import InvalidInput

SCRIPTS = ("capacity", "site_status", "bind", "reserve", "ledger", "transition", "submit", "reconcile", "archive",
           "waiting", "heads", "hold", "preempt", "primary")


class StoreBase:
    redis: aioredis.Redis
    keys: Keys
    events_maxlen: int
    max_attempts: int

    def __init__(self, redis: aioredis.Redis, keys: Keys, events_maxlen: int = 100_000, max_attempts: int = 5) -> None:
        self.redis = redis
        self.keys = keys
        self.events_maxlen = events_maxlen
        self.max_attempts = max_attempts
        if isinstance(redis, NamespaceCluster):
            redis.home = keys.prefix  # what has no key goes to the node serving the namespace's slot
        lua = resources.files("broker.state") / "lua"
        scripts = {name: redis.register_script((lua / f"{name}.lua").read_text()) for name in SCRIPTS}
        self._capacity: AsyncScript = scripts["capacity"]
        self._status: AsyncScript = scripts["site_status"]
        self._bind: AsyncScript = scripts["bind"]
        self._reserve: AsyncScript = scripts["reserve"]
        self._ledger: AsyncScript = scripts["ledger"]
        self._transition: AsyncScript = scripts["transition"]
        self._submit: AsyncScript = scripts["submit"]
        self._reconcile: AsyncScript = scripts["reconcile"]
        self._waiting: AsyncScript = scripts["waiting"]
        self._heads: AsyncScript = scripts["heads"]
        self._archive: AsyncScript = scripts["archive"]
        self._hold: AsyncScript = scripts["hold"]
        self._preempt: AsyncScript = scripts["preempt"]
        self._primary: AsyncScript = scripts["primary"]
        self.wake_seen = 0  # the `wake` generation as of the last changed_sites()
        self.attempts: dict[str, int] = {}  # each job's attempt as of the last queue_heads()
        self.tenants_of: dict[str, str] = {}  # each job's tenant as of the last queue_heads()
        # what this replica last read, kept between calls (broker.state.ledger, broker.state.sites)
        self.places_cache: dict[str, Any] = {}  # site -> its Place, read at `places_read` (monotonic s)
        self.places_read = 0.0
        self.cursors: dict[str, int] = {}  # change log -> the position changed_sites() read up to
        self.hubs_seen: list[str] = []  # the hubs whose change logs changed_sites() reads
        self.primaries_seen: dict[str, str] = {}  # a shard's primary key -> the replication id last found
        self.usage: dict[str, int] = {}  # devices held per tenant, as of the last queue_heads()
        self.limits: dict[str, int] = {}  # most devices a tenant may hold, as of the last queue_heads()
        self.queued_tenants_seen: dict[int, int] = {}  # job shard -> its tenants with queued jobs, likewise
        # each site's reliability record as last read, one share per job shard (sites.load_sites, cached), and
        # the (site, shard) shares changed since, as changed_sites() found them
        self.shares: dict[str, list[Any]] = {}
        self.shares_stale: set[tuple[str, int]] = set()
        # outbox steps done whose entries are still to remove: sent with the next round trip (`_send`), not one
        # of their own (a broker that stops first leaves them to the sweeper, which does them again, harmlessly)
        self.steps_done: list[str] = []

    async def run_scripts(self, calls: Sequence[tuple[AsyncScript, Sequence[Any], Sequence[Any]]],
                          *, raise_on_error: bool = True) -> list[Any]:  # fmt: skip
        """Run (script, keys, args) calls in one pipelined round trip, in order; the replies in order (errors
        as exception objects with `raise_on_error=False`).

        redis-py's own pipelining of scripts asks `SCRIPT EXISTS` first on every execute: a second round
        trip for every submit and every pass. Here each call is an EVALSHA; a script Redis does not know
        (a restart, a flush) answers NOSCRIPT without running, so it is loaded and those calls run again,
        in their order, in a second round trip."""
        replies, _ = await self._pipelined(calls, None, raise_on_error)
        return replies

    async def run_scripts_durably(self, calls: Sequence[tuple[AsyncScript, Sequence[Any], Sequence[Any]]],
                                  replicas: int, timeout_ms: int) -> tuple[list[Any], int]:  # fmt: skip
        """`run_scripts` (errors as exception objects) followed, on the same connection and in the same round
        trip, by `WAIT replicas timeout_ms`: the replies, and how many replicas have every write the calls
        made (Redis counts what a connection wrote, so WAIT goes down the pipeline that wrote it)."""
        replies, acked = await self._pipelined(calls, (replicas, timeout_ms), False)
        return replies, acked

    async def _pipelined(self, calls: Sequence[tuple[AsyncScript, Sequence[Any], Sequence[Any]]],
                         wait: tuple[int, int] | None, raise_on_error: bool) -> tuple[list[Any], int]:  # fmt: skip
        if not calls:
            return [], 0
        replies, acked = await self._send(calls, wait)
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            for script in {id(calls[i][0]): calls[i][0] for i in missing}.values():
                script.sha = await self.redis.script_load(script.script)
            again, acked = await self._send([calls[i] for i in missing], wait)
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        if raise_on_error:
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
        return replies, acked

    async def _send(self, calls: Sequence[tuple[AsyncScript, Sequence[Any], Sequence[Any]]],
                    wait: tuple[int, int] | None) -> tuple[list[Any], int]:  # fmt: skip
        pipe = self.redis.pipeline(transaction=False)
        for script, keys, args in calls:
            # as pipe.evalsha sends it (a cluster pipeline refuses the method, not the command)
            pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        done, self.steps_done = (self.steps_done, []) if wait is None else ([], self.steps_done)
        removals = self.by_outbox(done)
        for outbox, entries in removals.items():
            pipe.execute_command("ZREM", outbox, *entries)
        if wait is not None:
            pipe.execute_command("WAIT", *wait)
        try:
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        except BaseException:
            self.steps_done[:0] = done  # removed with a later round trip, or by the sweeper
            raise
        if removals:
            removed = replies[len(replies) - len(removals):]
            del replies[len(replies) - len(removals):]
            if any(isinstance(r, Exception) for r in removed):
                self.steps_done[:0] = done
        if wait is None:
            return replies, 0
        acked = replies.pop()
        if isinstance(acked, Exception):
            raise acked
        return replies, int(acked)


    async def use_layout(self, job_shards: int | None = None) -> int:
        """Lay the store's keys out over the deployment's job shards, a number recorded in Redis at its first
        start: `job_shards` is recorded when none is (1 when None), and must be the one recorded otherwise
        (a tenant's shard is a hash of its name over that number, so it never changes). Returns the number."""
        if job_shards is not None and job_shards < 1:
            raise InvalidInput(f"job shards must be at least 1, not {job_shards}", "job_shards")
        async with translated():
            if job_shards is not None:
                await self.redis.set(self.keys.job_shards, job_shards, nx=True)
            recorded = await self.redis.get(self.keys.job_shards)
        found = int(recorded) if recorded is not None else 1
        if job_shards is not None and found != job_shards:
            raise InvalidInput(f"this deployment (namespace {self.keys.namespace!r}) has {found} job shards; it "
                               f"cannot start with {job_shards}", "job_shards")  # fmt: skip
        if found != self.keys.shards:
            self.keys = Keys(self.keys.namespace, found)
        return found

    def id_for(self, base: str, tenant: str) -> str:
        """A new job's or hold's id (`base`, unique) for a tenant: on the tenant's job shard (Keys.with_shard)."""
        return self.keys.with_shard(base, tenant)

    def by_outbox(self, entries: Sequence[str]) -> dict[str, list[str]]:
        """Outbox entries by the outbox they are in (their owner's job shard's)."""
        out: dict[str, list[str]] = {}
        for entry in entries:
            out.setdefault(self.keys.for_step(entry).outbox, []).append(entry)
        return out

    async def run_atomically(self, calls: Sequence[tuple[AsyncScript, Sequence[Any], Sequence[Any]]]) -> list[Any]:
        """Run (script, keys, args) calls in one MULTI/EXEC, so nothing runs between them; the replies in order,
        errors as exception objects.

        A script Redis does not know answers NOSCRIPT inside the transaction while the others still run; it is
        loaded and the calls from the first such one on run again in a second transaction. That is safe only
        for calls each fenced on what the ones before them did (a script that finds no job does nothing)."""
        replies = await self._exec_atomically(calls)
        missing = next((i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)), None)
        if missing is not None:
            for script in {id(c[0]): c[0] for c in calls[missing:]}.values():
                script.sha = await self.redis.script_load(script.script)
            replies[missing:] = await self._exec_atomically(calls[missing:])
        return replies

    async def _exec_atomically(self, calls: Sequence[tuple[AsyncScript, Sequence[Any], Sequence[Any]]]) -> list[Any]:
        # one shard's calls (a transaction cannot span two): its node, named by the first call's first key
        pipe = self.redis.pipeline(transaction=True, shard_hint=calls[0][1][0] if calls and calls[0][1] else None)
        for script, keys, args in calls:
            pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        return list(await pipe.execute(raise_on_error=False))
