"""The served OpenAPI document against the server it describes: schemathesis generates requests for every
operation from `GET /openapi.json` of a real `suanwang serve` (tokens required, called with an admin's),
and checks there is no 5xx and every response matches the document."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.schemas import APIOperation
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

from broker.http.app import route_role
from suanwang.servers import MosquittoServer, RedisServer, free_port

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = 25  # per operation, valid and invalid input: about 20 operations in well under a minute


@pytest.fixture(scope="module")
def served(redis_server: RedisServer, mosquitto: MosquittoServer, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[str, str]]:  # fmt: skip
    """A `suanwang serve` process with tokens required, and an admin token made with `suanwang token create`."""
    namespace = f"oa{uuid.uuid4().hex[:8]}"
    port = free_port()
    common = ["--redis", redis_server.url, "--namespace", namespace]
    made = subprocess.run([sys.executable, "-m", "suanwang.cli", "token", "create", "--role", "admin", "--tenant",
                           "ops", "--json", *common], cwd=REPO, capture_output=True, check=True)  # fmt: skip
    token = orjson.loads(made.stdout)["token"]
    log = tmp_path_factory.mktemp("openapi") / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "suanwang.cli", "serve", *common, "--mqtt", mosquitto.url,
                                 "--http", f"127.0.0.1:{port}", "--auth", "required", "--log-level", "warning"],
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if requests.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
            time.sleep(0.1)
        yield url, token
    finally:
        proc.terminate()
        proc.wait(10)


def check_operation(operation: APIOperation, headers: dict[str, str]) -> None:
    """EXAMPLES cases of valid and of invalid input, each sent and checked against the document."""
    # The document states types, but some rules only the server knows (an origin must be a real city, a job
    # asks for either a device count or an amount of compute): valid-looking data may be a 400. Unknown
    # query parameters are ignored, as usual on HTTP: the refusal of invalid input is checked where it
    # matters, on request bodies (the other checks run for every case).
    skipped: list[Any] = [positive_data_acceptance]
    if operation.method.upper() != "POST":
        skipped.append(negative_data_rejection)

    @given(case=operation.as_strategy() | operation.as_strategy(GenerationMode.NEGATIVE))
    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def conforms(case: schemathesis.Case) -> None:
        case.call_and_validate(headers=headers, excluded_checks=skipped)

    conforms()


def test_every_operation_conforms(served: tuple[str, str]) -> None:
    """No 5xx, invalid bodies refused, and status, content type, headers and body as the document says, for
    every operation but the endless live stream and the static files."""
    url, token = served
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json").exclude(
        path_regex=r"^/(static|v1/allocations/stream)")  # fmt: skip
    operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    assert len(operations) >= 20
    for i in range(3):  # jobs of the admin's tenant, so that listings have items to check
        job: dict[str, Any] = {"name": f"oa-{i}", "resources": {"arch": "GPU", "count": 1}, "origin": "shanghai",
                               "duration_hours": 1}  # fmt: skip
        assert requests.post(f"{url}/v1/jobs", json=job, headers={"Authorization": f"Bearer {token}"},
                             timeout=5).status_code == 202  # fmt: skip
    failures: dict[str, str] = {}
    for operation in operations:
        try:
            check_operation(operation, {"Authorization": f"Bearer {token}"})
        except (Exception, BaseExceptionGroup) as exc:  # every operation's failures, not just the first
            failures[operation.label] = f"{type(exc).__name__}: {str(exc)[:1500]}"
    assert not failures, "\n\n".join(f"{label}: {text}" for label, text in failures.items())


def test_document_covers_every_route_with_its_role(served: tuple[str, str]) -> None:
    """Every operation states the role it needs and documents the errors that role check can give."""
    url, _ = served
    document = requests.get(f"{url}/openapi.json", timeout=5).json()
    assert document["openapi"].startswith("3.1")
    assert "JobSpec" in document["components"]["schemas"]
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            route_path = "/static" if path.startswith("/static") else path
            assert operation["x-suanwang-role"] == route_role(method.upper(), route_path), (method, path)
            if operation["x-suanwang-role"] != "public":
                assert {"401", "403"} <= set(operation["responses"]), (method, path)
    job_post = document["paths"]["/v1/jobs"]["post"]
    assert job_post["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/JobSpec"}
    assert {"202", "400", "413", "415", "429"} <= set(job_post["responses"])
