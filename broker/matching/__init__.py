"""The pure matcher: which pool a job should go to now, or why none fits. No I/O anywhere in here.

`match` chooses, `explain` says why not, both by the one list of filters in `filters`; `match_batch`
gives the decisions of matching a whole batch in turn, for a fraction of the work; `quote` ranks the
places a job could go and what would widen them; `snapshot` holds the pools they read.
"""

from broker.matching.batch import match_batch, match_in_turn
from broker.matching.explain import explain
from broker.matching.filters import FILTERS
from broker.matching.plan import Plan
from broker.matching.request import (
    BALANCED_SENSITIVE,
    BALANCED_TOLERANT,
    CHUNK,
    LIMIT,
    POLICIES,
    RUNNERS_UP,
    Candidate,
    Decision,
    NoFit,
    Request,
)
from broker.matching.scan import match

__all__ = [
    "BALANCED_SENSITIVE",
    "BALANCED_TOLERANT",
    "CHUNK",
    "FILTERS",
    "LIMIT",
    "POLICIES",
    "RUNNERS_UP",
    "Candidate",
    "Decision",
    "NoFit",
    "Plan",
    "Request",
    "explain",
    "match",
    "match_batch",
    "match_in_turn",
]
