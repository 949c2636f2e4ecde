"""One site's MQTT link: what every adapter (simulated or real inventory) needs to talk to the broker.

Each site gets its own MQTT connection because the Last Will (`status` -> `offline`) belongs to a
connection: if several sites shared one, a crash could only announce them all gone together, and a
graceful stop of one could not be told apart from the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import aiomqtt
import orjson

from common import logs, topics
from common.config import MqttTarget
from common.errors import InvalidInput
from common.protocol import CAPACITY_SCHEMA, EVENT_SCHEMA, Assignments, Capacity, Energy, Pool, SiteEvent, SiteEventKind
from common.validation import parse

log = logs.get("adapters.site")

AssignmentHandler = Callable[[Assignments], Awaitable[None] | None]


REPEATS = 4  # times a final event is sent again (1, 3, 9 and 27 heartbeat intervals after it)
FINAL = frozenset({SiteEventKind.COMPLETED, SiteEventKind.FAILED, SiteEventKind.REJECTED, SiteEventKind.LOST})


class SiteLink:
    """Keeps one site connected: status, capacity heartbeats, assignments in, events out.

    `run()` loops until `stop()` (or cancellation), reconnecting with capped exponential backoff.
    Events go through an outbox that outlives connections, so an event emitted while the broker is
    unreachable is delivered, in order, after the reconnect instead of being lost.
    The assignment handler runs on the receive loop: it must return quickly (start a task for
    long work), or it delays the next assignment.
    """

    def __init__(
        self,
        mqtt: MqttTarget,
        site: str,
        hub: str,
        pools: Iterable[Pool | Mapping[str, Any]],
        *,
        cluster: str | None = None,
        energy: Energy | Mapping[str, float] | None = None,
        bandwidth_gbps: Mapping[str, float] | None = None,
        on_assignments: AssignmentHandler | None = None,
        interval: float = 5.0,
        keepalive: int = 15,
        min_backoff: float = 0.5,
        max_backoff: float = 10.0,
    ) -> None:
        self.mqtt = mqtt
        self.site = site
        self.hub = hub
        self.cluster = cluster
        self.on_assignments = on_assignments
        self.interval = interval
        self.keepalive = keepalive
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self._pools: tuple[Pool, ...] = ()
        self._energy = Energy()
        self._bandwidth: dict[str, float] = dict(bandwidth_gbps or {})
        self._last_seq = 0
        self.boot = secrets.token_hex(8)  # a new one per process: the broker restarts its seq order with it
        self._changed = asyncio.Event()
        self._stop = asyncio.Event()
        self._outbox: deque[bytes] = deque()
        # recent outcomes, repeated on heartbeats: (when it was first sent, how often repeated, the message)
        self._finals: dict[tuple[str, int], tuple[float, int, bytes]] = {}
        self._outbox_ready = asyncio.Event()
        self.connected = asyncio.Event()
        self.set_capacity(pools, energy)

    # ------------------------------------------------------------------ what adapters call

    @property
    def pools(self) -> tuple[Pool, ...]:
        return self._pools

    def set_capacity(
        self, pools: Iterable[Pool | Mapping[str, Any]], energy: Energy | Mapping[str, float] | None = None
    ) -> None:
        """Replace the reported pools (and energy); published at once if connected, else on connect."""
        validated = tuple(p if isinstance(p, Pool) else Pool.model_validate(dict(p)) for p in pools)
        if energy is not None:
            self._energy = energy if isinstance(energy, Energy) else Energy.model_validate(dict(energy))
        # Validate the whole message now so a bad inventory fails here, not in the heartbeat loop.
        self._capacity_message(validated, seq=0)
        self._pools = validated
        self._changed.set()

    def set_bandwidth(self, gbps: Mapping[str, float]) -> None:
        """The sustained rates measured into the site, per hub or cluster id (they win over the broker's seeded
        matrix); published with the next capacity message, at once if connected."""
        previous, self._bandwidth = self._bandwidth, dict(gbps)
        try:
            self._capacity_message(self._pools, seq=0)
        except ValueError:
            self._bandwidth = previous
            raise
        self._changed.set()

    def undelivered(self) -> list[bytes]:
        """Job events queued and not yet delivered, oldest first."""
        return list(self._outbox)

    def emit(self, job: str, attempt: int, event: SiteEventKind | str, reason: str | None = None) -> None:
        """Queue a job event for delivery (QoS 1, in emission order, kept across reconnects)."""
        message = SiteEvent(
            schema=EVENT_SCHEMA,  # type: ignore[arg-type]  # the constant is that Literal
            site=self.site,
            job=job,
            attempt=attempt,
            event=SiteEventKind(event),
            reason=reason,
            ts=time.time(),
        )
        payload = orjson.dumps(message.model_dump(mode="json", by_alias=True))
        self._outbox.append(payload)
        self._outbox_ready.set()
        if message.event in FINAL:
            self._finals[(job, attempt)] = (time.monotonic(), 0, payload)
        log.debug("event queued", site=self.site, job=job, attempt=attempt, kind=str(event))

    def _repeat_finals(self) -> None:
        """Queue again the final events due for a repeat: each is repeated REPEATS times, 1, 3, 9 and 27
        heartbeat intervals after it was first sent, then forgotten.

        An MQTT broker that restarts (or a broker replica killed at the wrong moment) can lose an event the
        site already had acknowledged; repeating the outcome closes that gap, and the broker ignores what it
        has already applied (events name the job's attempt). Backing off keeps the repeats a small share of
        the traffic (at most REPEATS per outcome) however busy the site is.
        """
        now = time.monotonic()
        for key, (at, repeated, payload) in list(self._finals.items()):
            if repeated >= REPEATS:
                del self._finals[key]
            elif now - at >= self.interval * 3**repeated:
                self._finals[key] = (at, repeated + 1, payload)
                self._outbox.append(payload)
        if self._outbox:
            self._outbox_ready.set()

    def stop(self) -> None:
        """Ask `run()` to announce `offline` and disconnect."""
        self._stop.set()

    @property
    def pending_events(self) -> int:
        return len(self._outbox)

    # ------------------------------------------------------------------ connection loop

    def _next_seq(self) -> int:
        # Wall-clock milliseconds keep seq growing across adapter restarts; +1 keeps it strictly
        # increasing within a process even when the clock stalls or steps back.
        self._last_seq = max(self._last_seq + 1, time.time_ns() // 1_000_000)
        return self._last_seq

    def _capacity_message(self, pools: tuple[Pool, ...], seq: int) -> Capacity:
        return Capacity(
            schema=CAPACITY_SCHEMA,  # type: ignore[arg-type]  # the constant is that Literal
            site=self.site,
            hub=self.hub,
            cluster=self.cluster,
            seq=seq,
            pools=pools,
            energy=self._energy,
            bandwidth_gbps=self._bandwidth,
            ts=time.time(),
            boot=self.boot,
        )

    def _client(self) -> aiomqtt.Client:
        return aiomqtt.Client(
            self.mqtt.host,
            self.mqtt.port,
            username=self.mqtt.username,
            password=self.mqtt.password,
            identifier=f"site-{self.site}",
            will=aiomqtt.Will(topics.status(self.site), b"offline", qos=1, retain=True),
            keepalive=self.keepalive,
            tls_params=self.mqtt.tls_params(),
        )

    async def run(self) -> None:
        """Stay connected until `stop()`; the reconnect loop follows aiomqtt's documented pattern."""
        backoff = self.min_backoff
        while not self._stop.is_set():
            try:
                async with self._client() as client:
                    backoff = self.min_backoff
                    await self._session(client)
            except aiomqtt.MqttError as exc:
                log.warning("mqtt connection lost", site=self.site, error=str(exc), retry_s=backoff)
            finally:
                self.connected.clear()
            if self._stop.is_set():
                break
            # Wake early on stop so a stopping adapter does not sit out a 10 s backoff.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(backoff):
                    await self._stop.wait()
            backoff = min(backoff * 2, self.max_backoff)

    async def _session(self, client: aiomqtt.Client) -> None:
        # Subscribe before announcing `online`: the broker may assign work the moment it sees us.
        await client.subscribe(topics.assignments(self.site), qos=1)
        await client.publish(topics.status(self.site), b"online", qos=1, retain=True)
        self._changed.set()  # (re)announce capacity first thing in every session
        self.connected.set()
        log.info("site online", site=self.site, hub=self.hub)
        workers = [
            asyncio.create_task(self._receive(client)),
            asyncio.create_task(self._heartbeat(client)),
            asyncio.create_task(self._drain(client)),
        ]
        stopper = asyncio.create_task(self._stop.wait())
        try:
            done, _ = await asyncio.wait([*workers, stopper], return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            await self._cancel(workers, stopper)
            # Best effort: a cancelled adapter should still not leave a stale retained `online`.
            with contextlib.suppress(Exception, asyncio.CancelledError):
                async with asyncio.timeout(1.0):
                    await client.publish(topics.status(self.site), b"offline", qos=1, retain=True)
            raise
        await self._cancel(workers, stopper)
        if stopper not in done:
            # A worker only ends on a broken connection; treat any other ending the same way.
            error = next((t.exception() for t in done if t.exception() is not None), None)
            raise error or aiomqtt.MqttError("site worker ended unexpectedly")
        # Graceful stop: deliver what is already queued (briefly), then say `offline` explicitly,
        # since a clean DISCONNECT does not fire the Last Will.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                while self._outbox:
                    await client.publish(topics.events(self.site), self._outbox[0], qos=1)
                    self._outbox.popleft()
        await client.publish(topics.status(self.site), b"offline", qos=1, retain=True)
        log.info("site offline", site=self.site)

    @staticmethod
    async def _cancel(*tasks: asyncio.Task[Any] | list[asyncio.Task[Any]]) -> None:
        pending = {t for item in tasks for t in (item if isinstance(item, list) else [item])}
        # Cancel again until done: on Python 3.11, asyncio.wait_for (inside aiomqtt's publish) can
        # swallow a cancellation that races with the PUBACK, leaving the task running.
        while pending:
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=0.05)

    async def _heartbeat(self, client: aiomqtt.Client) -> None:
        while True:
            # A capacity change publishes at once; otherwise the same capacity goes out every
            # `interval` as proof of life (the broker drops sites that stay silent).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self._changed.wait()
            self._changed.clear()
            message = self._capacity_message(self._pools, self._next_seq())
            payload = orjson.dumps(message.model_dump(mode="json", by_alias=True))
            await client.publish(topics.capacity(self.site), payload, qos=1, retain=True)
            self._repeat_finals()

    async def _drain(self, client: aiomqtt.Client) -> None:
        while True:
            await self._outbox_ready.wait()
            while self._outbox:
                # Pop only after the PUBACK: an event whose publish fails stays first in line.
                await client.publish(topics.events(self.site), self._outbox[0], qos=1)
                self._outbox.popleft()
            self._outbox_ready.clear()

    async def _receive(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload
            if not isinstance(payload, bytes | str):
                payload = b"" if payload is None else str(payload).encode()
            try:
                batch = parse(Assignments, payload)
            except InvalidInput as exc:
                log.warning("malformed assignments dropped", site=self.site, error=exc.message, field=exc.field)
                continue
            if batch.site != self.site:
                log.warning("assignments for another site dropped", site=self.site, addressed_to=batch.site)
                continue
            if self.on_assignments is None:
                continue
            try:
                result = self.on_assignments(batch)
                if inspect.isawaitable(result):
                    await result
            except Exception:  # an adapter bug must not take the site offline
                log.exception("assignment handler failed", site=self.site)
