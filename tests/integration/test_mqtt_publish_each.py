"""Many QoS 0 messages at once through the broker's MQTT link: all delivered, in order, on a real Mosquitto."""

from __future__ import annotations

import asyncio

import aiomqtt
import pytest

from broker.sites.link import MqttLink
from common.config import MqttTarget
from common.errors import MessagingUnavailable
from suanwang.servers import MosquittoServer
from tests.support import eventually


async def _connected(link: MqttLink, stop: asyncio.Event) -> asyncio.Task[None]:
    async def ignore(topic: str, payload: bytes) -> None:
        return None

    task = asyncio.create_task(link.run(stop, ignore))
    await asyncio.wait_for(link.connected.wait(), 10)
    return task


async def test_publish_each_delivers_every_message_in_order(mosquitto: MosquittoServer, namespace: str) -> None:
    topic = f"{namespace}/mirror"
    stop = asyncio.Event()
    link = MqttLink(MqttTarget("127.0.0.1", mosquitto.port), f"{namespace}-link", [])
    task = await _connected(link, stop)
    got: list[bytes] = []
    try:
        assert link.queues_directly, "the paho client inside aiomqtt is found: messages skip the per-message wait"
        async with aiomqtt.Client("127.0.0.1", mosquitto.port, identifier=f"{namespace}-sub") as sub:
            await sub.subscribe(topic, qos=0)

            async def collect() -> None:
                async for message in sub.messages:
                    got.append(bytes(message.payload))  # type: ignore[arg-type]

            reader = asyncio.create_task(collect())
            sent = [f"event-{i:05d}".encode() for i in range(3000)]
            for start in range(0, len(sent), 500):
                await link.publish_each(topic, sent[start : start + 500])

            async def all_in() -> bool | None:
                return len(got) >= len(sent) or None

            await eventually(all_in, "every message delivered")
            reader.cancel()
        assert got == sent
    finally:
        stop.set()
        task.cancel()  # the link runs until its task is cancelled, as the service stops it


async def test_publish_each_without_a_connection_says_so(mosquitto: MosquittoServer, namespace: str) -> None:
    link = MqttLink(MqttTarget("127.0.0.1", mosquitto.port), f"{namespace}-link", [])
    with pytest.raises(MessagingUnavailable):
        await link.publish_each(f"{namespace}/mirror", [b"a", b"b"])
