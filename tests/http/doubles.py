"""In-memory stand-ins for what the HTTP API needs of the state package (broker.http.deps), holding just
enough state for the routes under test to behave as they do against Redis."""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import orjson

from broker.model.identity import Identity
from broker.model.job import JobSpec
from broker.model.records import SiteRecord
from broker.model.reliability import Reliability
from broker.state.events import Subscription, id_after
from broker.state.jobs import Submission, SubmitRate
from broker.state.queries import JobEvents, QueueSample
from broker.state.registry import RegisteredSite
from common.errors import Conflict, NotFound, SuanwangError
from regions import Geography

TERMINAL = ("completed", "failed", "cancelled")


def now_ms() -> int:
    return int(time.time() * 1000)


class MemoryStore:
    """Jobs and sites in dicts, in the same shape the Redis store keeps them (every value a string)."""

    def __init__(self) -> None:
        self.jobs: dict[str, dict[str, str]] = {}
        self.histories: dict[str, list[dict[str, Any]]] = {}
        self.idempotency: dict[tuple[str, str], tuple[str, str]] = {}  # (tenant, key) -> (job, body hash)
        self.sites: dict[str, SiteRecord] = {}
        self.site_statuses: dict[str, list[dict[str, Any]]] = {}
        self.reachable = True
        self.submit_rates: list[SubmitRate | None] = []

    def id_for(self, base: str, tenant: str) -> str:
        return base

    async def submit(self, job_id: str, spec: JobSpec, *, idempotency_key: str | None, body_hash: str,
                     rate_limit: SubmitRate | None, max_queued: int | None) -> tuple[dict[str, str], bool]:  # fmt: skip
        self.submit_rates.append(rate_limit)
        body_hash = body_hash or spec.model_dump_json()  # as the store does: the spec's own, when not given
        if idempotency_key is not None:
            seen = self.idempotency.get((spec.tenant, idempotency_key))
            if seen is not None:
                if seen[1] != body_hash:
                    raise Conflict(f"Idempotency-Key {idempotency_key!r} was used for a different job ({seen[0]})")
                return self.jobs[seen[0]], False
            self.idempotency[(spec.tenant, idempotency_key)] = (job_id, body_hash)
        created = str(now_ms())
        self.jobs[job_id] = {
            "id": job_id, "state": "queued", "spec": spec.model_dump_json(), "tenant": spec.tenant,
            "name": spec.name, "origin": spec.origin, "priority": spec.priority.value, "created": created,
            "updated": created, "attempt": "0", "reason": "waiting for the matcher",
        }  # fmt: skip
        self.histories[job_id] = [{"ts": int(created), "state": "queued"}]
        return self.jobs[job_id], True

    async def submit_many(
        self, items: Sequence[Submission], *, rate_limit: SubmitRate | None = None, max_queued: int | None = None
    ) -> list[tuple[dict[str, str], bool] | SuanwangError]:
        out: list[tuple[dict[str, str], bool] | SuanwangError] = []
        for item in items:
            try:
                out.append(await self.submit(item.job_id, item.spec, idempotency_key=item.idempotency_key,
                                             body_hash=item.body_hash, rate_limit=rate_limit,
                                             max_queued=max_queued))  # fmt: skip
            except SuanwangError as exc:
                out.append(exc)
        return out

    def place(self, job_id: str, site: str, hub: str, attempt: int = 1, state: str = "running") -> None:
        """Put a job on a site as the matcher and the site's events would have."""
        self.jobs[job_id].update({"state": state, "site": site, "hub": hub, "model": "A100-80G", "arch": "GPU",
                                  "count": "1", "price": "10.0", "latency_ms": "5.0", "attempt": str(attempt),
                                  "assigned_at": str(now_ms())})  # fmt: skip

    async def get_job(self, job_id: str) -> dict[str, str] | None:
        job = self.jobs.get(job_id)
        return dict(job) if job is not None else None

    async def list_jobs(self, tenant: str, limit: int, state: str | None = None) -> list[dict[str, str]]:
        newest_first = [j for j in reversed(self.jobs.values()) if j["tenant"] == tenant]
        return [dict(j) for j in newest_first if state is None or j["state"] == state][:limit]

    async def history(self, job_id: str) -> list[dict[str, Any]]:
        return list(self.histories.get(job_id, []))

    async def transition(self, job_id: str, action: str, site: str = "", attempt: int | str = "",
                         reason: str = "") -> str:  # fmt: skip
        job = self.jobs.get(job_id)
        if action != "cancel" or job is None or job["state"] in TERMINAL:
            return ""
        if (site and job.get("site", "") != site) or (attempt != "" and job.get("attempt", "0") != str(attempt)):
            return ""  # the job moved since the caller read it, as the transition script refuses
        job.update({"state": "cancelled", "reason": reason, "finished_at": str(now_ms()), "updated": str(now_ms())})
        self.histories[job_id].append({"ts": now_ms(), "state": "cancelled", "reason": reason})
        return "cancelled"

    async def all_site_ids(self) -> list[str]:
        return sorted(self.sites)

    async def load_sites(self, ids: Sequence[str]) -> list[SiteRecord]:
        return [self.sites.get(i) or SiteRecord(id=i, hub="", cluster="", status="unknown", seen_ms=0,
                                                meta_version=0, meta=None, capacity={}) for i in ids]  # fmt: skip

    async def status_history(self, site: str) -> list[dict[str, Any]]:
        return list(self.site_statuses.get(site, []))

    async def reliability(self, site: str) -> Reliability:
        record = self.sites.get(site)
        return (record.reliability if record else None) or Reliability()

    async def reset_reliability(self, site: str, who: str = "operator") -> bool | None:
        record = self.sites.get(site)
        if record is None:
            return None
        self.sites[site] = dataclasses.replace(record, reliability=Reliability())
        return record.reliability is not None and record.reliability != Reliability()

    async def queue_depths(self) -> dict[str, int]:
        queued = [j["priority"] for j in self.jobs.values() if j["state"] == "queued"]
        return {p: queued.count(p) for p in ("high", "normal", "low")}

    async def ping(self) -> bool:
        return self.reachable


class MemoryTokens:
    """API tokens by their text, for authentication and for the admin routes."""

    def __init__(self) -> None:
        self.by_token: dict[str, Identity] = {}

    def add(self, role: str, tenant: str) -> str:
        token = f"sw_{role}_{tenant}_{secrets.token_hex(4)}"
        self.by_token[token] = Identity(id=f"tok-{secrets.token_hex(6)}", role=role, tenant=tenant)
        return token

    async def lookup(self, token: str) -> Identity | None:
        return self.by_token.get(token)

    def cached(self, token: str) -> Identity | None:
        return self.by_token.get(token)

    async def create(self, role: str, tenant: str, name: str = "") -> tuple[str, Identity]:
        token = self.add(role, tenant)
        return token, self.by_token[token]

    async def revoke(self, token_or_id: str) -> Identity:
        for token, identity in list(self.by_token.items()):
            if token_or_id in (token, identity.id):
                return self.by_token.pop(token)
        raise NotFound(f"no token {token_or_id[:12]}")

    async def list(self) -> list[Identity]:
        return list(self.by_token.values())


class RecordingPublisher:
    """Keeps every assignments message the API asks to publish, by site."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []

    async def __call__(self, site: str, payload: bytes, /) -> None:
        self.sent.append((site, orjson.loads(payload)))


class MemoryFeed:
    """An event log of (id, encoded event) pairs, oldest first; nothing arrives live."""

    def __init__(self, events: Sequence[tuple[str, bytes]] = ()) -> None:
        self.events = list(events)

    async def wait_started(self, timeout: float) -> None:
        return None  # the log is all there from the start

    def valid(self, position: str) -> bool:
        try:
            id_after(position, "0-0")
        except ValueError:
            return False
        return "," not in position  # one log

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[Subscription]:
        yield Subscription(100)

    def resubscribe(self, subscription: Subscription) -> None:
        subscription.overflowed = False

    async def backlog(self, after: str) -> list[tuple[str, bytes]]:
        return [(i, data) for i, data in self.events if id_after(i, after)]


class MemoryQueries:
    """Usage records in a list; remembers whose usage was asked for."""

    def __init__(self, usage: Sequence[dict[str, Any]] = ()) -> None:
        self.usage = list(usage)
        self.asked_tenants: list[str | None] = []

    async def queue_sample(self, queued: int, recent_events: int) -> QueueSample:
        return QueueSample(depths={"high": 0, "normal": 0, "low": 0}, queued=[], awaiting_acceptance=0,
                           newest_events=[])  # fmt: skip

    async def job_events(self, job_id: str, since_ms: int) -> JobEvents:
        return JobEvents([], True)

    async def usage_records(self, start_ms: int | None, end_ms: int | None, tenant: str | None
                            ) -> list[dict[str, Any]]:  # fmt: skip
        self.asked_tenants.append(tenant)
        return [r for r in self.usage if tenant is None or r["tenant"] == tenant]


class MemoryRegistry:
    """Registered sites by id."""

    def __init__(self) -> None:
        self.entries: dict[str, RegisteredSite] = {}

    async def register(self, site: str, hub: str, cluster: str | None, geo: Geography, rotate: bool = False
                       ) -> tuple[RegisteredSite, str]:  # fmt: skip
        if site in self.entries and not rotate:
            raise Conflict(f"site {site} is already registered")
        self.entries[site] = RegisteredSite(site, hub, cluster, "2026-01-01T00:00:00Z")
        return self.entries[site], secrets.token_urlsafe(8)

    async def sites(self) -> list[RegisteredSite]:
        return list(self.entries.values())

    async def revoke(self, site: str) -> None:
        if self.entries.pop(site, None) is None:
            raise NotFound(f"site {site} is not registered")
