"""Provider reliability, pure: the score's properties, the matcher weighing it, and the batch matcher giving
exactly the one-at-a-time decisions while scores change between batches."""

from __future__ import annotations

import dataclasses
import itertools
import random
import re
from importlib import resources
from typing import Any

import pytest

from broker.matching import Decision, Request, batch_group, batch_shared, match
from broker.matching.request import BALANCED_SENSITIVE, BALANCED_TOLERANT
from broker.matching.snapshot import AGE_EVERY_MS, Snapshot
from broker.model.records import SiteRecord
from broker.model.reliability import (
    FLOOR,
    HALF_LIFE_MS,
    LOST_DH_BOUND,
    PRIOR_GOOD,
    Reliability,
    reliability_score,
    site_score,
)
from regions import load_geography
from tests.unit.test_batch_matching import compare, fleet, shape, snapshot_of

GEO = load_geography()
DAY = HALF_LIFE_MS


# --------------------------------------------------------------------------- the score


def test_a_new_site_scores_100_and_so_does_one_with_nothing_bad_on_record():
    """The prior makes a site with no history score 100; volume alone never moves it."""
    assert reliability_score(Reliability()) == 100.0
    assert reliability_score(Reliability(accepted=5000, completed=4000)) == 100.0
    assert site_score(None, 0) == 100.0


@pytest.mark.parametrize("kind", ["timed_out", "rejected", "failed", "lost", "lost_device_hours"])
def test_every_bad_outcome_lowers_the_score_and_more_lowers_it_more(kind):
    """Each kind of bad outcome lowers the score, monotonically in how many."""
    scores = [reliability_score(Reliability(completed=20, **{kind: n})) for n in (0, 1, 3, 10, 100)]
    assert scores[0] == 100.0
    assert all(a > b for a, b in itertools.pairwise(scores)), scores


def test_losing_work_weighs_more_than_failing_it_and_failing_more_than_a_timeout():
    """Lost work is worse than a failed job, a failed job worse than an assignment refused or not accepted."""
    base = {"accepted": 10, "completed": 10}
    lost, failed, timed_out, rejected = (reliability_score(Reliability(**base, **{k: 2})) for k in
                                         ("lost", "failed", "timed_out", "rejected"))  # fmt: skip
    assert lost < failed < timed_out == rejected < 100


def test_a_history_of_good_work_softens_a_failure():
    """One failure costs a new site about a quarter of its score, a site with 200 jobs done about a point."""
    new = reliability_score(Reliability(accepted=1, failed=1))
    seasoned = reliability_score(Reliability(accepted=201, completed=200, failed=1))
    assert 70 < new < 76 and 98.5 < seasoned < 100


def test_device_hours_lost_weigh_with_a_bound():
    """Device-hours lost add to the bad outcomes, but at most `LOST_DH_BOUND` of them however many."""
    small, large, huge = (Reliability(lost=1, lost_device_hours=h).bad for h in (10.0, 1_000.0, 1e9))
    assert 3.0 < small < large < huge <= 3.0 + LOST_DH_BOUND
    assert huge == pytest.approx(3.0 + LOST_DH_BOUND, rel=1e-6)


@pytest.mark.parametrize("n", [1, 10, 10_000, 10**9])
def test_the_score_is_bounded_and_never_zero(n):
    """Whatever the record, the score is within [FLOOR, 100]: a site is ranked down, never banned."""
    worst = Reliability(timed_out=n, rejected=n, failed=n, lost=n, lost_device_hours=n * 100.0)
    assert FLOOR <= reliability_score(worst) <= 100.0
    assert reliability_score(worst) > 0


def test_the_record_decays_back_towards_the_prior():
    """Counters halve every half-life, good and bad alike, so the score climbs back towards 100 and gets there."""
    bad = Reliability(accepted=3, completed=2, failed=4, lost=2, lost_device_hours=50, t=1_000)
    later = [bad.at(1_000 + d * DAY) for d in (0, 1, 2, 4, 8, 16)]
    assert later[1].failed == pytest.approx(2.0) and later[2].lost == pytest.approx(0.5)
    scores = [r.score for r in later]
    assert all(a <= b for a, b in itertools.pairwise(scores)) and scores[0] < scores[2] < scores[-1] == 100.0, scores
    assert bad.at(500) == bad  # never decays backwards in time
    assert site_score(bad, 1_000 + 16 * DAY) == 100.0


def test_the_record_reads_from_its_hash_fields():
    """The hash fields `transition.lua` writes give the record; absent ones are 0."""
    r = Reliability.from_fields({"t": "1700000000000", "failed": "1.5", "lost_device_hours": "16"})
    assert (r.failed, r.lost_device_hours, r.completed, r.t, r.updated) == (1.5, 16.0, 0.0, 1_700_000_000_000,
                                                                            1_700_000_000_000)  # fmt: skip
    view = r.as_dict()
    assert view["score"] == r.score and view["half_life_hours"] == 24 and view["failed"] == 1.5


def test_the_scripts_default_half_life_is_the_models():
    """transition.lua's half-life when none is passed is `HALF_LIFE_MS`, and the prior is what README states."""
    lua = (resources.files("broker.state") / "lua" / "transition.lua").read_text()
    found = re.search(r"tonumber\(ARGV\[9\] or ''\) or (\d+)", lua)
    assert found and int(found.group(1)) == HALF_LIFE_MS
    assert PRIOR_GOOD == 5.0


# --------------------------------------------------------------------------- matching


POOL = {"arch": "GPU", "model": "A100-80G", "memory_gb": 80, "per_node": 8, "interconnect": "nvlink",
        "stacks": ["cuda-12.4"], "price_cny_per_hour": 10.0}  # fmt: skip


def site(name: str, reliability: Reliability | None = None) -> SiteRecord:
    meta = {"pools": [POOL], "energy": {"pue": 1.2, "green_share": 0.5}, "latency_ms": {}}
    return SiteRecord(name, "guizhou", "guian", "online", 1, 1, meta,
                      {"t:A100-80G": 64, "x:A100-80G": 0, "a:A100-80G": 0}, reliability)  # fmt: skip


def request(job_id: str = "job-1", **changes: Any) -> Request:
    base = Request(job_id=job_id, archs=("GPU",), models=(), count=8, units=None, reference="", min_memory_gb=0,
                   origin="guiyang", max_latency_ms=None, max_price=None, workload="training")  # fmt: skip
    return dataclasses.replace(base, **changes)


def test_balanced_weighs_reliability_in_both_maps():
    assert BALANCED_TOLERANT["reliability"] == BALANCED_SENSITIVE["reliability"] == 0.1


@pytest.mark.parametrize("job_id", [f"job-{i}" for i in range(8)])
@pytest.mark.parametrize("workload", ["training", "inference"])
def test_of_two_equal_sites_the_unreliable_one_ranks_second_yet_stays_a_candidate(job_id, workload):
    """Whatever the job's tie-break, the site with a bad record ranks below its twin, and is still offered."""
    snap = snapshot_of([site("good"), site("flaky", Reliability(accepted=4, rejected=3, failed=1))])
    result = match(request(job_id, workload=workload), snap)
    assert isinstance(result, Decision)
    assert result.chosen.site == "good" and [c.site for c in result.runners_up] == ["flaky"]
    flaky = result.runners_up[0]
    assert flaky.reliability == flaky.scores["reliability"] < 100.0 == result.chosen.reliability
    assert flaky.as_dict()["reliability"] == flaky.reliability


def test_a_zero_weight_takes_reliability_out_and_a_single_weight_ranks_by_it():
    """`weights` override it like any score: zero drops it (the tie-break decides), alone it decides."""
    snap = snapshot_of([site("good"), site("flaky", Reliability(failed=3))])
    chosen = {match(request(f"j{i}", weights=(("reliability", 0.0),)), snap).chosen.site  # type: ignore[union-attr]
              for i in range(16)}  # fmt: skip
    assert chosen == {"good", "flaky"}
    only = request(policy="cheapest", weights=(("price", 0.0), ("reliability", 1.0)))
    result = match(only, snap)
    assert isinstance(result, Decision) and result.chosen.site == "good"
    assert set(result.chosen.scores) == {"reliability"}
    assert result.runners_up[0].scores == {"reliability": reliability_score(Reliability(failed=3))}


def test_the_view_ages_sites_with_a_bad_record_at_most_once_a_minute():
    """Aging visits only sites scoring under 100, waits `AGE_EVERY_MS` between rounds, and writes the new score
    on every row of the site."""
    record = Reliability(failed=4, t=10 * DAY)
    snap = snapshot_of([site("good"), site("flaky", record)])
    low = snap.sites["flaky"].reliability
    assert low == record.score and list(snap.unreliable) == ["flaky"]
    assert snap.age_reliability(10 * DAY + AGE_EVERY_MS) == 0  # the score did not move by a tenth yet
    assert snap.reliability_aged == 10 * DAY + AGE_EVERY_MS
    assert snap.age_reliability(10 * DAY + 2 * AGE_EVERY_MS - 1) == 0  # too soon: not even looked at
    assert snap.reliability_aged == 10 * DAY + AGE_EVERY_MS
    assert snap.age_reliability(12 * DAY) == 1
    table = snap.tables["A100-80G"]
    assert low < snap.sites["flaky"].reliability == table.reliability[table.index["flaky"]] < 100.0
    assert table.reliability[table.index["good"]] == 100.0


# --------------------------------------------------------------------------- the batch matcher


def _with_reliability(rng: random.Random, records: list[SiteRecord]) -> list[SiteRecord]:
    """Give about half the sites a record: a few bad outcomes of every kind, or none."""
    out = []
    for record in records:
        rel = None
        if rng.random() < 0.5:
            rel = Reliability(accepted=rng.choice((0, 3, 40)), completed=rng.choice((0, 2, 30)),
                              timed_out=rng.choice((0, 1)), rejected=rng.choice((0, 0, 2)),
                              failed=rng.choice((0, 1, 5)), lost=rng.choice((0, 0, 1)),
                              lost_device_hours=rng.choice((0.0, 12.0, 400.0)))  # fmt: skip
        out.append(dataclasses.replace(record, reliability=rel))
    return out


def _kinds(rng: random.Random, n: int) -> list[Request]:
    """Kinds of request; some weigh reliability heavily, some alone (a one-score policy)."""
    kinds = []
    for _ in range(n):
        kind = dataclasses.replace(shape(rng, []), avoid_sites=frozenset())
        pick = rng.random()
        if pick < 0.3:
            kind = dataclasses.replace(kind, policy="balanced", weights=(("reliability", 2.0),))
        elif pick < 0.4:
            kind = dataclasses.replace(kind, policy="cheapest", weights=(("price", 0.0), ("reliability", 1.0)))
        kinds.append(kind)
    return kinds


def _batch(rng: random.Random, kinds: list[Request], n: int, tag: str) -> list[Request]:
    return [dataclasses.replace(rng.choice(kinds), job_id=f"{tag}-{i}") for i in range(n)]


@pytest.mark.parametrize("seed", range(4))
def test_the_batch_gives_the_loops_decisions_with_reliability_scores(seed):
    """On 600 generated sites of which half have a record, batches give exactly the one-at-a-time decisions."""
    rng = random.Random(300 + seed)
    snap = snapshot_of(_with_reliability(rng, fleet(rng, 600)))
    compare(_batch(rng, _kinds(rng, 12), 256, f"r{seed}"), snap)


def _rescore(rng: random.Random, snap: Snapshot, records: list[SiteRecord]) -> None:
    """Between passes: a third of the sites' records change (and only those), as outcomes arrive."""
    for i in rng.sample(range(len(records)), len(records) // 3):
        records[i] = dataclasses.replace(records[i], reliability=Reliability(
            failed=rng.choice((0, 1, 3, 8)), lost=rng.choice((0, 0, 2)), completed=rng.choice((0, 5))))  # fmt: skip
        snap.apply(records[i])


def test_groups_kept_across_batches_read_changed_reliability_again():
    """Batches of the same kinds with sites' scores changing in between: a kept group (its tables' `gen` did
    not move) ranks by the new scores, exactly as the loop does."""
    rng = random.Random(41)
    records = _with_reliability(rng, fleet(rng, 400))
    snap = snapshot_of(records)
    kinds = _kinds(rng, 8)
    gens = {m: t.gen for m, t in snap.tables.items()}
    versions = {m: t.reliability_version for m, t in snap.tables.items()}
    for step in range(6):
        compare(_batch(rng, kinds, 96, f"k{step}"), snap)
        _rescore(rng, snap, records)
    assert {m: t.gen for m, t in snap.tables.items()} == gens, "a score alone does not bump a table's gen"
    assert all(t.reliability_version > versions[m] for m, t in snap.tables.items() if t.size > 20)
    assert batch_shared._lasting(snap).groups, "groups are kept for the next batch"


def test_comparison_fails_when_kept_groups_keep_old_reliability(monkeypatch):
    """The comparison can fail: kept groups that do not read the scores again disagree with the loop."""
    monkeypatch.setattr(batch_group.Group, "_reread_reliability", lambda self: None)
    with pytest.raises(AssertionError):
        test_groups_kept_across_batches_read_changed_reliability_again()
