"""`suanwang audit --history`: the event log read back as a history of every job, and checked.

`audit` (broker.state.audit) checks one moment of the state; this checks how the state got there. The
`events` stream, written only by the Lua scripts (submit, allocate, transition), is read oldest first,
page by page, and each job's events are run through the lifecycle they must follow:

- attempts only grow: each allocation is the job's previous attempt plus one, and every later event of
  the job names the attempt allocated last (`attempt_order`);
- at most one attempt is live (allocated and not yet released) at any moment (`double_live`), also by
  what the sites themselves recorded when a caller passes their runs in (`site_runs`); a run a site
  recorded must be one the log gave that site (`site_run`);
- an attempt that ends (requeued, completed, failed, cancelled) was released first (`unreleased`), and
  nothing happens to a job after it ended (`after_final`);
- a job ends, is queued, or is live at the end of the log, and then its record still holds it
  (`unfinished`); a job in the log has a record, or an archived one once it ended (`lost`);
- every allocation's hub and province satisfy the job's `residency`, judged by the site's registered
  hub and cluster when it is registered (`residency`);
- a hold is taken once and ends once, used by one job (whose allocation is the hold's site, model and
  count) or expired or released, never two of them (`hold`); the violation names the hold.

The stream is capped (`MAXLEN ~ events_maxlen`), so its oldest entries may be gone: a job whose first
event in the log is not its submission is checked from where its history begins (`partial_jobs`), and
the report says whether the stream was trimmed. When Redis says nothing was ever removed from the
stream, such a job is itself a violation (`missing_start`).

On a live system jobs move while the log is read: jobs with events after the page the records were read
at are checked against the log alone, not against their records.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, cast

import orjson
from pydantic import ValidationError
from redis import exceptions as redis_errors

from broker.model.job import Residency
from broker.state.connection import StreamEntries, entry_key, text, translated
from broker.state.registry import SiteRegistry
from broker.state.store import Store
from regions import Geography, load_geography

PAGE = 5000  # stream entries per XRANGE
RECORD_BATCH = 1000  # job records per pipeline
TAIL_ROUNDS = 8  # pages read after the records, for jobs that moved meanwhile
FINAL = ("completed", "failed", "cancelled")
HOLDING = ("assigned", "running")
LIVE_EVENTS = ("accepted", "running", "released")  # of the live attempt
EVENTS = ("queued", "allocated", *LIVE_EVENTS, "requeued", *FINAL)
KINDS = ("attempt_order", "double_live", "unreleased", "after_final", "unfinished", "lost", "missing_start",
         "residency", "site_run", "hold")  # fmt: skip
HOLD_ENDS = ("hold_expired", "hold_released")


class SiteRun(NamedTuple):
    """What a site recorded of one run of a job: the attempt, where, and when (ms; no end while it runs)."""

    attempt: int
    site: str
    start_ms: float
    end_ms: float | None = None


@dataclass(frozen=True)
class HistoryViolation:
    job: str
    kind: str
    detail: str

    def as_dict(self) -> dict[str, str]:
        return {"job": self.job, "kind": self.kind, "detail": self.detail}


@dataclass(frozen=True)
class HistoryReport:
    """What the log said. `trimmed`: the stream has lost its oldest entries (None: this Redis cannot tell);
    `partial_jobs`: jobs whose submission is no longer in the log; `live_jobs`: jobs live at its end."""

    violations: tuple[HistoryViolation, ...]
    events: int
    jobs: int
    first_event: str | None
    last_event: str | None
    trimmed: bool | None
    partial_jobs: int
    live_jobs: int

    @property
    def ok(self) -> bool:
        return not self.violations

    def as_dict(self) -> dict[str, Any]:
        return {"events": self.events, "jobs": self.jobs, "first_event": self.first_event,
                "last_event": self.last_event, "trimmed": self.trimmed, "partial_jobs": self.partial_jobs,
                "live_jobs": self.live_jobs, "violations": [v.as_dict() for v in self.violations]}  # fmt: skip


@dataclass
class _Allocation:
    attempt: int
    site: str
    hub: str
    start: float | None  # None: allocated before the log begins
    end: float | None = None  # None: still live


@dataclass
class _Track:
    """One job's history so far."""

    partial: bool  # the job's submission is not in the log
    attempt: int | None = None  # the attempt allocated last (None: not known yet)
    live: _Allocation | None = None
    final: str | None = None
    last_state: str = "queued"
    allocations: list[_Allocation] = field(default_factory=list)


def _int(value: bytes | None) -> int | None:
    try:
        return int(value) if value is not None and value != b"" else None
    except ValueError:
        return None


def _ms(event_id: bytes, fields: dict[bytes, bytes]) -> float:
    """The event's time: its `ts` field, else the time in its stream id."""
    ts = _int(fields.get(b"ts"))
    return float(ts) if ts is not None else float(event_id.split(b"-")[0])


@dataclass
class _Hold:
    """One hold's history so far: what it took, and how it ended (None: standing)."""

    pool: tuple[str, str, int]  # site, model, count
    ended: str | None = None


class _Checker:
    def __init__(self) -> None:
        self.tracks: dict[str, _Track] = {}
        self.holds: dict[str, _Hold] = {}
        self.violations: list[HistoryViolation] = []

    def _hold(self, kind: str, fields: dict[bytes, bytes], eid: str) -> None:
        """A hold's event: taken, used by an allocation, or ended."""
        hold = text(fields.get(b"hold"))
        pool = (text(fields.get(b"site")), text(fields.get(b"model")), _int(fields.get(b"count")) or 0)
        known = self.holds.get(hold)
        if kind == "held":
            if known is not None:
                self.flag(hold, "hold", f"taken again at {eid}")
            self.holds[hold] = _Hold(pool)
            return
        if known is None:  # taken before the log begins
            self.holds[hold] = _Hold(pool, "used" if kind == "allocated" else kind)
            return
        if known.ended is not None:
            self.flag(hold, "hold", f"{kind} at {eid} after it had ended ({known.ended})")
        elif kind == "allocated" and pool != known.pool:
            self.flag(hold, "hold", f"used at {eid} for {pool[2]} {pool[1]} at {pool[0]}, but it held {known.pool[2]} "
                                    f"{known.pool[1]} at {known.pool[0]}")  # fmt: skip
        known.ended = known.ended or ("used" if kind == "allocated" else kind)

    def flag(self, job: str, kind: str, detail: str) -> None:
        self.violations.append(HistoryViolation(job, kind, detail))

    def feed(self, event_id: bytes, fields: dict[bytes, bytes]) -> None:
        kind, job = text(fields.get(b"type")), text(fields.get(b"job"))
        if kind == "held" or kind in HOLD_ENDS or (kind == "allocated" and fields.get(b"hold")):
            self._hold(kind, fields, text(event_id))
        if not job:
            return
        if kind not in EVENTS:  # a kind of event this checker does not know: no rule to apply
            return
        track = self.tracks.get(job)
        if track is None:
            track = self.tracks[job] = _Track(partial=kind != "queued")
        at, eid = _ms(event_id, fields), text(event_id)
        if track.final is not None:
            self.flag(job, "after_final", f"{kind} at {eid} after the job {track.final}")
        attempt = _int(fields.get(b"attempt"))
        if kind == "queued":
            return
        if kind == "allocated":
            self._allocated(job, track, attempt or 0, text(fields.get(b"site")), text(fields.get(b"hub")), at, eid)
        elif attempt is not None:
            self._transition(job, track, kind, attempt, text(fields.get(b"site")), text(fields.get(b"hub")), at, eid)
        state = text(fields.get(b"state"))
        if kind != "released" and state:
            track.last_state = state
        if kind in FINAL:
            track.final = kind

    def _allocated(self, job: str, track: _Track, attempt: int, site: str, hub: str, at: float, eid: str) -> None:
        if track.live is not None:
            live = track.live
            self.flag(job, "double_live", f"attempt {attempt} allocated at {site} ({eid}) while attempt "
                                          f"{live.attempt} at {live.site} was still live")  # fmt: skip
            live.end = at
        expected = (track.attempt or 0) + 1 if track.attempt is not None or not track.partial else None
        if expected is not None and attempt != expected:
            how = "did not grow" if attempt < expected else f"skipped attempt {expected}"
            self.flag(job, "attempt_order", f"allocated attempt {attempt} at {eid} after attempt {expected - 1}: {how}")
        track.attempt = max(track.attempt or 0, attempt)
        track.live = _Allocation(attempt, site, hub, at)
        track.allocations.append(track.live)

    def _transition(self, job: str, track: _Track, kind: str, attempt: int, site: str, hub: str, at: float,
                    eid: str) -> None:  # fmt: skip
        if track.attempt is None and track.partial:  # the log begins inside this job's history
            track.attempt = attempt
            if kind in LIVE_EVENTS and attempt > 0:
                track.live = _Allocation(attempt, site, hub, None)
                track.allocations.append(track.live)
        if attempt != (track.attempt or 0):
            self.flag(job, "attempt_order", f"{kind} of attempt {attempt} at {eid}, but the attempt allocated "
                                            f"last is {track.attempt or 0}")  # fmt: skip
            return
        live = track.live
        if kind in LIVE_EVENTS:
            if live is None or live.attempt != attempt:
                self.flag(job, "attempt_order", f"{kind} of attempt {attempt} at {eid}, which is not live")
            elif kind == "released":
                live.end, track.live = at, None
        elif live is not None:  # requeued or final while still holding: no release was logged
            self.flag(job, "unreleased", f"{kind} at {eid} while attempt {live.attempt} at {live.site} was "
                                         f"never released")  # fmt: skip
            live.end, track.live = at, None


async def _stream_info(store: Store, stream: str) -> bool | None:
    """Whether entries were ever removed from the stream (None: this Redis does not say)."""
    async with translated():
        try:
            info = await store.redis.xinfo_stream(stream)
        except redis_errors.ResponseError as exc:
            if "no such key" in str(exc).lower():
                return False
            raise
    added = info.get("entries-added")
    return int(added) > int(info.get("length", 0)) if added is not None else None


async def _read(store: Store, stream: str, checker: _Checker, after: str, page: int, rounds: int | None
                ) -> tuple[str, int, set[str]]:  # fmt: skip
    """Feed the events of `stream` after id `after` (exclusive; '-' for all) to `checker`, a page at a time,
    at most `rounds` pages when given; returns the last id read, how many were read and the jobs they named."""
    read, jobs, done = 0, set[str](), 0
    while rounds is None or done < rounds:
        start = after if after == "-" else "(" + after
        async with translated():
            rows = cast(StreamEntries, await store.redis.xrange(stream, start, "+", count=page))
        for event_id, fields in rows:
            checker.feed(event_id, fields)
            jobs.add(text(fields.get(b"job")))
        read, done = read + len(rows), done + 1
        if rows:
            after = text(rows[-1][0])
        if len(rows) < page:
            break
    return after, read, jobs


def _residency_problem(residency: Residency, hub: str, province: str) -> str | None:
    if residency.allow_hubs and hub not in residency.allow_hubs:
        return f"hub {hub or '?'} is not among the allowed {list(residency.allow_hubs)}"
    if hub in residency.deny_hubs:
        return f"hub {hub} is denied"
    allowed = {p.lower() for p in residency.allow_provinces}
    if allowed and province.lower() not in allowed:
        return f"province {province or '?'} is not among the allowed {sorted(allowed)}"
    if province and province.lower() in {p.lower() for p in residency.deny_provinces}:
        return f"province {province} is denied"
    return None


async def _places(store: Store, sites: set[str], geography: Geography) -> dict[str, tuple[str | None, str]]:
    """Per site: the registry's hub (None when not registered) and the province of its cluster ('' unknown)."""
    registered = {s.id: s for s in await SiteRegistry(store.redis, store.keys).sites()}
    ordered = sorted(sites)
    places = await store.places(ordered)
    async with translated():
        pipe = store.redis.pipeline(transaction=False)
        for site in ordered:
            pipe.hget(store.keys.hub(places[site].hub if site in places else "").site(site), "cluster")
        reported = [text(c) for c in await pipe.execute()]
    out: dict[str, tuple[str | None, str]] = {}
    for site, cluster in zip(ordered, reported, strict=True):
        entry = registered.get(site)
        cluster = (entry.cluster if entry is not None else None) or cluster
        known = geography.clusters.get(cluster)
        out[site] = (entry.hub if entry is not None else None, known.province if known is not None else "")
    return out


def _check_site_runs(checker: _Checker, job: str, track: _Track | None, runs: Iterable[SiteRun]) -> None:
    runs = [SiteRun(*run) for run in runs]
    allocations = track.allocations if track is not None else []
    by_attempt = {a.attempt: a for a in allocations}
    first_known = min(by_attempt, default=None)
    for run in runs:
        allocation = by_attempt.get(run.attempt)
        if allocation is None:
            unknowable = track is None or (track.partial and (first_known is None or run.attempt < first_known))
            if not unknowable:
                checker.flag(job, "site_run", f"{run.site} ran attempt {run.attempt}, which the log never allocated")
        elif allocation.site != run.site:
            checker.flag(job, "site_run", f"{run.site} ran attempt {run.attempt}, which the log gave to "
                                          f"{allocation.site}")  # fmt: skip
    inf = float("inf")
    windows = [(a.attempt, f"the log's attempt {a.attempt} at {a.site}", a.start if a.start is not None else -inf,
                a.end if a.end is not None else inf, False) for a in allocations]  # fmt: skip
    windows += [(r.attempt, f"{r.site}'s run of attempt {r.attempt}", r.start_ms,
                 r.end_ms if r.end_ms is not None else inf, True) for r in runs]  # fmt: skip
    seen: set[tuple[int, int]] = set()
    for i, (a1, what1, s1, e1, site1) in enumerate(windows):
        for a2, what2, s2, e2, site2 in windows[i + 1 :]:
            if a1 == a2 or not (site1 or site2) or (a1, a2) in seen:
                continue
            if s1 < e2 and s2 < e1:
                seen.add((a1, a2))
                checker.flag(job, "double_live", f"{what1} overlaps {what2}")


class _Record(NamedTuple):
    state: str | None  # None: the job has no record; "archived": moved out of the hot set when it ended
    attempt: int
    residency: Residency | None


async def _records(store: Store, jobs: list[str]) -> dict[str, _Record]:
    out: dict[str, _Record] = {}
    for at in range(0, len(jobs), RECORD_BATCH):
        batch = jobs[at : at + RECORD_BATCH]
        async with translated():
            pipe = store.redis.pipeline(transaction=False)
            for job in batch:
                pipe.hmget(store.keys.for_id(job).job(job), "state", "attempt", "spec")
            rows = await pipe.execute()
        for job, (state, attempt, spec) in zip(batch, rows, strict=True):
            out[job] = _Record(text(state) or None, _int(attempt) or 0, _residency(spec))
        missing = [job for job in batch if out[job].state is None]
        if missing:  # a finished job past the retention lives on as one archived record (broker.state.archive)
            async with translated():
                pipe = store.redis.pipeline(transaction=False)
                for job in missing:
                    pipe.exists(store.keys.for_id(job).archived_job(job))
                archived = await pipe.execute()
            for job, found in zip(missing, archived, strict=True):
                if found:
                    out[job] = _Record("archived", 0, None)
    return out


def _judge_end(checker: _Checker, job: str, track: _Track, record: _Record) -> None:
    """The log's end against the job's record: it exists, and holds the job if the log leaves it live."""
    if record.state is None:
        checker.flag(job, "lost", f"in the log (last {track.final or track.last_state}) but it has no record")
        return
    live = track.live
    if record.state == "archived":
        if live is not None:
            checker.flag(job, "unfinished", f"the log leaves attempt {live.attempt} live at {live.site}, but the "
                                            f"job ended and was archived")  # fmt: skip
        return
    if live is not None and (record.state not in HOLDING or record.attempt != live.attempt):
        checker.flag(job, "unfinished", f"the log leaves attempt {live.attempt} live at {live.site}, but the "
                                        f"job is {record.state} (attempt {record.attempt})")  # fmt: skip
    if track.attempt is not None and record.attempt < track.attempt:
        checker.flag(job, "attempt_order", f"the record's attempt {record.attempt} is below the log's {track.attempt}")


def _judge_residency(checker: _Checker, job: str, track: _Track, residency: Residency,
                     places: Mapping[str, tuple[str | None, str]]) -> None:  # fmt: skip
    for allocation in track.allocations:
        registered, province = places.get(allocation.site, (None, ""))
        problem = _residency_problem(residency, registered or allocation.hub, province)
        if problem:
            where = f"{allocation.site} (registered in {registered})" if registered else allocation.site
            checker.flag(job, "residency", f"attempt {allocation.attempt} at {where}: {problem}")


async def check_history(
    store: Store,
    site_runs: Mapping[str, Iterable[SiteRun | tuple[int, str, float, float | None]]] | None = None,
    *,
    page: int = PAGE,
    geography: Geography | None = None,
) -> HistoryReport:
    """Read the whole event log of `store`'s namespace and check every job's history (see the module).
    `site_runs`: job -> what the sites recorded of its runs, checked against the log when given."""
    checker = _Checker()
    # every job shard's log on its own: a job's events, and a hold's, are all in its shard's
    streams = [sk.events for sk in store.keys.each_shard]
    lasts, events = {}, 0
    for stream in streams:
        lasts[stream], read, _ = await _read(store, stream, checker, "-", page, None)
        events += read
    records = await _records(store, list(checker.tracks))
    # jobs that moved while the records were read: their records may be newer than the log read so far
    moving: set[str] = set()
    for stream in streams:
        lasts[stream], read, moved = await _read(store, stream, checker, lasts[stream], page, TAIL_ROUNDS)
        events, moving = events + read, moving | moved
    # read last: trimming while the log was read counts (trimmed when any shard's log was)
    infos = [await _stream_info(store, stream) for stream in streams]
    trimmed = True if True in infos else (None if None in infos else False)
    async with translated():
        firsts = [cast(StreamEntries, await store.redis.xrange(stream, "-", "+", count=1)) for stream in streams]
    first_ids = [text(f[0][0]) for f in firsts if f]
    last_ids = [last for last in lasts.values() if last != "-"]
    sites = {a.site for t in checker.tracks.values() for a in t.allocations}
    places = await _places(store, sites, geography or load_geography())
    for job, track in checker.tracks.items():
        if trimmed is False and track.partial:
            checker.flag(job, "missing_start", "the log was never trimmed, yet it does not begin with the job's "
                                               "submission")  # fmt: skip
        record = records.get(job)
        if record is None:  # first seen after the records were read
            continue
        if job not in moving:
            _judge_end(checker, job, track, record)
        if record.residency is not None:
            _judge_residency(checker, job, track, record.residency, places)
    for job, runs in (site_runs or {}).items():
        _check_site_runs(checker, job, checker.tracks.get(job), cast(Iterable[SiteRun], runs))
    tracks = checker.tracks.values()
    return HistoryReport(
        violations=tuple(checker.violations), events=events, jobs=len(checker.tracks),
        first_event=min(first_ids, key=entry_key) if first_ids else None,
        last_event=max(last_ids, key=entry_key) if last_ids else None,
        trimmed=trimmed, partial_jobs=sum(1 for t in tracks if t.partial),
        live_jobs=sum(1 for t in tracks if t.live is not None),
    )  # fmt: skip


def _residency(spec: bytes | None) -> Residency | None:
    """The job's residency, None when the spec says nothing limiting (or cannot be read)."""
    if not spec:
        return None
    try:
        residency = Residency.model_validate(orjson.loads(spec).get("residency") or {})
    except (orjson.JSONDecodeError, ValidationError, AttributeError):
        return None
    limited = residency.allow_hubs or residency.deny_hubs or residency.allow_provinces or residency.deny_provinces
    return residency if limited else None
