"""Helpers of the fault suite: the load every scenario drives, and the checks after it settles and after it
ends."""

from __future__ import annotations

import random
from typing import Any

from broker.state.audit import audit
from broker.state.history import check_history
from broker.state.store import Store
from suanwang.soak import Client, Findings, Wire, examine, job_body, settle

LOAD_JOBS, LOAD_RATE = 200, 25.0  # eight seconds of submissions, each job lasting one to three seconds


def bodies(n: int = LOAD_JOBS, seed: int = 1, **options: Any) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [job_body(rng, **options) for _ in range(n)]


async def settled_findings(store: Store, client: Client, timeout: float = 60.0) -> Findings:
    """Wait for the system to settle, then examine every job the API acknowledged."""
    assert not client.refused, f"the API refused jobs: {list(client.refused.items())[:5]}"
    assert not client.unanswered, f"{len(client.unanswered)} submissions never acknowledged"
    jobs = list(client.jobs)
    await settle(store, jobs, timeout=timeout)
    return await examine(store, jobs)


def assert_clean(found: Findings, may_lose: set[str] | None = None, wire: Wire | None = None) -> None:
    """No audit violation, nothing acknowledged lost (but `may_lose`), every job completed or correctly queued
    or out of retries, no job held by two sites at once, every attempt in its history."""
    problems = found.problems(may_lose or set())
    if wire is not None:  # what the sites said about jobs the broker still counts as theirs
        said = {(e["job"], e["attempt"]): (at, e["event"]) for at, e in wire.events}
        problems = [p + _site_said(p, said) for p in problems]
    assert not problems, f"{len(problems)} problems (states {dict(found.states)}):\n" + "\n".join(problems[:40])
    assert found.states["completed"] > 0, found.states


def _site_said(problem: str, said: dict[tuple[str, int], tuple[float, str]]) -> str:
    parts = problem.split()
    if parts[0] != "unfinished" or "(attempt" not in parts:
        return ""
    job, attempt = parts[1].rstrip(":"), int(parts[parts.index("(attempt") + 1].rstrip(")"))
    if (job, attempt) not in said:
        return "; the site sent nothing the wire saw"
    at, event = said[(job, attempt)]
    return f"; the site's last word was {event!r} at {at:.1f}"


async def assert_recovered(store: Store, client: Client, may_lose: set[str] | None = None,
                           timeout: float = 60.0, wire: Wire | None = None) -> Findings:  # fmt: skip
    found = await settled_findings(store, client, timeout)
    assert_clean(found, may_lose, wire)
    return found


async def final_problems(redis_url: str, namespace: str) -> list[str]:
    """What the audit of the state and the check of the event log as every job's history find in a
    namespace; the fault suite runs this once the cluster of each test has stopped."""
    store = Store.from_url(redis_url, namespace)
    try:
        problems = [f"audit {v.kind} {v.subject}: {v.detail}" for v in await audit(store)]
        report = await check_history(store)
    finally:
        await store.close()
    problems += [f"history {v.kind} {v.job}: {v.detail}" for v in report.violations]
    if report.events == 0:
        problems.append("history: the event log is empty")
    return problems
