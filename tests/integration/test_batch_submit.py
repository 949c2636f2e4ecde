"""`POST /v1/jobs:batch`: many jobs in one request and one Redis round trip, each validated, rate limited,
accepted or refused on its own, idempotent per job; against a real broker."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import redis.asyncio as aioredis

from broker.model.job import JobSpec
from broker.state.keys import Keys
from broker.state.store import Store, Submission, SubmitRate
from common.errors import TooManyRequests
from suanwang.servers import MosquittoServer, RedisServer
from tests.support import running_broker

JSON = {"Content-Type": "application/json"}


def job(i: int, **extra: Any) -> dict[str, Any]:
    return {"name": f"batch-{i}", "resources": {"arch": "GPU", "models": ["A100-80G"], "count": 1},
            "origin": "shanghai", "duration_hours": 1, **extra}  # fmt: skip


async def post(http: aiohttp.ClientSession, body: Any, **headers: str) -> tuple[int, Any]:
    async with http.post("/v1/jobs:batch", data=orjson.dumps(body), headers={**JSON, **headers}) as response:
        return response.status, await response.json()


async def test_a_batch_is_accepted_job_by_job_and_a_retry_returns_the_same_jobs(
    redis_server: RedisServer, mosquitto: MosquittoServer, namespace: str
) -> None:
    async with (
        running_broker(redis_server, mosquitto, namespace, submit_burst=1000) as broker,
        aiohttp.ClientSession(base_url=broker.url) as http,
    ):
        bad = job(1)
        bad["resources"]["count"] = 0
        body = {"jobs": [job(0), bad, job(2, origin="atlantis"), *[job(i) for i in range(3, 300)]]}
        status, answer = await post(http, body, **{"Idempotency-Key": "nightly-7"})
        assert status == 200
        results = answer["jobs"]
        assert len(results) == 300
        assert results[1]["status"] == 400 and results[1]["error"]["field"].startswith("jobs[1].resources")
        assert results[2]["status"] == 400 and results[2]["error"]["field"] == "jobs[2].origin"
        accepted = [r for i, r in enumerate(results) if i not in (1, 2)]
        assert {r["status"] for r in accepted} == {202}
        ids = [r["job"]["id"] for r in accepted]
        assert len(set(ids)) == 298
        assert set(await broker.store.queued(0, 1000)) | {
            j["id"] for j in await broker.store.list_jobs("default", 1000) if j["state"] != "queued"
        } >= set(ids)
        status, again = await post(http, body, **{"Idempotency-Key": "nightly-7"})
        assert status == 200
        replayed = [r for i, r in enumerate(again["jobs"]) if i not in (1, 2)]
        assert {r["status"] for r in replayed} == {200}
        assert [r["job"]["id"] for r in replayed] == ids


async def test_each_job_of_a_batch_takes_its_own_rate_token(redis_client: aioredis.Redis, namespace: str) -> None:
    store = Store(redis_client, Keys(namespace))
    items = [Submission(f"j{i}", JobSpec.model_validate(job(i))) for i in range(25)]
    outcomes = await store.submit_many(items, rate_limit=SubmitRate("token-1", per_s=0.01, burst=10))
    assert [isinstance(o, tuple) for o in outcomes] == [True] * 10 + [False] * 15
    assert all(isinstance(o, TooManyRequests) for o in outcomes[10:])
    assert await store.queue_length() == 10


async def test_a_bad_batch_is_a_400_naming_the_field(
    redis_server: RedisServer, mosquitto: MosquittoServer, namespace: str
) -> None:
    async with (
        running_broker(redis_server, mosquitto, namespace) as broker,
        aiohttp.ClientSession(base_url=broker.url) as http,
    ):
        for body in ({"jobs": []}, {"jobs": "x"}, {"job": [job(0)]}, {"jobs": [job(i) for i in range(1001)]}):
            status, answer = await post(http, body)
            assert status == 400 and answer["error"]["field"] == "jobs", (body.keys(), answer)
        status, answer = await post(http, {"jobs": [job(0), "a job", 3]})
        assert status == 400 and answer["error"]["field"] == "jobs[1]"
        async with http.post("/v1/jobs:batch", data=b"{not json", headers=JSON) as response:
            assert response.status == 400
        async with http.post("/v1/jobs:batch", data=b"x" * (5 * 1024 * 1024), headers=JSON) as response:
            assert response.status == 413
