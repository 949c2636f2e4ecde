"""Holds in Redis: a quote's devices reserved at the quoted price for a short time (reserve.lua on the site's
shard, then hold.lua on the job shard), handed to the job submitted with the hold in the same transaction
that stores the job (submit.lua then bind.lua), or given back when the hold expires or is released.

Who holds which devices: a standing hold's devices are its entry `hold:<id>` in its site's ledger (so in
`a:<model>`) and in its tenant's usage, exactly as a job's are (broker.state.ledger). A hold ends once: used
(its devices pass to one job), expired (by Redis's clock) or released; every script that ends it checks it
is still standing, and the site shard's step that follows is in the outbox until it is done.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from broker.model.job import JobSpec
from broker.model.records import Commit, Placement, Refusal
from broker.state.connection import decode_hash, text, translated
from broker.state.jobs import _REFUSALS, JobQueue, Submission, SubmitRate, _pool
from broker.state.ledger import HOLD_OWNER, hold_owner
from common.errors import StoreUnavailable, SuanwangError

# preempt.lua's refusals
_PREEMPT_REFUSALS = {-1: Refusal.NOT_QUEUED, -2: Refusal.SITE_NOT_ONLINE, -3: Refusal.TENANT_LIMIT,
                     -4: Refusal.VICTIM_MOVED, -5: Refusal.NO_CASCADE, 0: Refusal.STALE_VIEW, -7: Refusal.STALE_VIEW,
                     -8: Refusal.STALE_VIEW}  # fmt: skip
# hold.lua's refusals of a take
_TAKE_REFUSALS = {0: Refusal.STALE_VIEW, -2: Refusal.SITE_NOT_ONLINE, -3: Refusal.TENANT_LIMIT,
                  -5: Refusal.TOO_MANY_HOLDS, -6: Refusal.HOLD_NOT_STANDING, -7: Refusal.STALE_VIEW,
                  -8: Refusal.STALE_VIEW}  # fmt: skip
DUE_BATCH = 500  # holds expired in one sweep round trip


@dataclass(frozen=True)
class HoldOption:
    """One pool a hold may take, as the quote offered it."""

    site: str
    hub: str
    model: str
    arch: str
    count: int
    price: float
    latency_ms: float
    offer: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of_offer(cls, offer: dict[str, Any]) -> HoldOption:
        """From a quote's candidate (`Candidate.as_dict`)."""
        latency = offer.get("latency_ms")
        return cls(offer["site"], offer["hub"], offer["model"], offer["arch"], int(offer["devices"]),
                   float(offer["price_cny_per_hour"]), float(latency) if latency is not None else -1.0,
                   offer)  # fmt: skip


@dataclass(frozen=True)
class Hold:
    """A hold as stored."""

    id: str
    state: str  # held, used, expired, released
    tenant: str
    site: str
    hub: str
    model: str
    arch: str
    count: int
    price: float
    latency_ms: float
    created_ms: int
    expires_ms: int
    resources: str
    offer: dict[str, Any]
    job: str = ""
    for_job: str = ""
    ended_ms: int = 0
    reason: str = ""

    @classmethod
    def of_hash(cls, raw: dict[str, str]) -> Hold:
        return cls(
            id=raw["id"], state=raw["state"], tenant=raw["tenant"], site=raw["site"], hub=raw.get("hub", ""),
            model=raw["model"], arch=raw.get("arch", ""), count=int(raw["count"]), price=float(raw["price"]),
            latency_ms=float(raw.get("latency_ms") or -1), created_ms=int(raw["created"]),
            expires_ms=int(raw["expires"]), resources=raw.get("resources", ""),
            offer=orjson.loads(raw["offer"]) if raw.get("offer") else {}, job=raw.get("job", ""),
            for_job=raw.get("for", ""), ended_ms=int(raw.get("ended") or 0), reason=raw.get("reason", ""),
        )  # fmt: skip

    @property
    def standing(self) -> bool:
        return self.state == "held"


@dataclass(frozen=True)
class TakenHold:
    """What a take did: the hold, which option it took (0: the first), or why none could be held."""

    hold: Hold | None
    choice: int = 0
    refusal: Refusal | None = None


@dataclass(frozen=True)
class Holding:
    """A job holding devices at a site, as a preemption weighs it."""

    job: str
    attempt: int
    state: str
    model: str
    count: int
    priority: str
    tenant: str
    preemptible: bool
    since_ms: int  # started, else assigned
    grace_ms: int


class HoldBook(JobQueue):
    async def holdings(self, sites: Sequence[str]) -> dict[str, list[Holding]]:
        """The jobs holding devices at each of `sites` (their ledgers, then the jobs): two round trips."""
        places = await self.places(sites)
        async with translated():
            pipe = self.redis.pipeline(transaction=False)
            for site in sites:
                hub = places[site].hub if site in places else ""
                pipe.hkeys(self.hub_keys(hub).held(site))
            members = [[o for o in (text(j) for j in m) if not o.startswith(HOLD_OWNER)] for m in await pipe.execute()]
            pipe = self.redis.pipeline(transaction=False)
            for jobs in members:
                for job in jobs:
                    pipe.hmget(self.keys.for_id(job).job(job), "state", "site", "attempt", "model", "count",
                               "priority", "tenant", "preemptible", "started_at", "assigned_at",
                               "grace_ms")  # fmt: skip
            rows = iter(await pipe.execute())
        out: dict[str, list[Holding]] = {}
        for site, jobs in zip(sites, members, strict=True):
            found = out[site] = []
            for job in jobs:
                state, at, attempt, model, count, priority, tenant, preemptible, started, assigned, grace = (
                    text(v) for v in next(rows))  # fmt: skip
                if state in ("assigned", "running") and at == site:
                    since = int(started or assigned or 0)
                    found.append(Holding(job, int(attempt), state, model, int(count or 0), priority, tenant,
                                         preemptible == "1", since, int(grace or 0)))  # fmt: skip
        return out

    async def preempt(self, job_id: str, hold_id: str, option: HoldOption, grace_ms: int, max_preemptions: int,
                      victims: Sequence[tuple[str, int]]) -> tuple[int, Refusal | None]:  # fmt: skip
        """Stop `victims` (job, attempt) at the option's pool and hold their devices for `job_id` until the grace
        period ends, all at once or not at all (preempt.lua, then the merge of the victims' ledger entries into
        the hold's; devices needed beyond the victims' are reserved first); (when the hold ends, or 0), and why
        not."""
        o = option
        freed = sum(int(c or 0) for (c,) in await self.get_jobs([j for j, _ in victims], "count"))
        lease_end: int | str = ""
        if o.count > freed:
            async with translated():
                (got,) = await self.run_scripts(
                    [self.reserve_call(o.hub, hold_owner(hold_id), 0, [(o.site, o.model, o.count - freed)])])
            if not isinstance(got, list):
                return 0, _PREEMPT_REFUSALS[int(got)]
            lease_end = int(got[2])
        args: list[Any] = [job_id, hold_id, o.site, o.hub, o.model, o.arch, o.count, o.price, o.latency_ms,
                           orjson.dumps(o.offer).decode(), grace_ms, max_preemptions, self.events_maxlen,
                           lease_end]  # fmt: skip
        for job, attempt in victims:
            args += [job, attempt]
        async with translated():  # on the job's shard, whose jobs alone it may preempt (`same_shard`)
            reply = await self._preempt(keys=[self.keys.for_id(job_id).prefix + ":"], args=args)
        if isinstance(reply, list):
            await self.run_steps([text(reply[2])])
            return int(reply[1]), None
        if lease_end != "":
            async with translated():
                await self.run_scripts([self.ledger_call(o.hub, "release", o.site, hold_owner(hold_id), 0)])
        return 0, _PREEMPT_REFUSALS[int(reply)]

    async def commit_hold(self, hold_id: str, accept_timeout_ms: int) -> tuple[Hold, dict[str, str], Commit] | None:
        """Give a preemption's hold to the job it is for, at the hold's price (allocate.lua); (hold, job, commit)
        when it was given, None when there is no such hold or job. A refused commit leaves the hold standing."""
        hold = await self.get_hold(hold_id)
        if hold is None or not hold.for_job:
            return None
        record = orjson.dumps({"chosen": hold.offer, "runners_up": [], "hold": hold.id}).decode()
        placement = Placement(hold.for_job, hold.site, hold.hub, hold.model, hold.count, hold.price, hold.latency_ms,
                              arch=hold.arch, decision=record, hold=hold.id)  # fmt: skip
        (commit,) = await self.allocate([placement], accept_timeout_ms)
        job = await self.get_job(hold.for_job)
        return (hold, job, commit) if job is not None else None

    async def take_hold(self, hold_id: str, tenant: str, options: Sequence[HoldOption], ttl_ms: int, resources: str,
                        *, max_holds: int | None = None, for_job: str = "", now_ms: int | None = None
                        ) -> TakenHold:  # fmt: skip
        """Reserve the first of `options` that can be held now, for `ttl_ms`: its devices on its site's shard
        (the options of one hub's shard in one step), then the hold on the job shard; or say why the first
        could not."""
        owner = hold_owner(hold_id)
        sk = self.keys.for_tenant(tenant)
        if self.keys.for_id(hold_id) is not sk:
            raise ValueError(f"hold id {hold_id!r} is not of tenant {tenant!r}'s shard (Keys.with_shard)")
        # what the job shard would refuse whatever the sites have, first (hold.lua checks it again when it
        # binds): a tenant at its limit or a hold id taken costs no reservation and is told so
        async with translated():
            pipe = self.redis.pipeline(transaction=False)
            pipe.exists(sk.hold(hold_id))
            pipe.zcard(sk.tenant_holds(tenant))
            exists, standing = await pipe.execute()
        if exists:
            return TakenHold(None, refusal=_TAKE_REFUSALS[-6])
        if max_holds is not None and int(standing) >= max_holds:
            return TakenHold(None, refusal=_TAKE_REFUSALS[-5])
        refusal: int | None = None
        got: list[Any] | None = None
        start = 0
        while start < len(options):
            end = start
            while end < len(options) and options[end].hub == options[start].hub:
                end += 1
            group = options[start:end]
            async with translated():
                (reply,) = await self.run_scripts(
                    [self.reserve_call(group[0].hub, owner, 0, [(o.site, o.model, o.count) for o in group])])
            if isinstance(reply, list):
                got = [start + int(reply[0]), int(reply[2])]
                break
            refusal = refusal if refusal is not None else int(reply)
            start = end
        if got is None:
            return TakenHold(None, refusal=_TAKE_REFUSALS[refusal or 0])
        choice, lease_end = got
        o = options[choice]
        args: list[Any] = ["take", hold_id, tenant, ttl_ms, max_holds if max_holds is not None else "", resources,
                           self.events_maxlen, for_job, now_ms if now_ms is not None else "", lease_end,
                           o.site, o.hub, o.model, o.arch, o.count, o.price, o.latency_ms,
                           orjson.dumps(o.offer).decode()]  # fmt: skip
        async with translated():
            reply = await self._hold(keys=[sk.hold(hold_id), sk.prefix + ":"], args=args)
            step = "settle" if int(reply) > 0 else "release"
            await self.run_scripts([self.ledger_call(o.hub, step, o.site, owner, 0)])
        if int(reply) <= 0:
            return TakenHold(None, refusal=_TAKE_REFUSALS[int(reply)])
        hold = await self.get_hold(hold_id)
        return TakenHold(hold, choice=choice)

    async def release_hold(self, hold_id: str, tenant: str = "", reason: str = "released") -> bool:
        """Give a standing hold's devices back (only the tenant's own when `tenant` is given)."""
        args: list[Any] = ["release", hold_id, tenant, reason, self.events_maxlen, ""]
        sk = self.keys.for_id(hold_id)
        async with translated():
            reply = await self._hold(keys=[sk.hold(hold_id), sk.prefix + ":"], args=args)
        if not reply:
            return False
        await self.run_steps([text(reply)])
        return True

    async def expire_holds(self, hold_ids: Sequence[str], now_ms: int | None = None) -> list[bool]:
        """End the holds whose time is up (each checked by the script against Redis's clock), in one round trip,
        then give their devices back on the sites' shards."""
        calls = [(self._hold, [self.keys.for_id(h).hold(h), self.keys.for_id(h).prefix + ":"],
                  ["expire", h, "its time was up", self.events_maxlen, now_ms if now_ms is not None else ""])
                 for h in hold_ids]  # fmt: skip
        async with translated():
            replies = await self.run_scripts(calls)
        await self.run_steps([text(r) for r in replies if r])
        return [bool(r) for r in replies]

    async def due_holds(self, at_ms: int, limit: int = DUE_BATCH) -> list[tuple[str, str]]:
        """(hold, the job it is for or '') of standing holds whose time is up at `at_ms`, soonest first."""
        async with translated():
            pipe = self.redis.pipeline(transaction=False)
            for sk in self.keys.each_shard:
                pipe.zrangebyscore(sk.holds, "-inf", at_ms, 0, limit, withscores=True)
            due = sorted((float(at), text(h)) for rows in await pipe.execute() for h, at in rows)[:limit]
            ids = [h for _at, h in due]
            if not ids:
                return []
            pipe = self.redis.pipeline(transaction=False)
            for h in ids:
                pipe.hget(self.keys.for_id(h).hold(h), "for")
            fors = await pipe.execute()
        return [(h, text(f)) for h, f in zip(ids, fors, strict=True)]

    async def get_hold(self, hold_id: str) -> Hold | None:
        async with translated():
            raw = await self.redis.hgetall(self.keys.for_id(hold_id).hold(hold_id))
        return Hold.of_hash(decode_hash(raw)) if raw else None

    async def list_holds(self, tenant: str | None = None, limit: int = 100) -> list[Hold]:
        """Standing holds (of one tenant, or all), soonest to expire first."""
        indexes = ([self.keys.for_tenant(tenant).tenant_holds(tenant)] if tenant is not None
                   else [sk.holds for sk in self.keys.each_shard])  # fmt: skip
        async with translated():
            pipe = self.redis.pipeline(transaction=False)
            for index in indexes:
                pipe.zrange(index, 0, limit - 1, withscores=True)
            ids = [text(h) for _at, h in sorted((float(at), text(h)) for rows in await pipe.execute()
                                                for h, at in rows)[:limit]]  # fmt: skip
            if not ids:
                return []
            pipe = self.redis.pipeline(transaction=False)
            for h in ids:
                pipe.hgetall(self.keys.for_id(h).hold(h))
            raws = await pipe.execute()
        return [Hold.of_hash(decode_hash(raw)) for raw in raws if raw]

    async def standing_holds(self) -> int:
        async with translated():
            pipe = self.redis.pipeline(transaction=False)
            for sk in self.keys.each_shard:
                pipe.zcard(sk.holds)
            return sum(int(n) for n in await pipe.execute())

    def same_shard(self, a: str, b: str) -> bool:
        """Whether two jobs (or holds) are on one job shard: a preemption stops only jobs of its own."""
        return self.keys.id_shard(a) == self.keys.id_shard(b)

    async def submit_held(self, job_id: str, spec: JobSpec, accept_timeout_ms: int, *,
                          idempotency_key: str | None = None, rate_limit: SubmitRate | None = None,
                          max_queued: int | None = None
                          ) -> tuple[dict[str, str], bool, Commit | None] | SuanwangError:  # fmt: skip
        """Store a job submitted with a hold and give it the hold's devices, in one transaction: the job is
        stored only while the hold stands and was quoted for what it asks (submit.lua), and is then placed
        exactly there, at the hold's price (bind.lua); then the hold's ledger entry passes to the job. Returns
        (record, created, commit), or the error that refused it (an idempotent replay returns the job it made,
        with no commit)."""
        if spec.hold is None:
            raise ValueError("submit_held needs a job with a hold")
        item = Submission(job_id, spec, idempotency_key)
        keys, args, fields = self._submission(item, rate_limit, max_queued)
        calls: list[tuple[Any, Sequence[Any], Sequence[Any]]] = [(self._submit, keys, args)]
        hold = await self.get_hold(spec.hold)  # what the caller believes; both scripts check it
        # a hold at a site gone away since it was taken: the job is stored and waits like any other
        away = hold is not None and bool(await self.offline_sites([(hold.hub, hold.site)]))
        if hold is not None and not away:
            record = orjson.dumps({"chosen": hold.offer, "runners_up": [], "hold": hold.id}).decode()
            placement = Placement(job_id, hold.site, hold.hub, hold.model, hold.count, hold.price, hold.latency_ms,
                                  arch=hold.arch, decision=record, hold=hold.id)  # fmt: skip
            calls.append(self._bind_call(placement, _pool(placement, 0), accept_timeout_ms, None, None))
        async with translated():
            replies = await self.run_atomically(calls)
            if isinstance(replies[0], Exception):
                raise StoreUnavailable(f"Redis error: {replies[0]}")
            existing, flag, *stamped = replies[0]
            outcome = self._submitted(item, fields, text(existing), int(flag), stamped, rate_limit, max_queued)
            if isinstance(outcome, SuanwangError):
                return outcome
            if outcome is None:  # an idempotent replay: the job the first request made
                job = await self.get_job(text(existing))
                if job is None:
                    return StoreUnavailable("the job an Idempotency-Key names no longer exists")
                return job, False, None
            if len(replies) < 2:
                job = await self.get_job(job_id)
                return (job or fields), True, Commit(refusal=Refusal.SITE_NOT_ONLINE if away else
                                                     Refusal.HOLD_NOT_STANDING)  # fmt: skip
            if isinstance(replies[1], Exception):
                raise StoreUnavailable(f"Redis error: {replies[1]}")
            bound = int(replies[1])
            job = await self.get_job(job_id)
        if bound < 1:
            return (job or fields), True, Commit(refusal=_REFUSALS[bound])
        (seq,) = await self.run_steps([self._merge_entry(placement, bound)])
        commit = Commit(attempt=bound, seq=int(seq) if not isinstance(seq, Exception) else 0)
        return (job or fields), True, commit
