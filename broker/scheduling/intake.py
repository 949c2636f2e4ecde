"""What a pass looks at: the head of the queue, fairly across tenants, as matcher requests.

Specs are read and validated once per job and kept while the job waits; jobs already found unfit at the
current snapshot version are skipped until something changes.
"""

from __future__ import annotations

import os
import socket
from collections import OrderedDict
from dataclasses import dataclass, field

from broker.matching import Request
from broker.model.job import JobSpec
from broker.state.store import Store

MAX_REMEMBERED = 200_000  # requests (and unfit verdicts) kept for jobs still waiting
HELD = -2  # unfit "version" of a job held back by its tenant's limit: re-checked every pass


@dataclass
class Batch:
    """The jobs of one pass: those to match, those held back (job -> reason), those skipped as already
    unfit at this view, and every job seen queued."""

    requests: list[Request] = field(default_factory=list)
    held: dict[str, str] = field(default_factory=dict)
    unfit: set[str] = field(default_factory=set)
    queued: set[str] = field(default_factory=set)


class Intake:
    def __init__(self, store: Store, batch: int, replica: str = "") -> None:
        self.store = store
        self.batch = batch
        self.replica = replica or f"{socket.gethostname()}-{os.getpid()}-{id(self):x}"
        self._requests: OrderedDict[str, Request | None] = OrderedDict()
        self.created: dict[str, int] = {}  # job -> submission time (ms), for latency and backfill
        self._unfit: dict[str, tuple[int, str]] = {}  # job -> (snapshot version, reason written)

    async def next_batch(self, version: int) -> Batch:
        """Every tenant's first job comes before any tenant's second (so 10,000 jobs from one tenant do not
        block one job from another), priority decides within a round, and a tenant at its device limit
        waits. Jobs already found unfit at this snapshot `version` are skipped."""
        heads = await self.store.queue_heads(self.batch, claimer=self.replica)
        usage, limits = self.store.usage, self.store.limits
        batch = Batch(queued={h[0] for h in heads})
        ids: list[str] = []
        for job_id, _position, _score, tenant in sorted(heads, key=lambda h: (h[1], h[2])):
            limit = limits.get(tenant)
            if limit is not None and usage.get(tenant, 0) >= limit:
                batch.held[job_id] = f"tenant {tenant} holds {usage.get(tenant, 0)} devices, its limit is {limit}"
            elif self._unfit.get(job_id, (-1, ""))[0] != version:
                ids.append(job_id)
            else:
                batch.unfit.add(job_id)
        batch.requests = await self._requests_for(ids[: self.batch])
        return batch

    async def _requests_for(self, ids: list[str]) -> list[Request]:
        missing = [job_id for job_id in ids if job_id not in self._requests]
        if missing:
            rows = await self.store.get_jobs(missing, "spec", "created", "last_site")
            for job_id, (spec, created, last_site) in zip(missing, rows, strict=True):
                req = Request.of(job_id, JobSpec.model_validate_json(spec)) if spec else None
                if req is not None and last_site:
                    req = req.relaxed(avoid_sites=frozenset({last_site}))
                self._requests[job_id] = req
                self.created[job_id] = int(created or 0)
            while len(self._requests) > MAX_REMEMBERED:
                dropped, _ = self._requests.popitem(last=False)
                self.created.pop(dropped, None)
        return [req for job_id in ids if (req := self._requests.get(job_id)) is not None]

    def unfit(self, job_id: str, version: int, reason: str) -> bool:
        """Remember that the job does not fit at `version`; whether `reason` is new (worth writing)."""
        previous = self._unfit.get(job_id)
        self._unfit[job_id] = (version, reason)
        return previous is None or previous[1] != reason

    def hold(self, held: dict[str, str]) -> dict[str, str]:
        """Remember jobs held back by their tenant's limit; returns the reasons that changed."""
        changed = {j: r for j, r in held.items() if self._unfit.get(j, (0, ""))[1] != r}
        for job_id, reason in held.items():
            self._unfit[job_id] = (HELD, reason)
        if len(self._unfit) > MAX_REMEMBERED:
            self._unfit.clear()  # entries of jobs that left the queue elsewhere; rebuilt as needed
        return changed

    def placed(self, job_id: str) -> int:
        """Forget a job that left the queue; returns its submission time (ms, 0 if unknown)."""
        self._unfit.pop(job_id, None)
        self._requests.pop(job_id, None)
        return self.created.pop(job_id, 0)

    def forget(self, job_id: str) -> None:
        self._requests.pop(job_id, None)
