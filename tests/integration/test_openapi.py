"""The served OpenAPI document against the server it describes: schemathesis generates requests for every
operation from `GET /openapi.json` of a real `suanwang serve` (tokens required), and checks there is no 5xx
and every response matches the document: called with an admin's token, and with a user's, which must be
refused every route above its role and never see another tenant's jobs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import CheckContext, CheckFunction, GenerationMode
from schemathesis.schemas import APIOperation
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

from broker.http.app import route_role
from broker.model.identity import Identity
from suanwang.servers import MosquittoServer, RedisServer, free_port

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = 25  # per operation, valid and invalid input: about 20 operations in well under a minute
USER_TENANT = "alice"
# schemathesis probes every protected operation with missing and invalid tokens; the limit on failed
# authentications per address is raised so that those probes meet the token check, not the limiter
SERVE_ENV = {**os.environ, "SUANWANG_AUTH_FAILURES": "1000000"}


@dataclass(frozen=True)
class Served:
    url: str
    admin: str  # tokens
    user: str  # of tenant USER_TENANT


@pytest.fixture(scope="module")
def served(redis_server: RedisServer, mosquitto: MosquittoServer, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Served]:  # fmt: skip
    """A `suanwang serve` process with tokens required, and an admin's and a user's tokens made with
    `suanwang token create`."""
    namespace = f"oa{uuid.uuid4().hex[:8]}"
    port = free_port()
    common = ["--redis", redis_server.url, "--namespace", namespace]

    def token(role: str, tenant: str) -> str:
        made = subprocess.run([sys.executable, "-m", "suanwang.cli", "token", "create", "--role", role, "--tenant",
                               tenant, "--json", *common], cwd=REPO, capture_output=True, check=True)  # fmt: skip
        return str(orjson.loads(made.stdout)["token"])

    admin, user = token("admin", "ops"), token("user", USER_TENANT)
    log = tmp_path_factory.mktemp("openapi") / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "suanwang.cli", "serve", *common, "--mqtt", mosquitto.url,
                                 "--http", f"127.0.0.1:{port}", "--auth", "required", "--log-level", "warning"],
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env=SERVE_ENV)  # fmt: skip
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
        yield Served(url, admin, user)
    finally:
        proc.terminate()
        proc.wait(10)


def check_operation(operation: APIOperation, headers: dict[str, str], checks: Sequence[CheckFunction] = ()) -> None:
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
        case.call_and_validate(headers=headers, excluded_checks=skipped, additional_checks=list(checks))

    conforms()


def operations(url: str) -> list[APIOperation]:
    """Every operation but the endless live stream and the static files."""
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json").exclude(
        path_regex=r"^/(static|v1/allocations/stream)")  # fmt: skip
    found = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    assert len(found) >= 20
    return found


def submit(served: Served, token: str, n: int) -> list[str]:
    """`n` jobs of the token's tenant, so that listings have items to check; their ids."""
    ids = []
    for i in range(n):
        job: dict[str, Any] = {"name": f"oa-{i}", "resources": {"arch": "GPU", "count": 1}, "origin": "shanghai",
                               "duration_hours": 1}  # fmt: skip
        answer = requests.post(f"{served.url}/v1/jobs", json=job, headers={"Authorization": f"Bearer {token}"},
                               timeout=5)  # fmt: skip
        assert answer.status_code == 202, answer.text
        ids.append(answer.json()["id"])
    return ids


def check_all(served: Served, token: str, checks: Sequence[CheckFunction] = ()) -> None:
    failures: dict[str, str] = {}
    for operation in operations(served.url):
        try:
            check_operation(operation, {"Authorization": f"Bearer {token}"}, checks)
        except (Exception, BaseExceptionGroup) as exc:  # every operation's failures, not just the first
            failures[operation.label] = f"{type(exc).__name__}: {str(exc)[:1500]}"
    assert not failures, "\n\n".join(f"{label}: {text}" for label, text in failures.items())


def test_every_operation_conforms(served: Served) -> None:
    """No 5xx, invalid bodies refused, and status, content type, headers and body as the document says, for
    every operation but the endless live stream and the static files."""
    submit(served, served.admin, 3)
    check_all(served, served.admin)


def tenants_in(value: Any) -> set[str]:
    """Every `tenant` named anywhere in a JSON value."""
    if isinstance(value, dict):
        found = {str(value["tenant"])} if isinstance(value.get("tenant"), str) else set()
        return found.union(*(tenants_in(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(tenants_in(v) for v in value))
    return set()


def user_checks(token: str, others: set[str]) -> list[CheckFunction]:
    """What a user's `token` may get: never 401 (the token is valid); 403 (or 404) on every route above the
    user's role; and no answer that names another tenant or any of the job ids `others`. (Schemathesis's own
    probes without a token or with a made-up one are left to its `ignored_auth` check.)"""
    user = Identity(id="", role="user", tenant=USER_TENANT)

    def with_token(response: schemathesis.Response) -> bool:
        return bool(response.request.headers.get("Authorization") == f"Bearer {token}")

    def user_is_refused_above_its_role(_ctx: CheckContext, response: schemathesis.Response,
                                       case: schemathesis.Case) -> bool | None:  # fmt: skip
        if not with_token(response):
            return None
        assert response.status_code != 401, f"a valid user token got 401: {response.text[:300]}"
        need = route_role(case.operation.method.upper(), case.operation.path)
        if not user.at_least(need):
            assert response.status_code in (403, 404), f"a user got {response.status_code} on a {need} route"
        return None

    def user_sees_only_its_tenant(_ctx: CheckContext, response: schemathesis.Response,
                                  case: schemathesis.Case) -> bool | None:  # fmt: skip
        if response.status_code >= 300 or not with_token(response):
            return None
        leaked = [job for job in others if job in response.text]
        assert not leaked, f"a user's answer names another tenant's jobs {leaked}"
        if "json" in response.headers.get("content-type", [""])[0]:
            strangers = tenants_in(response.json()) - {USER_TENANT}
            assert not strangers, f"a user's answer names other tenants {sorted(strangers)}"
        return None

    return [user_is_refused_above_its_role, user_sees_only_its_tenant]


def test_every_operation_conforms_for_a_user_and_refuses_what_it_may_not(served: Served) -> None:
    """The same with a user's token: no 5xx and the document's shapes; every operator and admin route refused
    (403); and nothing of the admin's tenant (its jobs, by id or by tenant) in any answer."""
    others = set(submit(served, served.admin, 2))
    submit(served, served.user, 2)
    check_all(served, served.user, user_checks(served.user, others))


@pytest.mark.parametrize(("path", "method", "caught"), [
    ("/v1/admin/tokens", "GET", "user_is_refused_above_its_role"),  # an admin route answered 200
    ("/v1/jobs", "GET", "user_sees_only_its_tenant"),  # the admin tenant's jobs listed
])  # fmt: skip
def test_the_user_checks_fail_on_a_token_that_gets_more(served: Served, path: str, method: str, caught: str) -> None:
    """The user checks fed the admin's token as if it were a user's: both find what that token may do."""
    others = set(submit(served, served.admin, 1))
    (operation,) = [op for op in operations(served.url) if (op.path, op.method.upper()) == (path, method)]
    with pytest.raises((Exception, BaseExceptionGroup)) as failed:  # schemathesis raises its own failure types
        check_operation(operation, {"Authorization": f"Bearer {served.admin}"}, user_checks(served.admin, others))
    assert caught in str(failed.value)


def test_a_user_cannot_reach_another_tenants_job(served: Served) -> None:
    """Another tenant's job is not there for a user (404 to read or cancel, whatever the tenant header), and
    a user may not act for another tenant (403)."""
    (job,) = submit(served, served.admin, 1)
    user = {"Authorization": f"Bearer {served.user}"}
    for headers in (user, {**user, "X-Suanwang-Tenant": USER_TENANT}):
        assert requests.get(f"{served.url}/v1/jobs/{job}", headers=headers, timeout=5).status_code == 404
        assert requests.delete(f"{served.url}/v1/jobs/{job}", headers=headers, timeout=5).status_code == 404
    assert requests.get(f"{served.url}/v1/dashboard/jobs/{job}/events", headers=user, timeout=5).status_code == 403
    for query in ("tenant=ops", "tenant=*"):
        assert requests.get(f"{served.url}/v1/jobs?{query}", headers=user, timeout=5).status_code == 403
        assert requests.get(f"{served.url}/v1/usage?{query}", headers=user, timeout=5).status_code == 403
    answer = requests.get(f"{served.url}/v1/jobs/{job}", headers={"Authorization": f"Bearer {served.admin}"},
                          timeout=5)  # fmt: skip
    assert answer.status_code == 200 and answer.json()["state"] == "queued", answer.text


def test_document_covers_every_route_with_its_role(served: Served) -> None:
    """Every operation states the role it needs and documents the errors that role check can give."""
    url = served.url
    document = requests.get(f"{url}/openapi.json", timeout=5).json()
    assert document["openapi"].startswith("3.1")
    assert "JobSpec" in document["components"]["schemas"]
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            route_path = "/static" if path.startswith("/static") else path
            assert operation["x-suanwang-role"] == route_role(method.upper(), route_path), (method, path)
            if operation["x-suanwang-role"] != "public":  # 429: past the failed authentications of an address
                assert {"401", "403", "429"} <= set(operation["responses"]), (method, path)
    job_post = document["paths"]["/v1/jobs"]["post"]
    assert job_post["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/JobSpec"}
    assert {"202", "400", "413", "415", "429"} <= set(job_post["responses"])
