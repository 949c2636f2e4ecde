"""Matching a pass's whole batch at once, with exactly the decisions of matching its jobs one at a time.

The loop the scheduler ran is: `match` a job, take its devices in the snapshot, match the next job. This
module gives the same results for every job (chosen site, model, row, devices, price, scores, the
runners-up in order, NoFit reasons, and the allocations left behind) for less work per job, because the
jobs of a batch mostly ask the same things and most of what `match` computes does not change between
them.

Groups. Jobs that ask the same thing share a group: every request field counts but the job id, the name
and the duration, and, for a policy that mixes scores, the device count and (unless the policy visits
the nearest pools first) the origin. A group visits pools in the scan's own order (its segments, chunk
by chunk) and prepares only as many chunks as its jobs reach: one pass per table runs the filters a wait
cannot change (every filter of `FILTERS` but capacity, the reserved pool and avoided sites, through the
filters' own functions) and keeps the rows that pass as flat numpy columns: price, free devices and free
modulo the node size, devices per node, site, tie-break hash, the chunk each row is in, and the weighted
scores that are the same for every job (speed, green, west). Each origin adds the latency, the latency
filter's outcome and the latency score.

The sequential part, per job. Capacity (`free >= devices`, free as the batch's earlier takes left it),
the late filters and the reserved pool (`exclude_for(req)`, asked at the job's turn) mark the job's
feasible rows; counting them per chunk (`bincount`) finds the chunk where the scan's count reaches
`limit`, which ends the rows the job considers (a one-score policy instead replays the scan's stop
rules chunk by chunk: a hit in a segment in key order ends it, later segments that cannot beat the best
are skipped). The cheapest considered row sets the price score. A proxy of the total (the fixed scores
summed ahead, the price score in one multiply, the packing score from free modulo the node size) ranks
the rows with a few vector operations; only the rows within `MARGIN` of the `keep`-th best site's best
are scored exactly, with the scan's arithmetic (the same operations in the same order on the same
dtypes), and ordered as the scan orders them: by total, then the job's tie-break, then the order of the
visit. The proxy differs from the exact total by about 1e-13 on a 0-100 scale, far less than the margin,
so the exact best sites are always in that set; ties are common (cloned sites, prices in cents) and are
broken exactly. A NoFit is `explain` with the job's own plan: the same filter list, the same reasons.

Takes. A decision takes its devices in the snapshot at once (`allocated[row] += devices`: the
scheduler's optimistic take) and stamps the pool with the take's number; before its next job a group
reads the free count again for the rows stamped since it last looked. So a later job sees exactly what
the loop would show it.

Memory. A group holds only rows that passed its fixed filters and only as far as its jobs looked (about
`limit` rows for a mixed policy, a chunk or a few for a one-score policy), never a jobs x rows matrix;
past `BUDGET` prepared rows in all (about 130 MB) the least recently used groups are dropped and made
again if a later job needs them.

Groups outlive the batch. The scheduler's passes see the same kinds of job again and again, so a group is
kept for later batches (`batch_shared`) and used again while nothing but the counts changed in its tables:
every table has a `gen` that a new row, a price, a place, a pool's facts or a site going on or off line
bumps, and a kept group whose tables moved is dropped. A kept group reads its rows' free counts afresh
when a batch first uses it; its fixed filters read nothing the counts change. Preparing is then paid
once per kind, not once per pass.

Jobs the groups do not handle go to `match` on the live snapshot, which is exact by definition: sites to
avoid (a job given back), an unknown origin, a packing-only policy, a mixed policy over a pool priced at
zero, a job with datasets (its price and speed scores count moving the data to each site). Plans' lookups,
admitted tables and nearest-first segments outlive the batch (`batch_shared`), checked against the snapshot's
structure and price and place orders.

`match_in_turn` yields each result as soon as it is decided, so the caller may act between jobs (hold a
pool for a blocked gang after a NoFit, which changes `exclude_for` for the jobs after it). The snapshot
must not change during a batch other than by the batch's own takes.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from broker.matching import batch_group
from broker.matching.batch_group import Group
from broker.matching.batch_shared import Shared
from broker.matching.request import LIMIT, RUNNERS_UP, Decision, NoFit, Request
from broker.matching.scan import match
from broker.matching.snapshot import Snapshot

ExcludeFor = Callable[[Request], tuple[str, int] | None]
# jobs of one kind in a batch for which a group is prepared (fewer: `match` decides them); since groups are
# kept for later passes, even one job's group pays for itself
MIN_JOBS = 1


def match_batch(requests: Sequence[Request], snap: Snapshot, *, exclude_for: ExcludeFor | None = None,
                limit: int = LIMIT, keep: int = RUNNERS_UP + 1) -> list[Decision | NoFit]:  # fmt: skip
    """The decisions of matching `requests` in order, each placement taken in `snap` before the next job."""
    return list(match_in_turn(requests, snap, exclude_for=exclude_for, limit=limit, keep=keep))


def match_in_turn(requests: Sequence[Request], snap: Snapshot, *, exclude_for: ExcludeFor | None = None,
                  limit: int = LIMIT, keep: int = RUNNERS_UP + 1) -> Iterator[Decision | NoFit]:  # fmt: skip
    """Each request's decision in order, yielded once its devices are taken in `snap`.

    `exclude_for(req)` names the pool (model, row) the job may not use; it is asked when the job's turn
    comes, so it may change between jobs (a pool held for a blocked gang after an earlier NoFit)."""
    batch = _Batch(snap, requests, exclude_for, limit, keep)
    for req in requests:
        yield batch.decide(req)


class _Batch:
    """One batch: its groups (least recently used first) around what they share."""

    def __init__(self, snap: Snapshot, requests: Sequence[Request], exclude_for: ExcludeFor | None, limit: int,
                 keep: int) -> None:  # fmt: skip
        self.shared = Shared(snap, limit, keep)
        self.exclude_for = exclude_for
        self.groups: OrderedDict[tuple[Any, ...], Group] = self.shared.lasting.groups  # kept for later batches
        # jobs of each kind still to come: a kind with few left is not worth a group's preparation
        self.left = Counter(key for key in map(self._key, requests) if key is not None)

    def decide(self, req: Request) -> Decision | NoFit:
        shared = self.shared
        exclude = self.exclude_for(req) if self.exclude_for is not None else None
        group = self._group(req)
        result = group.decide(req, exclude) if group is not None else None
        if result is None:
            result = match(req, shared.snap, limit=shared.limit, keep=shared.keep, exclude=exclude)
        if isinstance(result, Decision):
            shared.take(result)
        return result

    def _key(self, req: Request) -> tuple[Any, ...] | None:
        """What the job's group is keyed by, or None when `match` must decide it."""
        snap = self.shared.snap
        if req.origin not in snap.origins or any(s in snap.sites for s in req.avoid_sites):
            return None
        if req.datasets:
            return None  # data to move: its transfer is per site and cluster, which no group prepares
        weights = self.shared.weights(req)
        single = len(weights) == 1
        order = next(iter(weights)) if single else max(weights, key=lambda k: weights[k])
        if single and order == "packing":
            return None  # the visiting key would be the packing score, which takes change
        shared_count = not single and req.count is not None and not req.whole_nodes
        return (
            self.shared.limit, self.shared.keep, req.archs, req.models, req.units, req.reference, req.min_memory_gb,
            req.max_latency_ms, req.max_price,
            req.workload, req.software, req.interconnect, req.whole_nodes, req.allow_hubs, req.deny_hubs,
            req.allow_provinces, req.deny_provinces, req.domestic_only, req.policy, req.weights,
            req.origin if single or order == "latency" else None, None if shared_count else req.count,
        )  # fmt: skip

    def _group(self, req: Request) -> Group | None:
        """The job's group (made on first use), or None when `match` should decide it."""
        key = self._key(req)
        if key is None:
            return None
        left = self.left[key]
        self.left[key] = left - 1
        group = self._kept(key)
        if group is None:
            if left < MIN_JOBS:
                return None  # one or two jobs of a kind: `match` costs less than preparing a group
            group = self.groups[key] = Group(self.shared, req, fixed_count=key[-1] is not None or req.count is None)
        if not group.count_free:  # the visiting order depends on the count: one group per count
            key = (*key, req.count)
            group = self._kept(key) or Group(self.shared, req, fixed_count=True)
            self.groups[key] = group
        self.groups.move_to_end(key)
        self._trim()
        return None if group.unsupported else group

    def _kept(self, key: tuple[Any, ...]) -> Group | None:
        """The group made for `key` in this batch or, still valid, in an earlier one."""
        group = self.groups.get(key)
        if group is None or group.shared is self.shared:
            return group
        if group.rebind(self.shared):
            return group
        del self.groups[key]
        self.shared.rows_held -= group.size + group.pending_rows
        return None

    def _trim(self) -> None:
        """Past the budget of prepared rows, forget the least recently used groups (made again if needed)."""
        shared = self.shared
        while shared.rows_held > batch_group.BUDGET and len(self.groups) > 1:
            _, group = self.groups.popitem(last=False)
            shared.rows_held -= group.size + group.pending_rows
