"""Jobs for users: submit, quote, read, list and cancel. A user sees only its own tenant's jobs."""

from __future__ import annotations

import math
import secrets
import time
from typing import Any

import orjson
from aiohttp import web
from pydantic import Field

from broker.http import auth
from broker.http.deps import DEPS, Deps
from broker.http.holds import HOLD_PARAMS, desk_of, hold_offer, hold_request
from broker.http.responses import error_body, json_body, json_response, status_of
from broker.http.routes import ID, TENANT_HEADER_PARAM, TENANT_QUERY_PARAM, Route, param
from broker.http.views import MAX_CANDIDATES, job_view, quote_view
from broker.model.job import SITE_PREFIX, JobSpec, JobState
from broker.sites.assignments import held_assignment, publish_runs, tell_site_to_cancel
from broker.state.jobs import Submission, SubmitRate
from common import logs
from common.errors import Conflict, InvalidInput, NotFound, SuanwangError, TooManyRequests
from common.validation import Strict, json_object, parse
from regions import Geography, load_devices

log = logs.get("suanwang.api")

IDEMPOTENCY_HEADER = "Idempotency-Key"


def new_job_id() -> str:
    """Sortable by submission time: milliseconds in hex, then randomness."""
    return f"j{int(time.time() * 1000):011x}{secrets.token_hex(5)}"


def _job_id(deps: Deps, spec: JobSpec) -> str:
    """A new job's id, on its tenant's job shard."""
    return deps.store.id_for(new_job_id(), spec.tenant)


def check_against_network(spec: JobSpec, geo: Geography) -> None:
    """What only the broker knows: places and reference models must exist."""
    if not geo.is_origin(spec.origin):
        raise InvalidInput(f"unknown origin {spec.origin!r}: use a city, cluster or hub id (GET /v1/hubs)", "origin")
    equivalent = spec.resources.equivalent
    if equivalent is not None and equivalent.reference not in load_devices():
        raise InvalidInput(f"unknown reference model {equivalent.reference!r}", "resources.equivalent.reference")
    provinces = {p.lower() for hub in geo.hubs.values() for p in hub.provinces}
    for name in ("allow_hubs", "deny_hubs"):
        for hub in getattr(spec.residency, name):
            if hub not in geo.hubs:
                raise InvalidInput(f"unknown hub {hub!r}; one of {', '.join(geo.hubs)}", f"residency.{name}")
    for name in ("allow_provinces", "deny_provinces"):
        for province in getattr(spec.residency, name):
            if province.lower() not in provinces:
                raise InvalidInput(f"unknown province {province!r}", f"residency.{name}")
    names: set[str] = set()
    for i, data in enumerate(spec.datasets):
        if not data.location.startswith(SITE_PREFIX) and not geo.is_origin(data.location):
            raise InvalidInput(f"unknown place {data.location!r} for dataset {data.name!r}: a city, cluster or hub id "
                               "(GET /v1/hubs), or site:<id>", f"datasets.{i}.location")  # fmt: skip
        if data.name in names:
            raise InvalidInput(f"dataset {data.name!r} is named twice", f"datasets.{i}.name")
        names.add(data.name)


async def _read_spec(request: web.Request) -> JobSpec:
    return _spec_of(request, await json_body(request, "send the job as application/json"))


def _spec_of(request: web.Request, payload: bytes | dict[str, Any]) -> JobSpec:
    raw = parse(JobSpec, payload)  # syntax and types first
    tenant = auth.acting_tenant(request, raw.tenant if "tenant" in raw.model_fields_set else None)
    spec = raw if raw.tenant == tenant else raw.model_copy(update={"tenant": tenant})
    check_against_network(spec, request.app[DEPS].geography)  # then what only the broker knows
    return spec


def _idempotency_key(request: web.Request) -> str | None:
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is not None and not (0 < len(key) <= 128 and key.isprintable() and " " not in key):
        raise InvalidInput("Idempotency-Key must be 1-128 printable characters without spaces", IDEMPOTENCY_HEADER)
    return key


async def _visible_job(request: web.Request) -> dict[str, str]:
    """The job named in the path; a user asking for another tenant's job learns only that there is none."""
    job_id = request.match_info["id"]
    job = await request.app[DEPS].store.get_job(job_id)
    if job is None or not auth.may_see(request, job["tenant"]):
        raise NotFound(f"no job {job_id}")
    return job


async def submit_job(request: web.Request) -> web.Response:
    """Queue a job. With an Idempotency-Key, a retry returns the job the first request created."""
    deps = request.app[DEPS]
    spec = await _read_spec(request)
    key = _idempotency_key(request)
    limits, caller = deps.limits, auth.identity_of(request)
    rate = SubmitRate(caller.id, limits.submit_rate, limits.submit_burst) if caller.id else None
    if spec.hold is not None:
        return await _submit_held(request, spec, key, rate)
    stored, created = await deps.store.submit(_job_id(deps, spec), spec, idempotency_key=key, body_hash="",
                                              rate_limit=rate, max_queued=limits.max_queued_per_tenant)  # fmt: skip
    if created:
        deps.kick.set()
        log.info("job.submitted", job=stored["id"], tenant=spec.tenant, archs=spec.resources.arch_set,
                 count=spec.resources.count, origin=spec.origin)  # fmt: skip
    response = json_response(job_view(stored), 202 if created else 200)
    response.headers["Location"] = f"/v1/jobs/{stored['id']}"
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return response


async def _submit_held(request: web.Request, spec: JobSpec, key: str | None, rate: SubmitRate | None
                       ) -> web.Response:  # fmt: skip
    """A job submitted with a hold: stored and placed on the hold's devices at the hold's price in one
    transaction, then its site is told; or 409 saying the hold expired (or was used, or released) and nothing
    is stored. Should the site have gone offline since, the job waits in the queue like any other."""
    deps = request.app[DEPS]
    limits = deps.limits
    outcome = await desk_of(deps).submit_held(_job_id(deps, spec), spec, int(limits.accept_timeout_s * 1000),
                                              idempotency_key=key, rate_limit=rate,
                                              max_queued=limits.max_queued_per_tenant)  # fmt: skip
    if isinstance(outcome, SuanwangError):
        raise outcome
    stored, created, commit = outcome
    if created:
        if commit is not None and commit.ok:
            offer = orjson.loads(stored.get("decision") or "{}").get("chosen") or {}
            assignment = held_assignment(stored["id"], spec, offer, commit)
            await publish_runs(deps.publish_assignments, {stored["site"]: [assignment]})
            deps.metrics.holds.labels("used").inc()
            deps.metrics.placements.labels(stored.get("hub", ""), stored.get("arch", "")).inc()
            log.info("job.submitted", job=stored["id"], tenant=spec.tenant, hold=spec.hold, site=stored["site"],
                     attempt=commit.attempt)  # fmt: skip
        else:
            deps.kick.set()
            log.warning("job.hold_not_taken", job=stored["id"], tenant=spec.tenant, hold=spec.hold,
                        refusal=commit.refusal.value if commit and commit.refusal else None)  # fmt: skip
    response = json_response(job_view(stored), 202 if created else 200)
    response.headers["Location"] = f"/v1/jobs/{stored['id']}"
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return response


MAX_BATCH = 1000  # jobs in one batch submit
MAX_BATCH_BYTES = 4 * 1024 * 1024


class JobBatch(Strict):
    """Up to 1,000 jobs, each validated, accepted or refused on its own (an invalid job is a 400 in its
    place in the answer, not a refusal of the batch)."""

    jobs: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_BATCH,
                                       description="Each a job as POST /v1/jobs takes it")  # fmt: skip


async def submit_batch(request: web.Request) -> web.Response:
    """Queue many jobs in one request and one round trip to Redis. Each job is validated, rate limited and
    accepted or refused on its own; the answer lists, in order, each job's status (202 queued, 200 an
    idempotent replay, or its error's status) with the job or the error. With an Idempotency-Key, job i
    of the batch has the key `<key>#<i>`, so a retry of the whole batch returns the same jobs."""
    deps = request.app[DEPS]
    body = json_object(await json_body(request, "send the jobs as application/json", MAX_BATCH_BYTES))
    items = body.get("jobs")
    if set(body) != {"jobs"} or not isinstance(items, list):
        raise InvalidInput('send {"jobs": [job, ...]}', "jobs")
    if not 1 <= len(items) <= MAX_BATCH:
        raise InvalidInput(f"a batch holds 1 to {MAX_BATCH} jobs, not {len(items)}", "jobs")
    not_object = next((i for i, item in enumerate(items) if not isinstance(item, dict)), None)
    if not_object is not None:  # the batch's own shape: each job a JSON object (its content is checked per job)
        raise InvalidInput("each job of a batch must be a JSON object", f"jobs[{not_object}]")
    key = _idempotency_key(request)
    results: list[dict[str, Any] | None] = [None] * len(items)
    submissions: list[tuple[int, Submission]] = []
    for i, item in enumerate(items):
        try:
            spec = _spec_of(request, item)
            if spec.hold is not None:
                raise InvalidInput("a job with a hold is submitted on its own (POST /v1/jobs)", "hold")
        except SuanwangError as exc:
            inner = getattr(exc, "field", None)
            field = f"jobs[{i}]" + (f".{inner}" if inner else "")
            results[i] = {"status": status_of(exc), "error": {**error_body(exc), "field": field}}
            continue
        submissions.append((i, Submission(_job_id(deps, spec), spec, f"{key}#{i}" if key else None)))
    limits, caller = deps.limits, auth.identity_of(request)
    rate = SubmitRate(caller.id, limits.submit_rate, limits.submit_burst) if caller.id else None
    outcomes = await deps.store.submit_many([s for _, s in submissions], rate_limit=rate,
                                            max_queued=limits.max_queued_per_tenant)  # fmt: skip
    created = 0
    for (i, _), outcome in zip(submissions, outcomes, strict=True):
        if isinstance(outcome, SuanwangError):
            results[i] = {"status": status_of(outcome), "error": error_body(outcome)}
            continue
        stored, new = outcome
        created += new
        results[i] = {"status": 202 if new else 200, "job": job_view(stored)}
    if created:
        deps.kick.set()
        log.info("jobs.submitted", jobs=created, refused=len(items) - sum(r is not None and r["status"] < 300
                                                                           for r in results))  # fmt: skip
    return json_response({"jobs": results})


def _query_int(request: web.Request, name: str, default: int, least: int, most: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidInput(f"{name} must be an integer", name) from None
    if not least <= value <= most:
        raise InvalidInput(f"{name} must be between {least} and {most}", name)
    return value


async def quote_job(request: web.Request) -> web.Response:
    """Where the job would go now and what would make it fit better; takes no capacity.

    A quote runs the matcher over the whole network once per what-if, so each token has a bucket of quotes
    (shared by every replica); the answer holds at most `MAX_CANDIDATES` candidates (`?limit=` for fewer)."""
    deps = request.app[DEPS]
    limit = _query_int(request, "limit", MAX_CANDIDATES, 1, MAX_CANDIDATES)
    hold, hold_site, hold_ttl_s = hold_request(request)
    spec = await _read_spec(request)
    caller, limits = auth.identity_of(request), deps.limits
    if caller.id and deps.buckets is not None:
        wait_ms = await deps.buckets.take("quote", caller.id, limits.quote_rate, limits.quote_burst)
        if wait_ms:
            seconds = max(1, math.ceil(wait_ms / 1000))
            raise TooManyRequests(f"too many quotes: at most {limits.quote_rate:g}/s in bursts of {limits.quote_burst} "
                                  f"per token; retry in {seconds} s", seconds, code="quote_rate_limited")  # fmt: skip
    quoted = await deps.quoter(_job_id(deps, spec), spec)
    view = quote_view(quoted, limit)
    if hold:
        view["hold"] = await hold_offer(request, spec, quoted, hold_site, hold_ttl_s)
    return json_response(view)


async def get_job(request: web.Request) -> web.Response:
    job = await _visible_job(request)
    view = job_view(job)
    view["history"] = await request.app[DEPS].store.history(job["id"])
    return json_response(view)


async def list_jobs(request: web.Request) -> web.Response:
    state = request.query.get("state") or None
    if state is not None and state not in JobState.__members__.values():
        raise InvalidInput(f"state must be one of {', '.join(s.value for s in JobState)}", "state")
    try:
        limit = int(request.query.get("limit", "100"))
    except ValueError:
        raise InvalidInput("limit must be an integer", "limit") from None
    if not 1 <= limit <= 1000:
        raise InvalidInput("limit must be between 1 and 1000", "limit")
    jobs = await request.app[DEPS].store.list_jobs(auth.acting_tenant(request), limit, state)
    return json_response({"jobs": [job_view(j) for j in jobs]})


CANCEL_TRIES = 5  # a job that moves again each time it is read is rare; after this many, the caller retries


async def cancel_job(request: web.Request) -> web.Response:
    """Cancel the job; the site holding it is told to stop it, and its capacity goes back to the matcher.

    The cancel is fenced on the holder and attempt just read: if the job moved in between (placed,
    requeued, placed again), Redis refuses and the job is read again, so the site told is the one that
    held the job at the moment it was cancelled."""
    deps = request.app[DEPS]
    job = await _visible_job(request)
    job_id = job["id"]
    for _ in range(CANCEL_TRIES):
        site, attempt = job.get("site", ""), job.get("attempt", "0")
        if await deps.store.transition(job_id, "cancel", site, attempt, "cancelled by the user"):
            break
        fresh = await deps.store.get_job(job_id)
        if fresh is None:
            raise NotFound(f"no job {job_id}")
        if JobState(fresh["state"]).final:
            raise Conflict(f"job {job_id} is already {fresh['state']}")
        job = fresh
    else:
        raise Conflict(f"job {job_id} kept moving while it was being cancelled; try again")
    if site:
        await tell_site_to_cancel(deps.publish_assignments, site, [(job_id, int(attempt))])
        deps.kick.set()
    updated = await deps.store.get_job(job_id)
    return json_response(job_view(updated or job))


_KEY_PARAM = param(IDEMPOTENCY_HEADER, "header", {"type": "string", "maxLength": 128},
                   "A retry with the same key returns the first job")  # fmt: skip
_STATE_PARAM = param("state", "query", {"enum": [s.value for s in JobState]})
_LIMIT_PARAM = param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 1000})
_CANDIDATES_PARAM = param("limit", "query", {"type": "integer", "minimum": 1, "maximum": MAX_CANDIDATES},
                          f"At most this many candidates (default and most: {MAX_CANDIDATES})")  # fmt: skip

ROUTES = (
    Route("POST", "/v1/jobs", submit_job, "Submit a job", role="user", ok=(202, "Job"), also_ok={200: "Job"},
          errors=(400, 409, 413, 415, 429), params=(TENANT_HEADER_PARAM, _KEY_PARAM), body=JobSpec),
    Route("POST", "/v1/jobs:batch", submit_batch, "Submit up to 1,000 jobs, each accepted or refused on its own",
          role="user", ok=(200, "JobBatchResult"), errors=(400, 413, 415), params=(TENANT_HEADER_PARAM, _KEY_PARAM),
          body=JobBatch),
    Route("POST", "/v1/quote", quote_job, "Where a job would go now; with `hold`, reserve the best place at the "
          "quoted price for a short time (submit the job with the `hold` id)", role="user",
          ok=(200, "Quote"), errors=(400, 409, 413, 415, 429),
          params=(TENANT_HEADER_PARAM, _CANDIDATES_PARAM, *HOLD_PARAMS),
          body=JobSpec),
    Route("GET", "/v1/jobs", list_jobs, "The tenant's jobs, newest first", role="user", ok=(200, "JobList"),
          errors=(400,), params=(_STATE_PARAM, _LIMIT_PARAM, TENANT_QUERY_PARAM, TENANT_HEADER_PARAM)),
    Route("GET", "/v1/jobs/{id}", get_job, "A job: state, allocation or why it waits, history", role="user",
          ok=(200, "Job"), errors=(404,), params=(ID,)),
    Route("DELETE", "/v1/jobs/{id}", cancel_job, "Cancel a job, releasing what it holds", role="user",
          ok=(200, "Job"), errors=(404, 409), params=(ID,)),
)  # fmt: skip
