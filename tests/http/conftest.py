"""The API app on in-memory doubles, served by aiohttp's test server: no Redis, no MQTT, no broker."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from broker.http.app import make_app
from broker.http.deps import Deps, Limits
from broker.metrics import Metrics
from broker.model.job import JobSpec
from regions import load_geography
from tests.http.doubles import (
    MemoryFeed,
    MemoryQueries,
    MemoryRegistry,
    MemoryStore,
    MemoryTokens,
    RecordingPublisher,
)
from tests.http.harness import Api, Start


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    """Builds and serves an app; keyword arguments replace fields of its `Deps` (`auth=False` turns tokens off),
    and `prepare` may change the app before it is served."""
    clients: list[TestClient[web.Request, web.Application]] = []

    async def started(auth: bool = True, prepare: Callable[[web.Application], object] | None = None,
                      **overrides: Any) -> Api:  # fmt: skip
        store, tokens, published = MemoryStore(), MemoryTokens(), RecordingPublisher()
        queries: MemoryQueries = overrides.pop("queries", MemoryQueries())
        mqtt: list[bool] = [True]
        quoted: list[JobSpec] = []

        async def quoter(job_id: str, spec: JobSpec) -> dict[str, Any]:
            quoted.append(spec)
            return {"job": job_id, "placeable": False}

        async def scrape() -> None:
            return None

        deps = Deps(store=store, feed=MemoryFeed(), geography=load_geography(), publish_assignments=published,
                    kick=asyncio.Event(), mqtt_up=lambda: mqtt[0], quoter=quoter, queries=queries,
                    token_admin=tokens, registry=MemoryRegistry(), metrics=Metrics(), scrape=scrape,
                    tokens=tokens if auth else None, limits=Limits())  # fmt: skip
        deps = dataclasses.replace(deps, **overrides)
        app = make_app(deps)
        if prepare is not None:
            prepare(app)
        client = TestClient(TestServer(app))
        await client.start_server()
        clients.append(client)
        return Api(client, store, tokens, published, deps.kick, queries, mqtt, quoted)

    yield started
    for client in clients:
        await client.close()


@pytest.fixture
async def api(start: Start) -> Api:
    """The app with tokens required."""
    return await start()
