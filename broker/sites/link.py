"""The broker's MQTT connection: the documented aiomqtt reconnect loop, with subscriptions restored
after every reconnect (Mosquitto 2.0.11 does not restore `$share` subscriptions of a session), and
aiomqtt errors translated into `MessagingUnavailable` for callers that publish.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

import aiomqtt
import paho.mqtt.client as mqtt

from common import logs, topics
from common.config import MqttTarget
from common.errors import MessagingUnavailable

log = logs.get("suanwang.mqtt")

OnMessage = Callable[[str, bytes], Awaitable[None]]


class MqttLink:
    def __init__(
        self,
        target: MqttTarget,
        identifier: str,
        subscriptions: Sequence[tuple[str, int]],
        *,
        keepalive: int = 30,
    ) -> None:
        self.target = target
        self.identifier = identifier
        self.subscriptions = list(subscriptions)
        self.keepalive = keepalive
        self.connected = asyncio.Event()
        self._client: aiomqtt.Client | None = None

    async def run(self, stop: asyncio.Event, on_message: OnMessage) -> None:
        """Stay connected until `stop` is set, handing every message received to `on_message`."""
        backoff = 0.2
        while not stop.is_set():
            try:
                async with aiomqtt.Client(
                    self.target.host, self.target.port, username=self.target.username,
                    password=self.target.password, identifier=self.identifier, clean_session=True,
                    keepalive=self.keepalive, max_queued_incoming_messages=100_000, max_inflight_messages=1000,
                    tls_params=self.target.tls_params(),
                ) as client:  # fmt: skip
                    # aiomqtt warns, through the logging module, on every publish made while more than this
                    # many are unanswered; a busy pass has hundreds in flight by design (up to the 1,000
                    # the session allows), so the warning would be one log line per assignment
                    client.pending_calls_threshold = 1000
                    self._client = client
                    for topic_filter, qos in self.subscriptions:
                        await client.subscribe(topic_filter, qos=qos)
                    self.connected.set()
                    backoff = 0.2
                    log.info("mqtt.connected", host=self.target.host, port=self.target.port)
                    async for message in client.messages:
                        payload = message.payload
                        if not isinstance(payload, bytes | bytearray):
                            payload = str(payload or "").encode()
                        try:
                            await on_message(str(message.topic), bytes(payload))
                        except Exception:  # a bug in one handler must not stop the ingest loop
                            log.exception("mqtt.handler_failed", topic=str(message.topic))
            except aiomqtt.MqttError as exc:
                log.warning("mqtt.disconnected", error=str(exc), retry_in=backoff)
            finally:
                self.connected.clear()
                self._client = None
            if not stop.is_set():
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)

    async def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        client = self._client
        if client is None or not self.connected.is_set():
            raise MessagingUnavailable("not connected to the MQTT broker")
        try:
            await client.publish(topic, payload, qos=qos, retain=retain, timeout=10)
        except aiomqtt.MqttError as exc:
            raise MessagingUnavailable(f"MQTT publish failed: {exc}") from None

    async def publish_assignments(self, site: str, payload: bytes) -> None:
        """An `assignments` message to one site (QoS 1: the publish waits for the MQTT broker's PUBACK)."""
        await self.publish(topics.assignments(site), payload, qos=1)

    async def publish_allocation(self, payload: bytes) -> None:
        """One event of the log to the operators' mirror topic (QoS 0: the log in Redis is the record)."""
        await self.publish(topics.ALLOCATIONS, payload, qos=0)

    async def publish_allocations(self, payload: bytes) -> None:
        """Events of the log, a JSON array in order, to the batch mirror topic (QoS 0)."""
        await self.publish(topics.ALLOCATIONS_BATCH, payload, qos=0)

    @property
    def queues_directly(self) -> bool:
        """Whether QoS 0 messages go straight into the MQTT client's outgoing queue (see `publish_each`)."""
        return self._client is not None and isinstance(getattr(self._client, "_client", None), mqtt.Client)

    async def publish_each(self, topic: str, payloads: Sequence[bytes]) -> None:
        """Many QoS 0 messages to one topic, in order, for about the cost of one.

        aiomqtt's `publish` waits for each message to be written (an event and a timeout task per message):
        a third of the broker's time when the mirror sent one event a message. Here every message but the
        last goes into the paho client's outgoing queue, which aiomqtt writes out as the socket allows, and
        only the last is awaited; when it is written, so is every message before it. Without a paho client
        inside (another aiomqtt), each message is awaited as before."""
        if not payloads:
            return
        client = self._client
        if client is None or not self.connected.is_set():
            raise MessagingUnavailable("not connected to the MQTT broker")
        inner = getattr(client, "_client", None)
        try:
            for payload in payloads[:-1]:
                if isinstance(inner, mqtt.Client):
                    info = inner.publish(topic, payload, 0)
                    if info.rc != mqtt.MQTT_ERR_SUCCESS:
                        raise MessagingUnavailable(f"MQTT publish failed: {mqtt.error_string(info.rc)}")
                else:
                    await client.publish(topic, payload, qos=0, timeout=10)
            await client.publish(topic, payloads[-1], qos=0, timeout=10)
        except aiomqtt.MqttError as exc:
            raise MessagingUnavailable(f"MQTT publish failed: {exc}") from None

    async def publish_allocation_events(self, payloads: Sequence[bytes]) -> None:
        """Events of the log, one message each, in order, to the operators' mirror topic (QoS 0)."""
        await self.publish_each(topics.ALLOCATIONS, payloads)
