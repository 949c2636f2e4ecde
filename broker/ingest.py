"""MQTT ingest: site messages validated and applied to Redis. A bad message is logged with the field
that is wrong and dropped; nothing a site sends can stop the loop.
"""

from __future__ import annotations

import asyncio
from collections import Counter

from broker import topics
from broker.lifecycle import PublishAssignments, reconcile_site, requeue_site
from broker.schemas import Capacity, SiteEvent, parse
from broker.store import Store
from regions import Geography
from suanwang import logs
from suanwang.errors import InvalidInput, SuanwangError

log = logs.get("suanwang.ingest")

_RELEASING = {"completed", "failed", "queued", "cancelled"}


class Ingest:
    def __init__(
        self, store: Store, publish_assignments: PublishAssignments, kick: asyncio.Event, geography: Geography
    ) -> None:
        self.store = store
        self.geography = geography
        self.publish_assignments = publish_assignments
        self.kick = kick
        self.received: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()

    async def handle(self, topic: str, payload: bytes) -> None:
        parsed = topics.site_of(topic)
        if parsed is None:
            self.dropped["topic"] += 1
            log.warning("mqtt.dropped", topic=topic, reason="not a site topic")
            return
        site, kind = parsed
        self.received[kind] += 1
        try:
            if kind == "capacity":
                await self._capacity(site, payload)
            elif kind == "status":
                await self._status(site, payload)
            elif kind == "events":
                await self._event(site, payload)
        except InvalidInput as exc:
            self.dropped[f"invalid_{kind}"] += 1
            log.warning("mqtt.dropped", site=site, kind=kind, field=exc.field, error=exc.message)
        except SuanwangError as exc:
            self.dropped[f"{exc.code}_{kind}"] += 1
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
        if await self.store.apply_capacity(capacity):
            self.kick.set()
        else:
            self.dropped["stale_seq"] += 1

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
            await requeue_site(self.store, self.publish_assignments, site, f"site {site} went offline")
        self.kick.set()

    async def _event(self, site: str, payload: bytes) -> None:
        event = parse(SiteEvent, payload)
        if event.site != site:
            raise InvalidInput(f"site {event.site!r} does not match the topic's {site!r}", "site")
        state = await self.store.transition(event.job, event.event.value, site, event.attempt, event.reason or "")
        if not state:
            self.dropped["stale_event"] += 1
            return
        log.info("job.event", job=event.job, site=site, kind=event.event.value, state=state)
        if state in _RELEASING:
            self.kick.set()
