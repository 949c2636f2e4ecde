"""The soak's fault schedule and its judgements (503 answers, sites' accepts against the log), without servers."""

from __future__ import annotations

import itertools
import random

import pytest

from suanwang.soak import EXPIRED, Client, FaultLog, Outage, SoakOptions, Wire, accepts, fault_plan, unexpected_503


@pytest.mark.parametrize(
    ("seconds", "kills"),
    [
        (60.0, {"redis_kill": 1, "broker_kill": 1, "mosquitto_kill": 1}),
        (120.0, {"redis_kill": 2, "broker_kill": 1, "mosquitto_kill": 2}),
        (30.0, {"redis_kill": 0, "broker_kill": 1, "mosquitto_kill": 1}),
        (20.0, {"redis_kill": 1}),
    ],
)
def test_faults_are_spread_over_the_middle_of_the_run(seconds: float, kills: dict[str, int]) -> None:
    """Every fault asked for comes once, inside the middle 80% of the run, in order, each at least most of a
    slot after the one before, and no kind twice in a row while another kind is left."""
    for seed in range(20):
        plan = fault_plan(seconds, kills, random.Random(seed))
        assert sorted(kind for _, kind in plan) == sorted(k for k, n in kills.items() for _ in range(n))
        times = [at for at, _ in plan]
        assert times == sorted(times)
        assert all(0.1 * seconds <= at <= 0.9 * seconds for at in times), times
        slot = 0.8 * seconds / len(plan)
        assert all(b - a >= 0.8 * slot for a, b in itertools.pairwise(times)), times
        kinds = [kind for _, kind in plan]
        repeats = [a for a, b in itertools.pairwise(kinds) if a == b]
        assert not repeats or set(kinds[kinds.index(repeats[0]) :]) == {repeats[0]}, kinds


def test_no_faults_make_an_empty_plan() -> None:
    """With nothing to kill there is nothing to schedule."""
    assert fault_plan(60.0, {"redis_kill": 0, "broker_kill": 0}, random.Random(1)) == []


@pytest.mark.parametrize(
    ("options", "ours", "kills"),
    [
        (SoakOptions(seconds=60), (True, True), {"redis_kill": 1, "broker_kill": 1, "mosquitto_kill": 1}),
        (SoakOptions(seconds=300), (True, True), {"redis_kill": 2, "broker_kill": 1, "mosquitto_kill": 2}),
        (SoakOptions(seconds=300), (False, False), {"redis_kill": 0, "broker_kill": 1, "mosquitto_kill": 0}),
        (SoakOptions(seconds=60, redis_kills=2, mosquitto_kills=0, broker_kill=False), (True, True),
         {"redis_kill": 2, "broker_kill": 0, "mosquitto_kill": 0}),
        (SoakOptions(seconds=60, redis_kills=2), (False, True), {"redis_kill": 0, "broker_kill": 1,
                                                                 "mosquitto_kill": 1}),
    ],
)  # fmt: skip
def test_servers_given_by_url_are_never_killed(options: SoakOptions, ours: tuple[bool, bool],
                                               kills: dict[str, int]) -> None:  # fmt: skip
    """Redis and Mosquitto are killed once a run (twice from two minutes), and only when the soak started them."""
    assert options.kills(*ours) == kills


def test_a_503_is_expected_only_while_redis_is_down() -> None:
    """A 503 between a Redis kill and a moment after every replica answered again belongs to the outage; one
    before the kill, long after it, or after a Mosquitto kill is a finding."""
    log = FaultLog(started=1000.0)
    log.outages += [Outage("redis_kill", 10.0, 1010.0, api_2xx_s=3.0), Outage("mosquitto_kill", 30.0, 1030.0,
                                                                               api_2xx_s=0.1)]  # fmt: skip
    client = Client(["http://127.0.0.1:1"])
    client.unavailable = [(at, f"at {at}") for at in (1009.0, 1010.0, 1012.5, 1013.9, 1015.0, 1030.05)]
    assert [at for at, _ in unexpected_503(client, log)] == [1009.0, 1015.0, 1030.05]


def test_a_redis_that_never_came_back_explains_every_later_503() -> None:
    """With no 2xx after the kill, every 503 from the kill on is the outage's."""
    log = FaultLog(started=0.0)
    log.outages.append(Outage("redis_kill", 10.0, 10.0))
    client = Client(["http://127.0.0.1:1"])
    client.unavailable = [(5.0, ""), (11.0, ""), (500.0, "")]
    assert [at for at, _ in unexpected_503(client, log)] == [5.0]


def _accepted(job: str, attempt: int) -> dict[str, object]:
    return {"event": "accepted", "job": job, "attempt": attempt, "site": "guian-01"}


def test_an_accept_on_the_wire_before_the_expiry_is_the_brokers_fault() -> None:
    """An attempt the site accepted (seen on MQTT) and the broker then expired as not accepted is a finding,
    unless a server or broker was being killed or recovering meanwhile; an accept the log applied gives its lag;
    an expiry with no accept on the wire, or with one only after it, is the site's business."""
    log = FaultLog(started=0.0)
    log.outages.append(Outage("redis_kill", 201.0, 201.0, healthy_s=5.0))
    wire = Wire("mqtt://127.0.0.1:1")
    wire.events = [(100.0, _accepted("j1", 1)), (100.0, _accepted("j2", 1)), (200.0, _accepted("j3", 1)),
                   (104.0, _accepted("j5", 1)), (100.0, _accepted("j1", 1))]  # fmt: skip
    reason = f"the site {EXPIRED}"
    stream = [
        ("100050-0", {"type": "accepted", "job": "j1", "attempt": "1", "site": "guian-01"}),
        ("103000-0", {"type": "released", "job": "j2", "attempt": "1", "reason": reason}),
        ("103000-1", {"type": "requeued", "job": "j2", "attempt": "1", "site": "guian-01", "reason": reason}),
        ("203000-0", {"type": "requeued", "job": "j3", "attempt": "1", "reason": reason}),
        ("103000-2", {"type": "requeued", "job": "j4", "attempt": "1", "reason": reason}),
        ("103000-3", {"type": "failed", "job": "j5", "attempt": "1", "reason": f"gave up after 5 attempts; {reason}"}),
        ("103000-4", {"type": "requeued", "job": "j1", "attempt": "2", "reason": reason}),
    ]
    found = accepts(stream, wire, log)
    assert found.lags == [pytest.approx(0.05)]
    assert found.expired == [{"job": "j2", "attempt": 1, "site": "guian-01", "accepted_on_wire_s": 100.0,
                              "expired_s": 103.0}]  # fmt: skip
    assert found.during_recovery == 1
