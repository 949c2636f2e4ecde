"""Read-only views over the whole network's state for operators: a sample of the queue, one job's entries in
the event log, and usage records by time range.

Usage records are written by transition.lua when a job that held devices ends, to the global usage stream
(trimmed to the usage retention) and to the tenant's own stream; their stream entry ids are the end times,
so a time range is one XRANGE (paged) of the tenant's stream, or of the global one for every tenant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from broker.state.connection import StreamEntries, entry_key, text, translated
from broker.state.events import decode_event
from broker.state.store import Store

USAGE_FIELDS = ("job", "tenant", "site", "hub", "arch", "model", "devices", "start", "end", "device_hours", "price",
                "cost", "state")  # fmt: skip
_USAGE_NUMBERS = {"devices": int, "start": int, "end": int, "device_hours": float, "price": float, "cost": float}
MAX_USAGE_RECORDS = 100_000
USAGE_PAGE = 5000
QUEUED_FIELDS = ("reason", "tenant", "priority", "created", "name", "origin")
_TERMINAL = ("completed", "failed", "cancelled")


@dataclass(frozen=True)
class QueueSample:
    """The queue as the dashboard shows it: depth by priority, the head of the queue with the fields of
    `QUEUED_FIELDS` per job, the jobs assigned but not yet accepted, and the newest events (newest first)."""

    depths: dict[str, int]
    queued: list[tuple[str, list[str | None]]]
    awaiting_acceptance: int
    newest_events: list[dict[str, Any]]


@dataclass(frozen=True)
class JobEvents:
    """A job's entries in the event log, oldest first; `complete` when the log was read to its end or to the
    job's final event."""

    events: list[dict[str, Any]]
    complete: bool


def usage_record(fields: dict[bytes, bytes]) -> dict[str, Any]:
    """One usage stream entry as a record, with its numbers as numbers."""
    record: dict[str, Any] = {}
    for raw_key, raw_value in fields.items():
        key, value = text(raw_key), text(raw_value)
        record[key] = _USAGE_NUMBERS[key](value) if key in _USAGE_NUMBERS else value
    return record


class Queries:
    """Operators' reads that span many keys; each is a few round trips whatever the size of the network."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def queue_sample(self, queued: int, recent_events: int) -> QueueSample:
        """The first `queued` jobs of the queue and the newest `recent_events` events."""
        store = self.store
        shards, redis = store.keys.each_shard, store.redis
        depths = await store.queue_depths()
        ids = await store.queued(0, queued)
        async with translated():
            pipe = redis.pipeline(transaction=False)
            for sk in shards:
                pipe.zcard(sk.assigned)
                pipe.xrevrange(sk.events, count=recent_events)
            replies = await pipe.execute()
        assigned = sum(int(n) for n in replies[0::2])
        # the newest of every shard's log, newest first (ids of two shards compare by their time)
        newest = sorted((row for rows in replies[1::2] for row in cast(StreamEntries, rows)),
                        key=lambda row: entry_key(text(row[0])), reverse=True)[:recent_events]  # fmt: skip
        fields = await store.get_jobs(ids, *QUEUED_FIELDS)
        return QueueSample(
            depths=depths,
            queued=list(zip(ids, fields, strict=True)),
            awaiting_acceptance=int(assigned),
            newest_events=[decode_event(i, f) for i, f in newest],
        )

    async def job_events(self, job_id: str, since_ms: int, page: int = 5000, rounds: int = 4) -> JobEvents:
        """The job's entries in the event log read forward from `since_ms` (its submission), at most `rounds`
        pages of `page` entries."""
        store = self.store
        events: list[dict[str, Any]] = []
        start, wanted = f"{since_ms}-0", job_id.encode()
        async with translated():
            for _ in range(rounds):
                rows = cast(StreamEntries, await store.redis.xrange(store.keys.for_id(job_id).events, start, "+",
                                                                    count=page))  # fmt: skip
                events += [decode_event(event_id, fields) for event_id, fields in rows if fields.get(b"job") == wanted]
                if len(rows) < page or (events and events[-1].get("type") in _TERMINAL):
                    return JobEvents(events, True)
                start = "(" + text(rows[-1][0])
        return JobEvents(events, False)

    async def usage_records(self, start_ms: int | None, end_ms: int | None, tenant: str | None
                            ) -> list[dict[str, Any]]:  # fmt: skip
        """Records of jobs that ended in [start_ms, end_ms] (open ends when None), oldest first, for one
        tenant (its own stream: the work is the size of the answer) or (None) all tenants (the global stream,
        which reaches back as far as the usage retention); at most MAX_USAGE_RECORDS."""
        keys = self.store.keys
        streams = ([sk.usage for sk in keys.each_shard] if tenant is None
                   else [keys.for_tenant(tenant).tenant_usage_log(tenant)])  # fmt: skip
        rows: list[tuple[tuple[int, int], dict[str, Any]]] = []
        for stream in streams:
            rows += await self._usage_rows(stream, start_ms, end_ms)
        rows.sort(key=lambda row: row[0])  # every shard's records by end time
        return [record for _key, record in rows[:MAX_USAGE_RECORDS]]

    async def _usage_rows(self, stream: str, start_ms: int | None, end_ms: int | None
                          ) -> list[tuple[tuple[int, int], dict[str, Any]]]:  # fmt: skip
        """One usage stream's records in [start_ms, end_ms], oldest first, at most MAX_USAGE_RECORDS, each with
        its entry id's (ms, seq)."""
        out: list[tuple[tuple[int, int], dict[str, Any]]] = []
        after = str(start_ms) if start_ms is not None else "-"
        until = str(end_ms) if end_ms is not None else "+"
        async with translated():
            while len(out) < MAX_USAGE_RECORDS:
                count = min(USAGE_PAGE, MAX_USAGE_RECORDS - len(out))
                page = cast(StreamEntries, await self.store.redis.xrange(stream, after, until, count=count))
                out += [(entry_key(text(entry_id)), usage_record(fields)) for entry_id, fields in page]
                if len(page) < count:
                    break
                after = "(" + text(page[-1][0])
        return out
