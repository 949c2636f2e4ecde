"""Why a job fits nowhere: each site counted once, under the first filter its best pool fails.

The filters are the scan's own list, walked in order over every pool of the job's architectures, so
the reasons a user reads are the reasons the scan applied. A site whose pools get past several filters
is counted under the furthest one its best pool reached ("fewer than 8 devices free" rather than "no
pool with >= 80 GB" when one of its pools has the memory).
"""

from __future__ import annotations

import numpy as np

from broker.matching.filters import FILTERS, Active, Chunk
from broker.matching.plan import Plan
from broker.matching.request import NoFit


def explain(plan: Plan) -> NoFit:
    """Count, per reason, the sites whose best pool got no further than that filter, most common first."""
    req, snap = plan.req, plan.snap
    if not snap.sites:
        return NoFit(())
    if not plan.origin_known:
        return NoFit(((f"unknown origin {req.origin}", len(snap.sites)),))
    active = Active.of(plan)
    on = [f.active(plan) for f in FILTERS]
    best = np.full(len(snap.site_names), -1, np.int16)  # per site: filters its best pool passed, in order
    for table in plan.candidate_tables():
        n = table.size
        if n == 0:
            continue
        # a table ruled out by its model gets no device count (equivalent compute needs a catalog figure)
        chunk = Chunk.of(plan, table, np.arange(n), plan.need(table) if active.admits(plan, table) else 1)
        reached = np.zeros(n, np.int16)
        alive = np.ones(n, np.bool_)
        for f, is_on in zip(FILTERS, on, strict=True):
            if is_on:
                alive &= f.mask(plan, chunk)
                if not alive.any():
                    break
            reached += alive
        np.maximum.at(best, table.site_code[:n], reached)
    counts: dict[str, int] = {}
    for i, f in enumerate(FILTERS):
        n_sites = int(np.count_nonzero(best == i))
        if n_sites:
            label = f.label(req)
            counts[label] = counts.get(label, 0) + n_sites
    without = len(snap.sites) - int(np.count_nonzero(best >= 0))
    if without:
        counts[f"no {'/'.join(req.archs) if req.archs else 'usable'} pool"] = without
    return NoFit(tuple(sorted(counts.items(), key=lambda item: (-item[1], item[0]))))
