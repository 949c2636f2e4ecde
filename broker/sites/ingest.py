"""MQTT ingest: site messages validated and applied to Redis. A bad message is logged with the field
that is wrong and dropped; nothing a site sends can stop the loop.
"""

from __future__ import annotations

import asyncio
from collections import Counter

from broker.metrics import Metrics
from broker.model.records import Applied
from broker.sites.assignments import PublishAssignments
from broker.sites.lifecycle import reconcile_site, requeue_site
from broker.state.registry import SITE_ID, SiteGate
from broker.state.store import Store
from common import logs, topics
from common.errors import InvalidInput, StoreUnavailable, SuanwangError
from common.protocol import Capacity, SiteEvent
from common.validation import parse
from regions import Geography

log = logs.get("suanwang.ingest")

_RELEASING = {"completed", "failed", "queued", "cancelled"}
_KINDS = {"capacity", "status", "events"}


class Ingest:
    def __init__(
        self,
        store: Store,
        publish_assignments: PublishAssignments,
        kick: asyncio.Event,
        geography: Geography,
        metrics: Metrics | None = None,
        *,
        gate: SiteGate | None = None,
        max_message_bytes: int = 256 * 1024,
    ) -> None:
        self.metrics = metrics or Metrics()
        self.gate = gate  # when set, only registered sites are heard
        self.max_message_bytes = max_message_bytes
        self.store = store
        self.geography = geography
        self.publish_assignments = publish_assignments
        self.kick = kick
        self.received: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()

    def _drop(self, reason: str) -> None:
        self.dropped[reason] += 1
        self.metrics.mqtt_dropped.labels(reason).inc()

    async def handle(self, topic: str, payload: bytes) -> None:
        parsed = topics.site_of(topic)
        if parsed is None:
            self._drop("topic")
            log.warning("mqtt.dropped", topic=topic, reason="not a site topic")
            return
        site, kind = parsed
        if kind not in _KINDS or not SITE_ID.match(site):  # unbounded names must not reach keys or metric labels
            self._drop("topic")
            log.warning("mqtt.dropped", topic=topic[:200], reason="not a site id or message kind")
            return
        if len(payload) > self.max_message_bytes:
            self._drop("too_large")
            log.warning("mqtt.dropped", site=site[:64], kind=kind[:16], reason="too large", bytes=len(payload),
                        limit=self.max_message_bytes)  # fmt: skip
            return
        if self.gate is not None and not await self.gate.allows(site):
            self._drop("unregistered")
            log.warning("mqtt.dropped", site=site[:64], kind=kind[:16], reason="site not registered")
            return
        self.received[kind] += 1
        self.metrics.mqtt_in.labels(kind).inc()
        backoff = 0.1
        # The message is already acknowledged to the MQTT broker, so while Redis is away it is retried here
        # rather than lost: every change it makes is checked by seq or (job, attempt), so a retry is safe.
        while True:
            try:
                await self._apply(site, kind, payload)
                return
            except StoreUnavailable as exc:
                self._drop(f"{exc.code}_{kind}_retried")
                log.warning("mqtt.apply_retry", site=site, kind=kind, error=str(exc), retry_in=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def _apply(self, site: str, kind: str, payload: bytes) -> None:
        try:
            if kind == "capacity":
                await self._capacity(site, payload)
            elif kind == "status":
                await self._status(site, payload)
            elif kind == "events":
                await self._event(site, payload)
        except InvalidInput as exc:
            self._drop(f"invalid_{kind}")
            log.warning("mqtt.dropped", site=site, kind=kind, field=exc.field, error=exc.message)
        except StoreUnavailable:
            raise
        except SuanwangError as exc:
            self._drop(f"{exc.code}_{kind}")
            log.error("mqtt.apply_failed", site=site, kind=kind, error=str(exc))

    async def _capacity(self, site: str, payload: bytes) -> None:
        capacity = parse(Capacity, payload)
        if capacity.site != site:
            raise InvalidInput(f"site {capacity.site!r} does not match the topic's {site!r}", "site")
        hub = self.geography.hubs.get(capacity.hub)
        if hub is None:
            raise InvalidInput(f"unknown hub {capacity.hub!r}; one of {', '.join(self.geography.hubs)}", "hub")
        if capacity.cluster is not None and capacity.cluster not in hub.clusters:
            raise InvalidInput(f"cluster {capacity.cluster!r} is not in hub {hub.id!r}", "cluster")
        applied = await self.store.apply_capacity(capacity)
        if applied is Applied.MOVED:
            self._drop("moved")
            log.warning("mqtt.dropped", site=site, reason="names another hub or cluster than the site's own",
                        hub=capacity.hub, cluster=capacity.cluster)  # fmt: skip
            return
        if applied is Applied.REVIVED:
            log.info("site.back", site=site)
            await reconcile_site(self.store, self.publish_assignments, site)
        if applied is not Applied.STALE:
            self.kick.set()
        else:
            self._drop("stale_seq")

    async def _status(self, site: str, payload: bytes) -> None:
        status = payload.decode("utf-8", "replace").strip().strip('"').lower()
        if status not in ("online", "offline"):
            raise InvalidInput(f"status must be 'online' or 'offline', got {status[:40]!r}", "status")
        changed = await self.store.set_site_status(site, status)
        if changed:
            log.info("site.status", site=site, status=status)
            if status == "online":
                await reconcile_site(self.store, self.publish_assignments, site)
        if status == "offline":
            back = await requeue_site(self.store, self.publish_assignments, site, f"site {site} went offline")
            if back:
                self.metrics.rejections.labels("site_offline").inc(back)
        self.kick.set()

    async def _event(self, site: str, payload: bytes) -> None:
        event = parse(SiteEvent, payload)
        if event.site != site:
            raise InvalidInput(f"site {event.site!r} does not match the topic's {site!r}", "site")
        state = await self.store.transition(event.job, event.event.value, site, event.attempt, event.reason or "")
        if not state:
            self._drop("stale_event")
            return
        log.info("job.event", job=event.job, site=site, kind=event.event.value, state=state)
        if event.event.value == "rejected":
            self.metrics.rejections.labels("site_rejected").inc()
        if state in _RELEASING:
            self.kick.set()
