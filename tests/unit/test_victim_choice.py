"""The rule that picks a preemption's victims: preemptible lower-priority work only; tenants above their fair
share first; then the lowest priority; then the least work lost; as few as needed."""

from __future__ import annotations

from broker.scheduling.preemption import choose_victims, fair_share
from broker.state.holds import Holding

NOW = 1_000_000


def held(job: str, *, tenant: str = "a", priority: str = "low", count: int = 4, running_s: float = 60,
         preemptible: bool = True, model: str = "A100-80G") -> Holding:  # fmt: skip
    return Holding(job, 1, "running", model, count, priority, tenant, preemptible, NOW - int(running_s * 1000), 0)


def picked(holdings: list[Holding], need: int, priority: str = "high", usage: dict[str, int] | None = None
           ) -> list[str] | None:  # fmt: skip
    chosen = choose_victims(holdings, "A100-80G", need, priority, usage or {"a": 8}, NOW)
    return None if chosen is None else [h.job for h in chosen]


def test_only_preemptible_work_of_lower_priority_on_the_model_is_taken() -> None:
    jobs = [held("steady", preemptible=False), held("peer", priority="high"), held("other", model="H800"),
            held("ok")]  # fmt: skip
    assert picked(jobs, 4) == ["ok"]
    assert picked(jobs, 8) is None, "not enough preemptible work: nothing is preempted"
    assert picked([held("normal", priority="normal")], 4, priority="normal") is None


def test_least_work_lost_first_and_no_more_than_needed() -> None:
    jobs = [held("long", running_s=3600), held("short", running_s=60), held("mid", running_s=600)]
    assert picked(jobs, 4) == ["short"]
    assert picked(jobs, 8) == ["short", "mid"]


def test_lowest_priority_before_less_work_lost() -> None:
    jobs = [held("normal-new", priority="normal", running_s=1), held("low-old", priority="low", running_s=9000)]
    assert picked(jobs, 4) == ["low-old"]


def test_a_tenant_within_its_fair_share_is_preempted_last() -> None:
    usage = {"big": 12, "small": 4}  # fair share 8: big is above it, small within
    jobs = [held("small-job", tenant="small", running_s=1), held("big-job", tenant="big", running_s=9000)]
    assert picked(jobs, 4, usage=usage) == ["big-job"]
    assert fair_share(usage) == 8 and fair_share({}) == 0
