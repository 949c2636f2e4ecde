"""MQTT ingest: site messages validated and applied to Redis. A bad message is logged with the field
that is wrong and dropped; nothing a site sends can stop the loop.

The MQTT link hands each message to `offer`, which queues it (bounded: a full queue holds the link back,
and aiomqtt's buffer, then Mosquitto's, hold the rest); `run` applies what is queued. Capacity messages
queued together are validated one by one and the valid ones go to Redis in one pipelined round trip, in
the order they came, each through the same Lua script and seq check as on its own; any other message is
applied after the messages before it and before those after it. So Redis sees every message in arrival
order, and a burst of heartbeats costs one round trip instead of one each.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable

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

Pending = tuple[str, str, bytes, float]  # site, kind, payload, when it was offered (time.perf_counter())


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
        queue_size: int = 1024,
        batch: int = 256,
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
        self.batch = batch  # most capacity messages in one round trip
        # told, for every offered message once it is applied or dropped, the seconds since it was offered
        self.on_applied: Callable[[float], None] | None = None
        self._pending: asyncio.Queue[Pending] = asyncio.Queue(queue_size)
        self._received = {kind: self.metrics.mqtt_in.labels(kind) for kind in _KINDS}

    def _drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] += n
        self.metrics.mqtt_dropped.labels(reason).inc(n)

    def _done(self, offered: float) -> None:
        if self.on_applied is not None:
            self.on_applied(time.perf_counter() - offered)

    # ------------------------------------------------------------------ queued: what the MQTT link calls

    async def offer(self, topic: str, payload: bytes) -> None:
        """Queue a message for `run` to apply, unless it is not for us (dropped and counted here); waits only
        while the queue is full."""
        offered = time.perf_counter()
        admitted = await self._admit(topic, payload)
        if admitted is None:
            self._done(offered)
            return
        site, kind = admitted
        await self._pending.put((site, kind, payload, offered))

    async def settled(self) -> None:
        """Return once every message offered so far is applied or dropped."""
        await self._pending.join()

    async def run(self, stop: asyncio.Event) -> None:
        """Apply queued messages until `stop` is set (or the task is cancelled), taking all that are queued."""
        while not stop.is_set():
            items = [await self._pending.get()]
            while len(items) < self.batch and not self._pending.empty():
                items.append(self._pending.get_nowait())
            try:
                await self._apply_queued(items)
            except Exception:  # a bug must not stop the ingest loop
                log.exception("mqtt.batch_failed", messages=len(items))
            finally:
                for _ in items:
                    self._pending.task_done()

    async def _apply_queued(self, items: list[Pending]) -> None:
        """Apply messages in their order: each run of capacity messages in one round trip."""
        run: list[tuple[Capacity, float]] = []
        for site, kind, payload, offered in items:
            if kind == "capacity":
                try:
                    run.append((self._valid_capacity(site, payload), offered))
                except InvalidInput as exc:
                    self._invalid(site, kind, exc)
                    self._done(offered)
                except Exception:  # a bug in one message's handling must not lose the others
                    log.exception("mqtt.handler_failed", site=site, kind=kind)
                    self._done(offered)
                continue
            await self._apply_capacities(run)
            run = []
            try:
                await self._until_applied(lambda: self._apply(site, kind, payload), site, kind)  # noqa: B023
            except Exception:  # a bug in one message's handling must not lose the others
                log.exception("mqtt.handler_failed", site=site, kind=kind)
            self._done(offered)
        await self._apply_capacities(run)

    async def _apply_capacities(self, run: list[tuple[Capacity, float]]) -> None:
        """Apply valid capacity messages in one pipelined round trip. Those Redis did not apply (all of them
        when it is away) are tried again, in order, before anything later: the same retry as `handle`'s."""
        backoff = 0.1
        while run:
            try:
                results: list[Applied | StoreUnavailable] = await self.store.apply_capacities([c for c, _ in run])
            except StoreUnavailable as exc:
                results = [exc] * len(run)
            retry: list[tuple[Capacity, float]] = []
            for (capacity, offered), result in zip(run, results, strict=True):
                if isinstance(result, StoreUnavailable):
                    retry.append((capacity, offered))
                    continue
                if result is Applied.APPLIED:  # the common case, with nothing to follow
                    self.kick.set()
                else:
                    await self._followed(capacity, result)
                self._done(offered)
            if retry:
                error = next(r for r in results if isinstance(r, StoreUnavailable))
                self._drop(f"{error.code}_capacity_retried", len(retry))
                log.warning("mqtt.apply_retry", kind="capacity", messages=len(retry), error=str(error),
                            retry_in=backoff)  # fmt: skip
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            run = retry

    async def _followed(self, capacity: Capacity, applied: Applied) -> None:
        """`_capacity_applied` for a message of a batch, retried while Redis is away, its errors logged."""
        site = capacity.site
        try:
            await self._until_applied(lambda: self._capacity_applied(capacity, applied), site, "capacity")
        except SuanwangError as exc:
            self._drop(f"{exc.code}_capacity")
            log.error("mqtt.apply_failed", site=site, kind="capacity", error=str(exc))
        except Exception:  # a bug in one message's handling must not lose the others
            log.exception("mqtt.handler_failed", site=site, kind="capacity")

    # ------------------------------------------------------------------ one message at a time

    async def handle(self, topic: str, payload: bytes) -> None:
        """Apply one message now, returning once its effect is in Redis (or it is dropped)."""
        admitted = await self._admit(topic, payload)
        if admitted is not None:
            site, kind = admitted
            await self._until_applied(lambda: self._apply(site, kind, payload), site, kind)

    async def _admit(self, topic: str, payload: bytes) -> tuple[str, str] | None:
        """The message's (site, kind), counted as received; None, counted as dropped, when it is not for us."""
        parsed = topics.site_of(topic)
        if parsed is None:
            self._drop("topic")
            log.warning("mqtt.dropped", topic=topic, reason="not a site topic")
            return None
        site, kind = parsed
        if kind not in _KINDS or not SITE_ID.match(site):  # unbounded names must not reach keys or metric labels
            self._drop("topic")
            log.warning("mqtt.dropped", topic=topic[:200], reason="not a site id or message kind")
            return None
        if len(payload) > self.max_message_bytes:
            self._drop("too_large")
            log.warning("mqtt.dropped", site=site[:64], kind=kind[:16], reason="too large", bytes=len(payload),
                        limit=self.max_message_bytes)  # fmt: skip
            return None
        if self.gate is not None and not await self.gate.allows(site):
            self._drop("unregistered")
            log.warning("mqtt.dropped", site=site[:64], kind=kind[:16], reason="site not registered")
            return None
        self.received[kind] += 1
        self._received[kind].inc()
        return site, kind

    async def _until_applied(self, step: Callable[[], Awaitable[None]], site: str, kind: str) -> None:
        backoff = 0.1
        # The message is already acknowledged to the MQTT broker, so while Redis is away it is retried here
        # rather than lost: every change it makes is checked by seq or (job, attempt), so a retry is safe.
        while True:
            try:
                await step()
                return
            except StoreUnavailable as exc:
                self._drop(f"{exc.code}_{kind}_retried")
                log.warning("mqtt.apply_retry", site=site, kind=kind, error=str(exc), retry_in=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    def _invalid(self, site: str, kind: str, exc: InvalidInput) -> None:
        self._drop(f"invalid_{kind}")
        log.warning("mqtt.dropped", site=site, kind=kind, field=exc.field, error=exc.message)

    async def _apply(self, site: str, kind: str, payload: bytes) -> None:
        try:
            if kind == "capacity":
                await self._capacity(site, payload)
            elif kind == "status":
                await self._status(site, payload)
            elif kind == "events":
                await self._event(site, payload)
        except InvalidInput as exc:
            self._invalid(site, kind, exc)
        except StoreUnavailable:
            raise
        except SuanwangError as exc:
            self._drop(f"{exc.code}_{kind}")
            log.error("mqtt.apply_failed", site=site, kind=kind, error=str(exc))

    async def _capacity(self, site: str, payload: bytes) -> None:
        capacity = self._valid_capacity(site, payload)
        await self._capacity_applied(capacity, await self.store.apply_capacity(capacity))

    def _valid_capacity(self, site: str, payload: bytes) -> Capacity:
        capacity = parse(Capacity, payload)
        if capacity.site != site:
            raise InvalidInput(f"site {capacity.site!r} does not match the topic's {site!r}", "site")
        hub = self.geography.hubs.get(capacity.hub)
        if hub is None:
            raise InvalidInput(f"unknown hub {capacity.hub!r}; one of {', '.join(self.geography.hubs)}", "hub")
        if capacity.cluster is not None and capacity.cluster not in hub.clusters:
            raise InvalidInput(f"cluster {capacity.cluster!r} is not in hub {hub.id!r}", "cluster")
        return capacity

    async def _capacity_applied(self, capacity: Capacity, applied: Applied) -> None:
        """What follows a capacity message Redis has recorded: a site that came back is reconciled."""
        site = capacity.site
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
