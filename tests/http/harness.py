"""A running API app on doubles, and a client that sends one request as a token's holder."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from aiohttp.test_utils import TestClient
from multidict import CIMultiDictProxy

from broker.model.job import JobSpec
from tests.http.doubles import MemoryQueries, MemoryStore, MemoryTokens, RecordingPublisher


@dataclass
class Reply:
    status: int
    body: Any  # decoded JSON, or the raw bytes of any other media type
    headers: CIMultiDictProxy[str]


@dataclass
class Api:
    """A running app and the doubles behind it; `call` sends one request as the holder of `token`."""

    client: TestClient[web.Request, web.Application]
    store: MemoryStore
    tokens: MemoryTokens
    published: RecordingPublisher
    kick: asyncio.Event
    queries: MemoryQueries
    mqtt: list[bool] = field(default_factory=lambda: [True])
    quoted: list[JobSpec] = field(default_factory=list)

    async def call(self, method: str, path: str, token: str | None = None, body: Any = None,
                   headers: dict[str, str] | None = None, data: bytes | None = None) -> Reply:  # fmt: skip
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        if body is not None:
            data = orjson.dumps(body)
            sent.setdefault("Content-Type", "application/json")
        async with self.client.request(method, path, data=data, headers=sent) as response:
            raw = await response.read()
            decoded = orjson.loads(raw) if response.content_type == "application/json" else raw
            return Reply(response.status, decoded, response.headers)


Start = Callable[..., Awaitable[Api]]  # the `start` fixture: serve an app with some Deps replaced


def job_body(**extra: Any) -> dict[str, Any]:
    """A valid job of one GPU from Shanghai."""
    return {"name": "unit", "workload": "training", "resources": {"arch": "GPU", "count": 1}, "origin": "shanghai",
            "duration_hours": 1, **extra}  # fmt: skip
