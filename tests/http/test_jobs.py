"""Jobs over HTTP against an in-memory store: submission and its refusals, replays, reading, listing and
cancelling, with the tenant boundary a user token draws."""

from __future__ import annotations

import pytest

from tests.http.harness import Api, Start, job_body


async def test_submit_queues_the_job_and_wakes_the_matcher(api: Api) -> None:
    """A valid job is 202 with the queued job, its Location, stored under the token's tenant, and the matcher is
    woken."""
    token = api.tokens.add("user", "acme")
    reply = await api.call("POST", "/v1/jobs", token, job_body())
    assert reply.status == 202, reply.body
    job = reply.body
    assert job["state"] == "queued" and job["tenant"] == "acme" and job["allocation"] is None
    assert job["waiting"] == "waiting for the matcher"
    assert reply.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert api.store.jobs[job["id"]]["tenant"] == "acme"
    assert api.kick.is_set()


async def test_submit_rate_is_per_token(api: Api) -> None:
    """Each submission is counted against the bucket of the token that sent it."""
    token = api.tokens.add("user", "acme")
    assert (await api.call("POST", "/v1/jobs", token, job_body())).status == 202
    rate = api.store.submit_rates[-1]
    assert rate is not None and rate.key == api.tokens.by_token[token].id


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"resources": {"arch": "GPU", "count": "many"}}, "resources.count"),
        ({"colour": "red"}, "colour"),
        ({"origin": "atlantis"}, "origin"),
        ({"residency": {"allow_hubs": ["mars"]}}, "residency.allow_hubs"),
    ],
)
async def test_invalid_job_is_400_naming_the_field(api: Api, change: dict[str, object], field: str) -> None:
    """A job that fails validation, by schema or by what only the network knows, is 400 naming the field, and
    nothing is stored."""
    reply = await api.call("POST", "/v1/jobs", api.tokens.add("user", "acme"), job_body(**change))
    assert reply.status == 400
    assert reply.body["error"]["field"] == field
    assert reply.body["error"]["code"] == "invalid"
    assert not api.store.jobs


async def test_malformed_json_is_400(api: Api) -> None:
    """A body that is not JSON is 400 with its own code."""
    reply = await api.call("POST", "/v1/jobs", api.tokens.add("user", "acme"), data=b"{not json",
                           headers={"Content-Type": "application/json"})  # fmt: skip
    assert reply.status == 400 and reply.body["error"]["code"] == "malformed_json"


async def test_other_media_type_is_415(api: Api) -> None:
    """A job sent as anything but application/json is 415."""
    reply = await api.call("POST", "/v1/jobs", api.tokens.add("user", "acme"), data=b"name=unit",
                           headers={"Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
    assert reply.status == 415
    assert reply.body["error"]["code"] == "unsupported_media_type"
    assert not api.store.jobs


async def test_body_over_the_limit_is_413(start: Start) -> None:
    """A body larger than the app's limit is 413 in the error shape, and nothing is stored."""
    api = await start(max_body_bytes=1024)
    reply = await api.call("POST", "/v1/jobs", api.tokens.add("user", "acme"), job_body(name="x" * 2000))
    assert reply.status == 413
    assert reply.body["error"]["code"] == "too_large"
    assert not api.store.jobs


async def test_idempotent_retry_returns_the_first_job(api: Api) -> None:
    """A retry with the same Idempotency-Key and body is 200 with the first job, marked as replayed; the key with
    another body is 409."""
    token = api.tokens.add("user", "acme")
    key = {"Idempotency-Key": "order-7"}
    first = await api.call("POST", "/v1/jobs", token, job_body(), headers=key)
    api.kick.clear()
    again = await api.call("POST", "/v1/jobs", token, job_body(), headers=key)
    assert first.status == 202 and again.status == 200
    assert again.body["id"] == first.body["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert len(api.store.jobs) == 1 and not api.kick.is_set()
    other = await api.call("POST", "/v1/jobs", token, job_body(name="other"), headers=key)
    assert other.status == 409


async def test_bad_idempotency_key_is_400(api: Api) -> None:
    """An Idempotency-Key with a space is refused, naming the header."""
    reply = await api.call("POST", "/v1/jobs", api.tokens.add("user", "acme"), job_body(),
                           headers={"Idempotency-Key": "two words"})  # fmt: skip
    assert reply.status == 400 and reply.body["error"]["field"] == "Idempotency-Key"


async def test_get_job_shows_its_history(api: Api) -> None:
    """A job's owner reads it with its state history."""
    token = api.tokens.add("user", "acme")
    job_id = (await api.call("POST", "/v1/jobs", token, job_body())).body["id"]
    reply = await api.call("GET", f"/v1/jobs/{job_id}", token)
    assert reply.status == 200
    assert reply.body["id"] == job_id and [h["state"] for h in reply.body["history"]] == ["queued"]


async def test_another_tenants_job_is_404_for_a_user(api: Api) -> None:
    """A user asking for, or cancelling, another tenant's job gets the same 404 as for no job; an operator sees
    it."""
    job_id = (await api.call("POST", "/v1/jobs", api.tokens.add("user", "acme"), job_body())).body["id"]
    other = api.tokens.add("user", "globex")
    missing = await api.call("GET", "/v1/jobs/j-no-such-job", other)
    for method in ("GET", "DELETE"):
        reply = await api.call(method, f"/v1/jobs/{job_id}", other)
        assert reply.status == 404 and reply.body["error"]["code"] == missing.body["error"]["code"] == "not_found"
    assert api.store.jobs[job_id]["state"] == "queued"
    assert (await api.call("GET", f"/v1/jobs/{job_id}", api.tokens.add("operator", "ops"))).status == 200


async def test_list_is_the_tenants_jobs_newest_first(api: Api) -> None:
    """A user's listing holds only its tenant's jobs, newest first, filtered by state and cut at `limit`."""
    acme = api.tokens.add("user", "acme")
    ids = [(await api.call("POST", "/v1/jobs", acme, job_body(name=f"j{i}"))).body["id"] for i in range(3)]
    await api.call("POST", "/v1/jobs", api.tokens.add("user", "globex"), job_body())
    await api.call("DELETE", f"/v1/jobs/{ids[0]}", acme)
    listed = await api.call("GET", "/v1/jobs", acme)
    assert [j["id"] for j in listed.body["jobs"]] == ids[::-1]
    queued = await api.call("GET", "/v1/jobs?state=queued&limit=1", acme)
    assert [j["id"] for j in queued.body["jobs"]] == [ids[2]]


@pytest.mark.parametrize(("query", "field"), [("state=sleeping", "state"), ("limit=0", "limit"),
                                              ("limit=ten", "limit")])  # fmt: skip
async def test_bad_listing_query_is_400(api: Api, query: str, field: str) -> None:
    """An unknown state or a limit outside 1-1000 is 400 naming the parameter."""
    reply = await api.call("GET", f"/v1/jobs?{query}", api.tokens.add("user", "acme"))
    assert reply.status == 400 and reply.body["error"]["field"] == field


async def test_user_cannot_list_for_another_tenant(api: Api) -> None:
    """A user naming another tenant is 403; an operator may act for any tenant."""
    assert (await api.call("GET", "/v1/jobs?tenant=globex", api.tokens.add("user", "acme"))).status == 403
    assert (await api.call("GET", "/v1/jobs?tenant=globex", api.tokens.add("operator", "ops"))).status == 200


async def test_cancel_tells_the_holding_site(api: Api) -> None:
    """Cancelling a job a site holds answers the cancelled job, sends that site a cancel for the job's attempt and
    wakes the matcher."""
    token = api.tokens.add("user", "acme")
    job_id = (await api.call("POST", "/v1/jobs", token, job_body())).body["id"]
    api.store.place(job_id, "guian-01", "guizhou", attempt=2)
    api.kick.clear()
    reply = await api.call("DELETE", f"/v1/jobs/{job_id}", token)
    assert reply.status == 200 and reply.body["state"] == "cancelled"
    assert len(api.published.sent) == 1
    site, message = api.published.sent[0]
    assert site == "guian-01" and message["site"] == "guian-01"
    assert message["assignments"] == [{"job": job_id, "attempt": 2, "action": "cancel", "count": 0,
                                       "duration_hours": 0, "name": "", "workload": ""}]  # fmt: skip
    assert api.kick.is_set()


async def test_cancel_of_a_queued_job_tells_no_site(api: Api) -> None:
    """A queued job holds nothing, so its cancel publishes nothing."""
    token = api.tokens.add("user", "acme")
    job_id = (await api.call("POST", "/v1/jobs", token, job_body())).body["id"]
    assert (await api.call("DELETE", f"/v1/jobs/{job_id}", token)).body["state"] == "cancelled"
    assert api.published.sent == []


async def test_cancel_of_a_finished_job_is_409(api: Api) -> None:
    """A job that already ended cannot be cancelled: 409 naming its state, and no site is told."""
    token = api.tokens.add("user", "acme")
    job_id = (await api.call("POST", "/v1/jobs", token, job_body())).body["id"]
    api.store.place(job_id, "guian-01", "guizhou", state="completed")
    reply = await api.call("DELETE", f"/v1/jobs/{job_id}", token)
    assert reply.status == 409 and "completed" in reply.body["error"]["message"]
    assert api.published.sent == [] and api.store.jobs[job_id]["state"] == "completed"


async def test_quote_passes_the_job_with_the_callers_tenant(api: Api) -> None:
    """A quote hands the validated job, under the caller's tenant, to the quoter and answers what it returns."""
    reply = await api.call("POST", "/v1/quote", api.tokens.add("user", "acme"), job_body())
    assert reply.status == 200 and reply.body["placeable"] is False
    assert [spec.tenant for spec in api.quoted] == ["acme"]
    assert not api.store.jobs
