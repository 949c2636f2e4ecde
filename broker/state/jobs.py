"""Jobs in Redis: submission, the fair queue, allocation and every later transition."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from redis.commands.core import AsyncScript

from broker.model.job import JobSpec, JobState
from broker.model.records import Commit, Placement, Refusal
from broker.model.reliability import HALF_LIFE_MS
from broker.state.archive import read_archived
from broker.state.connection import decode_hash, now_ms, text, translated
from broker.state.keys import ShardKeys
from broker.state.ledger import HOLD_OWNER, Ledger, Reserved, hold_owner
from common.errors import Conflict, HoldNotStanding, NotDurable, StoreUnavailable, SuanwangError, TooManyRequests

# Priority as a head start in queue time: a low job waits as if submitted 30 minutes later than a high
# one, so high goes first, yet a low job that has waited long enough overtakes new normal work (aging).
PRIORITY_HANDICAP_MS = {"high": 0, "normal": 5 * 60_000, "low": 30 * 60_000}
PRIORITY_RANK = {"high": 0, "normal": 1, "low": 2}
IDEMPOTENCY_TTL_S = 24 * 3600
CLAIM_MS = 5_000  # how long a pass's claim on the jobs it read keeps other replicas off them


def queue_score(priority: str, created_ms: int) -> int:
    """Queue order: submission time plus the priority's handicap (a requeued job keeps its place)."""
    return created_ms + PRIORITY_HANDICAP_MS[priority]


# reserve.lua's and bind.lua's refusals (a reserved lease ended before its binding, or an earlier attempt's
# devices not yet given back, are a view that was stale as well)
_REFUSALS = {0: Refusal.STALE_VIEW, -1: Refusal.NOT_QUEUED, -2: Refusal.SITE_NOT_ONLINE, -3: Refusal.TENANT_LIMIT,
             -4: Refusal.HOLD_NOT_STANDING, -7: Refusal.STALE_VIEW, -8: Refusal.STALE_VIEW}


def _pool_groups(p: Placement) -> list[tuple[str, list[int]]]:
    """The placement's pools (0 the chosen one, i the i-th runner-up) by hub, in the order they are tried:
    one reserve.lua call takes the pools of one hub's shard."""
    hubs = [p.hub, *(alt[1] for alt in p.alternatives)]
    groups: list[tuple[str, list[int]]] = []
    for i, hub in enumerate(hubs):
        if groups and groups[-1][0] == hub:
            groups[-1][1].append(i)
        else:
            groups.append((hub, [i]))
    return groups


def _pool(p: Placement, i: int) -> tuple[str, str, str, int, float, float, str]:
    """Pool i of a placement: (site, hub, model, count, price, latency_ms, arch)."""
    if i == 0:
        return (p.site, p.hub, p.model, p.count, p.price, p.latency_ms, p.arch)
    return p.alternatives[i - 1]


@dataclass(frozen=True)
class Submission:
    """One job to submit: its id, spec, Idempotency-Key, and (for tests) its time. The body hash that tells a
    replay from a different job under the same key is the spec's, computed when empty."""

    job_id: str
    spec: JobSpec
    idempotency_key: str | None = None
    body_hash: str = ""
    at_ms: int | None = None


@dataclass(frozen=True)
class SubmitRate:
    """A token bucket for one caller's submissions: `burst` at once, refilled at `per_s` a second."""

    key: str
    per_s: float
    burst: int


_Asked = tuple[Submission, SubmitRate | None, int | None]  # a job and the limits it is submitted under
_Outcome = tuple[dict[str, str], bool] | SuanwangError


class _Gathered:
    """Submits made at the same moment, sent together: a group commit.

    The first submit is sent at once; submits that arrive while a round trip is under way wait for it and
    then go together in the next one (each still its own script, its own limits, its own answer). At low
    load this adds nothing; under load a round trip carries as many jobs as arrived during the last one,
    and redis-py's cost per command falls to about a third of a lone submit's."""

    def __init__(self, run: Callable[[Sequence[_Asked]], Awaitable[list[_Outcome]]]) -> None:
        self.run = run
        self.waiting: list[tuple[_Asked, asyncio.Future[_Outcome]]] = []
        self.sending: asyncio.Task[None] | None = None

    async def submit(self, asked: _Asked) -> _Outcome:
        future: asyncio.Future[_Outcome] = asyncio.get_running_loop().create_future()
        self.waiting.append((asked, future))
        if self.sending is None:
            self.sending = asyncio.create_task(self._send())
        return await future

    async def _send(self) -> None:
        batch: list[tuple[_Asked, asyncio.Future[_Outcome]]] = []
        try:
            while self.waiting:
                batch, self.waiting = self.waiting[:MAX_GATHERED], self.waiting[MAX_GATHERED:]
                try:
                    outcomes = await self.run([asked for asked, _ in batch])
                except Exception as exc:  # Redis away: every submit of the round trip learns it
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), outcome in zip(batch, outcomes, strict=True):
                    if not future.done():
                        future.set_result(outcome)
                batch = []
        finally:
            self.sending = None
            for _, future in batch + self.waiting:  # stopped (the loop is closing): no submit waits forever
                future.cancel()
            self.waiting = []


MAX_GATHERED = 256  # submits in one round trip


class JobQueue(Ledger):
    _gathered: _Gathered | None = None  # made on the first submit, on the running loop
    # Durable accept (Settings.durable_accept): replicas that must have a new job before it is accepted, and the
    # most a submission waits for them (WAIT, in the submit's own round trip).
    durable_replicas = 0
    durable_timeout_ms = 1000

    async def submit(
        self,
        job_id: str,
        spec: JobSpec,
        at_ms: int | None = None,
        idempotency_key: str | None = None,
        body_hash: str = "",
        *,
        rate_limit: SubmitRate | None = None,
        max_queued: int | None = None,
    ) -> tuple[dict[str, str], bool]:
        """Store a new job and queue it atomically: after this returns the job is safe.

        With an idempotency key seen before (same tenant, same body) returns that job and False; the same
        key with another body raises Conflict. Over `rate_limit`, or with `max_queued` jobs of the tenant
        already queued, raises TooManyRequests; all of it in one round trip, shared with the submits made
        at the same moment (`_Gathered`).
        """
        gathered = self._gathered
        if gathered is None:
            gathered = self._gathered = _Gathered(self._submit_all)
        outcome = await gathered.submit((Submission(job_id, spec, idempotency_key, body_hash, at_ms), rate_limit,
                                         max_queued))  # fmt: skip
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def submit_many(
        self, items: Sequence[Submission], *, rate_limit: SubmitRate | None = None, max_queued: int | None = None
    ) -> list[tuple[dict[str, str], bool] | SuanwangError]:
        """Submit each job on its own (each atomically, as `submit`), all in one round trip (two when some
        were idempotent replays); per job, (record, created) or the error that refused it."""
        return await self._submit_all([(item, rate_limit, max_queued) for item in items])

    async def _submit_all(self, items: Sequence[_Asked]) -> list[tuple[dict[str, str], bool] | SuanwangError]:
        """`submit_many` with each job's own limits."""
        calls = [self._submission(item, rate_limit, max_queued) for item, rate_limit, max_queued in items]
        scripts = [(self._submit, keys, args) for keys, args, _ in calls]
        acked = 0
        async with translated():
            if self.durable_replicas:
                replies, acked = await self.run_scripts_durably(scripts, self.durable_replicas,
                                                                self.durable_timeout_ms)  # fmt: skip
            else:
                replies = await self.run_scripts(scripts, raise_on_error=False)
        outcomes: list[tuple[dict[str, str], bool] | SuanwangError] = []
        replayed: dict[int, str] = {}  # position -> the job an idempotent replay returns
        for i, ((item, rate_limit, max_queued), (_, _, fields), reply) in enumerate(
            zip(items, calls, replies, strict=True)
        ):
            if isinstance(reply, Exception):
                outcomes.append(StoreUnavailable(f"Redis error: {reply}"))
                continue
            existing, flag, *stamped = reply
            outcome = self._submitted(item, fields, text(existing), int(flag), stamped, rate_limit, max_queued)
            if acked < self.durable_replicas and (outcome is None or isinstance(outcome, tuple)):
                # Kept on the primary (a retry with the same Idempotency-Key returns it), but a failover now
                # could lose it, so it is not yet accepted. A replay is answered only when the replicas keep up
                # with this connection's writes too (WAIT counts a connection's own writes, so for a replay
                # that wrote nothing this is the replicas' health rather than that one job's).
                outcomes.append(NotDurable(f"job {item.job_id} is stored on the Redis primary but {acked} of the "
                                           f"{self.durable_replicas} replicas asked for acknowledged it within "
                                           f"{self.durable_timeout_ms} ms; retry with the same Idempotency-Key"))
                continue
            if outcome is None:
                replayed[i] = text(existing)
                # until it is read; kept if it no longer exists (a Redis restart without persistence)
                outcome = Conflict(f"Idempotency-Key {item.idempotency_key!r} refers to a job that no longer exists")
            outcomes.append(outcome)
        if replayed:
            for i, job in zip(replayed, await self.get_whole_jobs(list(replayed.values())), strict=True):
                if job is not None:
                    outcomes[i] = (job, False)
        return outcomes

    def _submission(self, item: Submission, rate_limit: SubmitRate | None, max_queued: int | None
                    ) -> tuple[list[str], list[Any], dict[str, str]]:  # fmt: skip
        k, spec, at_ms = self.keys, item.spec, item.at_ms
        # by Redis's clock unless the caller says when (the script then computes the queue score)
        created: int | str = at_ms if at_ms is not None else ""
        qscore: int | str = (
            queue_score(spec.priority.value, at_ms) if at_ms is not None else PRIORITY_HANDICAP_MS[spec.priority.value]
        )
        deadline = str(int(spec.deadline.timestamp() * 1000)) if spec.deadline else ""
        spec_json = spec.model_dump_json()  # encoded once: stored, and hashed for an idempotency key
        key = item.idempotency_key
        body_hash = item.body_hash or (hashlib.sha256(spec_json.encode()).hexdigest()[:24] if key else "")
        fields = {
            "id": item.job_id, "state": JobState.QUEUED.value, "spec": spec_json, "tenant": spec.tenant,
            "name": spec.name, "origin": spec.origin, "priority": spec.priority.value,
            "created": str(created), "updated": str(created), "attempt": "0", "qscore": str(qscore),
            "reason": "waiting for the matcher", **({"deadline": deadline} if deadline else {}),
            **({"preemptible": "1", "grace_ms": str(int(spec.grace_s * 1000))} if spec.preemptible else {}),
        }  # fmt: skip
        sk = k.for_tenant(spec.tenant)
        if k.for_id(item.job_id) is not sk:
            raise ValueError(f"job id {item.job_id!r} is not of tenant {spec.tenant!r}'s shard (Keys.with_shard)")
        idem_key = sk.idempotency(spec.tenant, key) if key else sk.idempotency("-", "-")
        bucket = sk.submit_bucket(rate_limit.key if rate_limit else "-")
        keys = [sk.job(item.job_id), sk.queue, sk.tenant_queue(spec.tenant), sk.queued_tenants,
                sk.tenant_jobs(spec.tenant), sk.events, sk.deadlines, idem_key, sk.job_history(item.job_id),
                sk.queue_depth, bucket, sk.tenant_state(spec.tenant, JobState.QUEUED.value),
                sk.hold(spec.hold or "-")]  # fmt: skip
        args: list[Any] = [item.job_id, qscore, created, spec.tenant, deadline, IDEMPOTENCY_TTL_S if key else "",
                           body_hash, self.events_maxlen, rate_limit.per_s if rate_limit else "",
                           rate_limit.burst if rate_limit else "",
                           max_queued if max_queued is not None else "", spec.hold or "",
                           spec.placement_hash() if spec.hold else ""]  # fmt: skip
        for name, value in fields.items():
            args += [name, value]
        return keys, args, fields

    @staticmethod
    def _submitted(item: Submission, fields: dict[str, str], existing: str, flag: int, stamped: list[Any],
                   rate_limit: SubmitRate | None, max_queued: int | None
                   ) -> tuple[dict[str, str], bool] | SuanwangError | None:  # fmt: skip
        """What submit.lua's reply means; None for an idempotent replay (the job is read next)."""
        if flag == 1:
            fields["created"] = fields["updated"] = text(stamped[0])
            fields["qscore"] = text(stamped[1])
            return fields, True
        if flag == -2 and rate_limit is not None:
            return TooManyRequests(f"too many submissions: at most {rate_limit.per_s:g}/s in bursts of "
                                   f"{rate_limit.burst}", retry_after_s=max(1, -(-int(existing) // 1000)))  # fmt: skip
        if flag == -3:
            return TooManyRequests(f"tenant {item.spec.tenant} already has {existing} queued jobs, the most allowed "
                                   f"(max_queued_per_tenant {max_queued})", code="tenant_queue_full")  # fmt: skip
        if flag == -4:
            return HoldNotStanding(f"hold {item.spec.hold} is {existing}: quote again (POST /v1/quote?hold=true)",
                                   existing)  # fmt: skip
        if flag == -5:
            return Conflict(f"hold {item.spec.hold} was quoted for another job: submit what was quoted (resources, "
                            "software, origin, caps, residency and data as in the quote)", code="hold_mismatch")
        if flag < 0:
            return Conflict(f"Idempotency-Key {item.idempotency_key!r} was used for a different job ({existing})")
        return None

    async def jobs_at(self, site: str) -> list[str]:
        """The jobs the site's ledger counts there (assigned or running, or reserved for)."""
        hub = await self.hub_of(site)
        if hub is None:
            return []
        async with translated():
            owners = await self.redis.hkeys(self.hub_keys(hub).held(site))
        return [o for o in (text(x) for x in owners) if not o.startswith(HOLD_OWNER)]

    async def reconcile_list(self, site: str) -> tuple[int, list[tuple[str, int]]]:
        """The (job, attempt) pairs the broker counts at `site` and the site's assignment sequence number,
        read together in one step from the site's ledger: the stamp a reconcile list carries."""
        hub = await self.hub_of(site)
        if hub is None:
            return 0, []
        hk = self.hub_keys(hub)
        async with translated():
            raw = await self._reconcile(keys=[hk.held(site), hk.site(site)], args=[])
        upto, rest = int(raw[0]), raw[1:]
        return upto, [(text(rest[i]), int(rest[i + 1])) for i in range(0, len(rest), 2)]

    async def holdings_ends(self, site: str, model: str) -> list[tuple[int, int]]:
        """(expected end ms, devices) of the broker's jobs holding `model` at `site`: two round trips."""
        jobs = await self.jobs_at(site)
        if not jobs:
            return []
        out = []
        for j_model, count, assigned, started, decision in await self.get_jobs(
            jobs, "model", "count", "assigned_at", "started_at", "decision"
        ):
            if j_model != model or not count:
                continue
            since = int(started or assigned or now_ms())
            hours = float(orjson.loads(decision)["chosen"]["est_hours"]) if decision else 1.0
            out.append((since + int(hours * 3_600_000), int(count)))
        return out

    async def history(self, job_id: str) -> list[dict[str, Any]]:
        """The job's transitions, oldest first, from the hot set or else the archive."""
        async with translated():
            items = await self.redis.lrange(self.keys.for_id(job_id).job_history(job_id), 0, -1)
        if items:
            return [orjson.loads(item) for item in items]
        archived = await read_archived(self.redis, self.keys, job_id)
        return archived.history if archived is not None else []

    async def queue_heads(self, batch: int, max_tenants: int = 1000, *, claimer: str = "",
                          claim_ms: int = CLAIM_MS) -> list[tuple[str, int, float, str]]:  # fmt: skip
        """The head of every tenant's queue as (job, position in its tenant's queue, queue score, tenant),
        claimed for `claimer` for `claim_ms` so another replica's pass passes them over (heads.lua).

        Each tenant gets an equal share of `batch` (at least 4) of its window, and as many again of its
        parked jobs that capacity may have grown for since they were parked (those come after the window,
        with the generation they were parked at as their score). Also refreshes `usage` and `limits`. One
        round trip whatever the number of tenants (one call per job shard, the batch shared among them).
        """
        shards = self.keys.each_shard
        calls = [(self._heads, [sk.prefix + ":", sk.queued_tenants, sk.tenant_usage, sk.tenant_limits],
                  [claimer or "-", *self._shares(sk.index, batch, max_tenants), claim_ms, self.wake_seen])
                 for sk in shards]  # fmt: skip
        async with translated():
            replies = await self.run_scripts(calls)
        self.usage, self.limits, self.attempts, self.tenants_of = {}, {}, {}, {}
        heads: list[tuple[str, int, float, str]] = []
        for sk, (usage, limits, flat, queued_tenants) in zip(shards, replies, strict=True):
            self.queued_tenants_seen[sk.index] = int(queued_tenants)
            self.usage.update({text(usage[i]): int(usage[i + 1]) for i in range(0, len(usage), 2)})
            self.limits.update({text(limits[i]): int(limits[i + 1]) for i in range(0, len(limits), 2)})
            self.attempts.update({text(flat[i]): int(flat[i + 4]) for i in range(0, len(flat), 5)})
            self.tenants_of.update({text(flat[i]): text(flat[i + 3]) for i in range(0, len(flat), 5)})
            heads += [(text(flat[i]), int(flat[i + 1]), float(flat[i + 2]), text(flat[i + 3]))
                      for i in range(0, len(flat), 5)]  # fmt: skip
        return heads

    def _shares(self, shard: int, batch: int, max_tenants: int) -> tuple[int, int]:
        """A job shard's part of a pass's batch and of its tenants, in proportion to its tenants with queued jobs
        as the last pass found them (each tenant's share alike whatever its shard; at least 4 jobs a shard, so
        a shard whose first tenant has just submitted is read this pass)."""
        count = self.keys.shards
        if count == 1:
            return batch, max_tenants
        seen = self.queued_tenants_seen
        total = sum(seen.get(i, 0) for i in range(count))
        if not total:
            return max(4, -(-batch // count)), max(1, -(-max_tenants // count))
        part = seen.get(shard, 0) / total
        return max(4, round(batch * part)), max(1, round(max_tenants * part))

    async def queue_depths(self) -> dict[str, int]:
        """Queued jobs per priority."""
        async with translated():
            pipe = self.redis.pipeline(transaction=False)
            for sk in self.keys.each_shard:
                pipe.hgetall(sk.queue_depth)
            raws = await pipe.execute()
        depths = {p: 0 for p in PRIORITY_RANK}
        for raw in raws:
            for p, n in raw.items():
                depths[text(p)] = depths.get(text(p), 0) + int(n)
        return depths

    async def set_tenant_limit(self, tenant: str, devices: int | None) -> None:
        limits = self.keys.for_tenant(tenant).tenant_limits
        async with translated():
            if devices is None:
                await self.redis.hdel(limits, tenant)
            else:
                await self.redis.hset(limits, tenant, devices)

    async def _due(self, index: Callable[[ShardKeys], str], at_ms: int) -> list[str]:
        """The members of a per-shard index scored at or before `at_ms`, every shard's, in one round trip."""
        async with translated():
            pipe = self.redis.pipeline(transaction=False)
            for sk in self.keys.each_shard:
                pipe.zrangebyscore(index(sk), "-inf", at_ms)
            return [text(j) for rows in await pipe.execute() for j in rows]

    async def due_deadlines(self, at_ms: int) -> list[str]:
        return await self._due(lambda sk: sk.deadlines, at_ms)

    async def get_job(self, job_id: str) -> dict[str, str] | None:
        """The job from the hot set or else the archive (a finished job past the retention); None if neither."""
        async with translated():
            raw = await self.redis.hgetall(self.keys.for_id(job_id).job(job_id))
        if raw:
            return decode_hash(raw)
        archived = await read_archived(self.redis, self.keys, job_id)
        return archived.job if archived is not None else None

    async def get_whole_jobs(self, ids: Sequence[str]) -> list[dict[str, str] | None]:
        """Whole job records in one round trip (archived ones read after); None where there is none."""
        async with translated():
            pipe = self.redis.pipeline(transaction=False)
            for job_id in ids:
                pipe.hgetall(self.keys.for_id(job_id).job(job_id))
            raws = await pipe.execute()
        return [decode_hash(raw) if raw else await self.get_job(job_id) for job_id, raw in zip(ids, raws, strict=True)]

    async def get_jobs(self, ids: Sequence[str], *fields: str) -> list[list[str | None]]:
        async with translated():
            pipe = self.redis.pipeline(transaction=False)
            for job_id in ids:
                pipe.hmget(self.keys.for_id(job_id).job(job_id), *fields)
            rows = await pipe.execute()
        return [[v.decode() if v is not None else None for v in row] for row in rows]

    async def list_jobs(self, tenant: str, limit: int, state: str | None = None) -> list[dict[str, str]]:
        """The tenant's jobs in the hot set, newest first, at most `limit`; with a state, read through the
        tenant's index of jobs in that state, so only jobs in it are read. Two round trips."""
        sk = self.keys.for_tenant(tenant)
        index = sk.tenant_state(tenant, state) if state else sk.tenant_jobs(tenant)
        async with translated():
            ids = await self.redis.zrevrange(index, 0, limit - 1)
            if not ids:
                return []
            pipe = self.redis.pipeline(transaction=False)
            for job_id in ids:
                pipe.hgetall(sk.job(text(job_id)))
            rows = await pipe.execute()
        jobs = [decode_hash(raw) for raw in rows if raw]
        # a job that moved on between the two reads is left out rather than listed in a state it has left
        return [job for job in jobs if state is None or job.get("state") == state]

    async def queued(self, start: int, count: int) -> list[str]:
        """Queued jobs `start` to `start + count` in queue order (every shard's queue, merged by score)."""
        shards = self.keys.each_shard
        async with translated():
            if len(shards) == 1:
                return [text(j) for j in await self.redis.zrange(shards[0].queue, start, start + count - 1)]
            pipe = self.redis.pipeline(transaction=False)
            for sk in shards:
                pipe.zrange(sk.queue, 0, start + count - 1, withscores=True)
            rows = [(float(score), text(j)) for found in await pipe.execute() for j, score in found]
        return [j for _score, j in sorted(rows)[start:start + count]]

    async def queue_length(self) -> int:
        async with translated():
            pipe = self.redis.pipeline(transaction=False)
            for sk in self.keys.each_shard:
                pipe.zcard(sk.queue)
            return sum(int(n) for n in await pipe.execute())

    async def allocate(self, placements: Sequence[Placement], accept_timeout_ms: int) -> list[Commit]:
        """Commit placements, each in two fenced steps (broker.state.ledger): its devices reserved on its site's
        shard, then the job bound to them on the job shard; per placement the attempt it became, or why it was
        refused. Three round trips for a batch whose pools share their hubs' shards (a runner-up on another
        hub's shard is tried in one more); a placement with a hold binds first and its hold's entry passes to
        the job after."""
        if not placements:
            return []
        out: list[Commit | None] = [None] * len(placements)
        held = [i for i, p in enumerate(placements) if p.hold]
        if held:
            for i, commit in zip(held, await self._commit_held([placements[i] for i in held], accept_timeout_ms),
                                 strict=True):  # fmt: skip
                out[i] = commit
        plain = [i for i, p in enumerate(placements) if not p.hold]
        if plain:
            commits = await self._commit_plain([placements[i] for i in plain], accept_timeout_ms)
            for i, commit in zip(plain, commits, strict=True):
                out[i] = commit
        return [c if c is not None else Commit(refusal=Refusal.STALE_VIEW) for c in out]

    def _headroom(self, job: str) -> int | None:
        """The devices the job's tenant may still take, as the last queue_heads() read them (None: no limit)."""
        tenant = self.tenants_of.get(job)
        if tenant is None or tenant not in self.limits:
            return None
        return self.limits[tenant] - self.usage.get(tenant, 0)

    async def _attempts(self, jobs: Sequence[str]) -> dict[str, int]:
        """Each job's attempt: as the last queue_heads() read it, else read now (with its tenant's limit and
        usage, for the headroom)."""
        known = {j: self.attempts[j] for j in jobs if j in self.attempts}
        missing = [j for j in dict.fromkeys(jobs) if j not in known]
        if missing:
            rows = await self.get_jobs(missing, "attempt", "tenant")
            known.update({j: int(a or 0) for j, (a, _t) in zip(missing, rows, strict=True)})
            tenants = sorted({t for _a, t in rows if t})
            self.tenants_of.update({j: t for j, (_a, t) in zip(missing, rows, strict=True) if t})
            if tenants:
                async with translated():
                    pipe = self.redis.pipeline(transaction=False)
                    for tenant in tenants:
                        pipe.hget(self.keys.for_tenant(tenant).tenant_limits, tenant)
                        pipe.hget(self.keys.for_tenant(tenant).tenant_usage, tenant)
                    raw = await pipe.execute()
                limits, usage = raw[0::2], raw[1::2]
                for tenant, limit, used in zip(tenants, limits, usage, strict=True):
                    if limit is not None:
                        self.limits[tenant] = int(limit)
                    self.usage[tenant] = int(used or 0)
        return known

    async def _commit_plain(self, placements: Sequence[Placement], accept_timeout_ms: int) -> list[Commit]:
        attempts = await self._attempts([p.job for p in placements])
        groups = [_pool_groups(p) for p in placements]
        reserved: dict[int, tuple[int, Reserved]] = {}  # placement -> (the pool that took it, what it took)
        refusal: list[int | None] = [None] * len(placements)
        trying = list(range(len(placements)))
        for round_ in range(max(len(g) for g in groups)):
            calls, asked = [], []
            for i in trying:
                if round_ >= len(groups[i]):
                    continue
                p, (hub, pools) = placements[i], groups[i][round_]
                spec = [(_pool(p, k)[0], _pool(p, k)[2], _pool(p, k)[3]) for k in pools]
                calls.append(self.reserve_call(hub, p.job, attempts[p.job] + 1, spec, self._headroom(p.job)))
                asked.append(i)
            if not calls:
                break
            async with translated():
                replies = await self.run_scripts(calls)
            trying = []
            for i, reply in zip(asked, replies, strict=True):
                if isinstance(reply, list):
                    pool = groups[i][round_][1][int(reply[0])]
                    reserved[i] = (pool, Reserved(pool, int(reply[1]), int(reply[2])))
                else:
                    refusal[i] = refusal[i] if refusal[i] is not None else int(reply)
                    trying.append(i)
        binds, bound_at = [], []
        for i, (pool, r) in reserved.items():
            p = placements[i]
            binds.append(self._bind_call(p, _pool(p, pool), accept_timeout_ms, attempts[p.job] + 1, r))
            bound_at.append(i)
        results: list[Commit] = [Commit(refusal=_REFUSALS[refusal[i] or 0]) for i in range(len(placements))]
        if not binds:
            return results
        async with translated():
            replies = await self.run_scripts(binds)
        follow = []
        for i, reply in zip(bound_at, replies, strict=True):
            pool, r = reserved[i]
            p = placements[i]
            site, hub = _pool(p, pool)[0], _pool(p, pool)[1]
            attempt = attempts[p.job] + 1
            if int(reply) >= 1:
                results[i] = Commit(attempt=int(reply), seq=r.seq, choice=pool)
                follow.append(self.ledger_call(hub, "settle", site, p.job, attempt))
            else:
                results[i] = Commit(refusal=_REFUSALS[int(reply)])
                follow.append(self.ledger_call(hub, "release", site, p.job, attempt))
        async with translated():
            await self.run_scripts(follow)  # what is not done here the sweeper does once the lease is over
        return results

    async def offline_sites(self, places: Iterable[tuple[str, str]]) -> set[str]:
        """Which of the (hub, site) pairs are not online now (their hub shard's word)."""
        wanted = list(dict.fromkeys(places))
        if not wanted:
            return set()
        async with translated():
            pipe = self.redis.pipeline(transaction=False)
            for hub, site in wanted:
                pipe.hget(self.keys.hub(hub).site(site), "status")
            statuses = await pipe.execute()
        return {site for (_hub, site), status in zip(wanted, statuses, strict=True) if text(status) != "online"}

    async def _commit_held(self, placements: Sequence[Placement], accept_timeout_ms: int) -> list[Commit]:
        # A hold's devices are already the hold's at the site, so no reservation (which checks the site is
        # online) comes first: the site's status is read here. A site that goes away after this read has its
        # jobs given back by the lost-site sweep, or this one by its accept timeout.
        offline = await self.offline_sites((p.hub, p.site) for p in placements)
        if offline:
            ready = [p for p in placements if p.site not in offline]
            done = iter(await self._commit_held(ready, accept_timeout_ms) if ready else [])
            return [Commit(refusal=Refusal.SITE_NOT_ONLINE) if p.site in offline else next(done) for p in placements]
        calls = [self._bind_call(p, _pool(p, 0), accept_timeout_ms, None, None) for p in placements]
        async with translated():
            replies = await self.run_scripts(calls)
        steps = [self._merge_entry(p, int(r)) for p, r in zip(placements, replies, strict=True) if int(r) >= 1]
        seqs = iter(await self.run_steps(steps))
        out = []
        for reply in replies:
            if int(reply) < 1:
                out.append(Commit(refusal=_REFUSALS[int(reply)]))
                continue
            seq = next(seqs)
            out.append(Commit(attempt=int(reply), seq=int(seq) if not isinstance(seq, Exception) else 0))
        return out

    @staticmethod
    def _merge_entry(p: Placement, attempt: int) -> str:
        """The outbox entry bind.lua wrote for a placement with a hold: its hold's devices pass to the job."""
        return "\t".join(["merge", p.hub, p.site, p.job, str(attempt), str(p.count), hold_owner(p.hold), "0"])

    def _bind_call(self, p: Placement, pool: tuple[str, str, str, int, float, float, str], accept_timeout_ms: int,
                   attempt: int | None, reserved: Reserved | None
                   ) -> tuple[AsyncScript, list[str], list[Any]]:  # fmt: skip
        k = self.keys.for_id(p.job)  # the job's shard, its hold's too (a hold is its tenant's)
        site, hub, model, count, price, latency, arch = pool
        return (self._bind,
                [k.job(p.job), k.queue, k.assigned, k.events, k.queued_tenants, k.tenant_usage, k.tenant_limits,
                 k.job_history(p.job), k.prefix + ":", k.queue_depth, k.hold(p.hold or "-"), k.outbox],
                [p.job, site, model, count, price, latency, "", accept_timeout_ms, self.events_maxlen, hub, arch,
                 p.decision, p.hold, "" if attempt is None else attempt, "" if reserved is None else reserved.seq,
                 "" if reserved is None else reserved.lease_end,
                 0 if reserved is None else reserved.choice])  # fmt: skip

    async def transition(
        self, job_id: str, action: str, site: str = "", attempt: int | str = "", reason: str = ""
    ) -> str:
        """Apply one lifecycle action; returns the new state, or '' when it did not apply."""
        return (await self.transitions([(job_id, action, site, attempt, reason)]))[0]

    async def transitions(self, actions: Iterable[tuple[str, str, str, int | str, str]]) -> list[str]:
        """Apply lifecycle actions in one round trip on the jobs' shards, then give back on the sites' shards the
        devices of the jobs that left them (the outbox steps the transitions wrote)."""
        calls = [(self._transition, self.transition_keys(job_id),
                  [job_id, action, site, str(attempt), reason, "", self.events_maxlen, self.max_attempts,
                   HALF_LIFE_MS]) for job_id, action, site, attempt, reason in actions]  # fmt: skip
        async with translated():
            replies = await self.run_scripts(calls)
        states, steps = [], []
        for reply in replies:
            if isinstance(reply, list):
                states.append(text(reply[0]))
                steps.append(text(reply[1]))
            else:
                states.append(text(reply))
        await self.run_steps(steps)
        return states

    def transition_keys(self, job_id: str) -> list[str]:
        """transition.lua's KEYS for a job (on the job's shard)."""
        k = self.keys.for_id(job_id)
        return [k.job(job_id), k.queue, k.assigned, k.events, k.sites, k.clock, k.prefix + ":", k.queued_tenants,
                k.tenant_usage, k.deadlines, k.job_history(job_id), k.queue_depth, k.usage]  # fmt: skip

    async def overdue_assignments(self, at_ms: int) -> list[str]:
        return await self._due(lambda sk: sk.assigned, at_ms)

    async def set_reasons(self, reasons: Mapping[str, str], park: Collection[str] = (), seen: int = 0) -> int:
        """Record why queued jobs are still waiting, and park those in `park` (out of their tenant's window
        until capacity may have grown past the `wake` generation `seen`, read before the view that found
        them unplaceable); jobs no longer queued are left alone. One round trip."""
        jobs = {*reasons, *park}
        if not jobs:
            return 0
        by_shard: dict[int, list[str]] = {}
        for job_id in jobs:
            by_shard.setdefault(self.keys.id_shard(job_id), []).extend(
                [job_id, reasons.get(job_id, ""), "1" if job_id in park else "0"])  # fmt: skip
        calls = [(self._waiting, [self.keys.shard(i).prefix + ":"], [str(seen), *args])
                 for i, args in by_shard.items()]  # fmt: skip
        async with translated():
            return sum(int(n) for n in await self.run_scripts(calls))

