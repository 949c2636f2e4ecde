"""What the HTTP API works with, passed in once: the state it reads and changes, the broker's callables,
and the limits it applies. Each collaborator is described by the little the API needs of it, so the API
can run against any implementation of that."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web

from broker.metrics import Metrics
from broker.model.identity import Identity
from broker.model.job import JobSpec
from broker.model.records import Commit, SiteRecord
from broker.model.reliability import Reliability
from broker.sites.assignments import PublishAssignments
from broker.state.events import Subscription
from broker.state.holds import Hold, HoldOption, TakenHold
from broker.state.jobs import Submission, SubmitRate
from broker.state.queries import JobEvents, QueueSample
from broker.state.registry import RegisteredSite
from common.errors import SuanwangError
from regions import Geography

__all__ = ["DEPS", "Deps", "EventSource", "HoldDesk", "Limits", "MqttUp", "PublishAssignments", "Quoter", "RateBuckets",
           "ReadQueries", "Scrape", "SiteBook", "StateStore", "TokenAdmin", "TokenLookup"]  # fmt: skip


class StateStore(Protocol):
    """Jobs and sites in the state store, as far as the API reads and changes them."""

    def id_for(self, base: str, tenant: str) -> str:
        """A new job's or hold's id for a tenant, from a unique `base` (it names the tenant's job shard)."""

    async def submit(self, job_id: str, spec: JobSpec, *, idempotency_key: str | None, body_hash: str,
                     rate_limit: SubmitRate | None, max_queued: int | None
                     ) -> tuple[dict[str, str], bool]:  # fmt: skip
        """Store and queue a job; (the job, True), or (the job an idempotency key made before, False)."""

    async def submit_many(
        self, items: Sequence[Submission], *, rate_limit: SubmitRate | None = None, max_queued: int | None = None
    ) -> list[tuple[dict[str, str], bool] | SuanwangError]:
        """Store and queue each job on its own, in one round trip; per job its outcome or its error."""

    async def get_job(self, job_id: str) -> dict[str, str] | None: ...

    async def list_jobs(self, tenant: str, limit: int, state: str | None = None) -> list[dict[str, str]]: ...

    async def history(self, job_id: str) -> list[dict[str, Any]]: ...

    async def transition(self, job_id: str, action: str, site: str = "", attempt: int | str = "",
                         reason: str = "") -> str:  # fmt: skip
        """Apply one lifecycle action; the new state, or '' when it did not apply."""

    async def all_site_ids(self) -> list[str]: ...

    async def load_sites(self, ids: Sequence[str]) -> list[SiteRecord]: ...

    async def status_history(self, site: str) -> list[dict[str, Any]]: ...

    async def reliability(self, site: str) -> Reliability:
        """The site's reliability record, decayed to now."""

    async def reset_reliability(self, site: str, who: str = "operator") -> bool | None:
        """Forget the site's reliability record: whether it had one; None for an unknown site."""

    async def queue_depths(self) -> dict[str, int]: ...

    async def ping(self) -> bool: ...


class EventSource(Protocol):
    """The event log: its entries after an id, and the live feed of new ones."""

    async def wait_started(self, timeout: float) -> None: ...

    def valid(self, position: str) -> bool:
        """Whether `position` (an event's id) is one the log can resume after."""

    def subscribe(self) -> AbstractAsyncContextManager[Subscription]: ...

    def resubscribe(self, subscription: Subscription) -> None: ...

    async def backlog(self, after: str) -> list[tuple[str, bytes]]: ...


class ReadQueries(Protocol):
    """Reads across the network for operators (broker.state.queries)."""

    async def queue_sample(self, queued: int, recent_events: int) -> QueueSample: ...

    async def job_events(self, job_id: str, since_ms: int) -> JobEvents: ...

    async def usage_records(self, start_ms: int | None, end_ms: int | None, tenant: str | None
                            ) -> list[dict[str, Any]]: ...  # fmt: skip


class TokenLookup(Protocol):
    """Who an API token stands for (None: no such token)."""

    async def lookup(self, token: str) -> Identity | None: ...

    def cached(self, token: str) -> Identity | None:
        """Who `token` stands for if it was just found valid, from memory only (no I/O)."""


class TokenAdmin(Protocol):
    """Making, listing and revoking API tokens."""

    async def create(self, role: str, tenant: str, name: str = "") -> tuple[str, Identity]: ...

    async def revoke(self, token_or_id: str) -> Identity: ...

    async def list(self) -> list[Identity]: ...


class SiteBook(Protocol):
    """The registry of sites allowed to speak, with their MQTT credentials."""

    async def register(self, site: str, hub: str, cluster: str | None, geo: Geography, rotate: bool = False
                       ) -> tuple[RegisteredSite, str]: ...  # fmt: skip

    async def sites(self) -> list[RegisteredSite]: ...

    async def revoke(self, site: str) -> None: ...


class HoldDesk(Protocol):
    """Holds: take, end, read, and a job submitted with one (broker.state.holds)."""

    async def take_hold(self, hold_id: str, tenant: str, options: Sequence[HoldOption], ttl_ms: int, resources: str,
                        *, max_holds: int | None = None, for_job: str = "", now_ms: int | None = None
                        ) -> TakenHold: ...  # fmt: skip

    async def release_hold(self, hold_id: str, tenant: str = "", reason: str = "released") -> bool: ...

    async def get_hold(self, hold_id: str) -> Hold | None: ...

    async def clock_ms(self) -> int:
        """The state store's clock, the one a hold's expiry is set by."""
        ...

    async def list_holds(self, tenant: str | None = None, limit: int = 100) -> list[Hold]: ...

    async def submit_held(self, job_id: str, spec: JobSpec, accept_timeout_ms: int, *,
                          idempotency_key: str | None = None, rate_limit: SubmitRate | None = None,
                          max_queued: int | None = None
                          ) -> tuple[dict[str, str], bool, Commit | None] | SuanwangError: ...  # fmt: skip


class Quoter(Protocol):
    """Where a job would go now and what would make it fit better; takes no capacity."""

    async def __call__(self, job_id: str, spec: JobSpec, /) -> dict[str, Any]: ...


class RateBuckets(Protocol):
    """Token buckets shared by every replica (broker.state.buckets), timed by one clock."""

    async def take(self, scope: str, subject: str, rate: float, burst: int) -> int:
        """Take one token from `subject`'s bucket in `scope`: 0 when taken, else milliseconds until one is there."""


class Scrape(Protocol):
    """Refreshes what the metrics' gauges read (the replica's snapshot) before a scrape."""

    async def __call__(self) -> None: ...


class MqttUp(Protocol):
    """Whether the replica is connected to the MQTT broker now."""

    def __call__(self) -> bool: ...


@dataclass(frozen=True)
class Limits:
    """Submissions per token (a bucket of `submit_burst` refilled at `submit_rate`/s), queued jobs per
    tenant, quotes per token (a bucket of `quote_burst` refilled at `quote_rate`/s) and failed
    authentications per client address and minute."""

    submit_rate: float = 20.0
    submit_burst: int = 100
    max_queued_per_tenant: int | None = None
    quote_rate: float = 2.0
    quote_burst: int = 10
    auth_failures_per_minute: int = 30
    hold_ttl_s: float = 60.0  # a hold's life unless the quote asks for another, at most `hold_max_ttl_s`
    hold_max_ttl_s: float = 600.0
    max_holds_per_tenant: int = 20
    accept_timeout_s: float = 30.0  # how long a site has to accept a job placed from a hold


@dataclass(frozen=True)
class Deps:
    """Everything the API's handlers use. With `tokens` every route but the public ones needs a bearer
    token; without, every caller acts as an admin (authentication off)."""

    store: StateStore
    feed: EventSource
    geography: Geography
    publish_assignments: PublishAssignments
    kick: asyncio.Event  # set when there is new work for the matcher
    mqtt_up: MqttUp
    quoter: Quoter
    queries: ReadQueries
    token_admin: TokenAdmin
    registry: SiteBook
    metrics: Metrics
    scrape: Scrape
    holds: HoldDesk | None = None  # without, quotes cannot hold and jobs cannot be submitted with a hold
    tokens: TokenLookup | None = None
    buckets: RateBuckets | None = None  # without, quotes are not rate limited
    limits: Limits = field(default_factory=Limits)
    max_body_bytes: int = 64 * 1024


DEPS: web.AppKey[Deps] = web.AppKey("suanwang.deps", Deps)
