"""`suanwang bench --soak`, short: it kills every part of the system once, measures each recovery and reports
a clean run; servers given by URL are left alone."""

from __future__ import annotations

import pytest

from suanwang.servers import MosquittoServer, RedisServer
from suanwang.soak import SoakOptions, run_soak

pytestmark = pytest.mark.timeout(180)

SERVER_FAULTS = ("redis_kill", "broker_kill", "mosquitto_kill")


async def test_a_short_soak_kills_redis_mosquitto_a_broker_and_sites_and_loses_nothing() -> None:
    """24 s at 10 jobs/s: site processes, redis-server (restarted from its AOF, `appendfsync always`), a broker
    and Mosquitto are each killed with SIGKILL; every acknowledged job is in Redis and finished, the audit and
    the history checker find nothing, the API answered 503 while Redis was down and no other 5xx, and the time
    to recover from each kill was measured."""
    report = await run_soak(SoakOptions(seconds=24, rate=10))
    assert report["clean"], report["problems"]
    assert report["redis_appendfsync"] == "always"
    assert {fault: report["faults"].get(fault) for fault in SERVER_FAULTS} == dict.fromkeys(SERVER_FAULTS, 1)
    assert report["faults"]["site_process_kill"] >= 1 and not report["faults_skipped"]
    assert report["jobs_submitted"] == 240 and report["jobs_not_acknowledged"] == 0
    assert report["lost_jobs"] == 0 and report["double_allocations"] == 0 and not report["audit_violations"]
    assert report["history_violations"] == 0 and report["history"]["jobs"] == 240
    assert report["http_5xx"]["503_while_redis_down"] > 0, "no submission met the Redis outage"
    assert not report["http_5xx"]["other_5xx"] and not report["http_5xx"]["503_with_redis_up"]
    for outage in report["fault_log"]:
        assert outage["down_s"] >= 1.0, outage
        assert None not in (outage["api_2xx_s"], outage["next_placement_s"], outage["healthy_s"]), outage
        if outage["fault"] == "redis_kill":  # nothing answers or is placed before Redis is back
            assert outage["api_2xx_s"] >= outage["down_s"] and outage["next_placement_s"] >= outage["down_s"]


async def test_servers_given_by_url_are_not_killed(redis_server: RedisServer, mosquitto: MosquittoServer) -> None:
    """With --redis and --mqtt the soak kills only its own processes (sites and a broker), and says which kills
    it skipped and why."""
    report = await run_soak(SoakOptions(redis_url=redis_server.url, mqtt_url=mosquitto.url, seconds=12, rate=5))
    assert report["clean"], report["problems"]
    assert set(report["faults_skipped"]) == {"redis_kill", "mosquitto_kill"}
    assert "given by URL" in report["faults_skipped"]["redis_kill"]
    assert report["faults"].get("broker_kill") == 1 and "redis_kill" not in report["faults"]
    assert redis_server.proc is not None and redis_server.proc.poll() is None
    assert mosquitto.proc is not None and mosquitto.proc.poll() is None
