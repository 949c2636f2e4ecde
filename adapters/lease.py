"""Assignments at sites that cannot start work themselves (nvidia-smi, npu-smi, Kubernetes nodes): leases.

Such a site has no scheduler Suanwang can hand a job to, so an assignment is a lease: the devices are
set aside for the job's duration (the site's operator gives the tenant access by its own means), the
site reports `running` at once and `completed` when the time is up, and a cancel ends the lease.
Refusing instead would not help: the broker would place the job on the same free devices again.

The site checks a lease against what it has free locally, so a broker whose view is stale (local
work just started) sees a rejection rather than an over-booked host. What the tenant then runs on
the leased devices shows up as local use in later inventory reads and is not taken back out (the
tools cannot say whose process it is): conservative, it can only make the site refuse, never
over-book.
"""

from __future__ import annotations

from adapters.ledger import Ledger


class LeaseKeeper(Ledger):
    """The ledger of a site's leases: devices set aside for a job's duration, reported running at once."""

    running_at_once = True
