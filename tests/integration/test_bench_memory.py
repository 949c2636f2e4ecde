"""`suanwang bench --memory`, small: the CLI loads a private Redis, measures a real broker process on it, and
reports every figure, with the queue left as loaded."""

from __future__ import annotations

import os
import subprocess
import sys

import orjson

from suanwang.servers import mosquitto_available


def test_memory_bench_reports_broker_and_redis_memory_for_the_loaded_network() -> None:
    """200 sites and 2,000 jobs: every job is looked at and none placed, and the memory figures are sane."""
    assert mosquitto_available()
    env = {k: v for k, v in os.environ.items() if k not in ("SUANWANG_REDIS_URL", "SUANWANG_MQTT_URL")}
    done = subprocess.run([sys.executable, "-m", "suanwang.cli", "bench", "--memory", "200,2000", "--json"],
                          env=env, capture_output=True, timeout=90, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:] + done.stdout.decode()[-2000:]
    report = orjson.loads(done.stdout)
    assert report["mode"] == "memory" and report["sites"] == 200
    # nothing could be placed: the queue in Redis is what was loaded, and the broker looked at all of it
    assert report["queued_loaded"] == report["queued_in_redis"] == report["jobs_looked_at"] == 2000
    assert report["load_sites_per_s"] > 0 and report["load_jobs_per_s"] > 0
    assert 0 < report["broker_snapshot_loaded_s"] <= report["broker_ready_s"] < 60
    assert 0 < report["broker_first_pass_s"] <= report["broker_ready_s"]
    samples = report["broker_rss_samples_mb"]
    assert len(samples) == 3 and all(20 < mb < 2000 for mb in samples)
    assert min(samples) <= report["broker_rss_mb"] <= max(samples) <= report["broker_peak_rss_mb"]
    assert 0 < report["redis_used_memory_mb"] <= report["redis_used_memory_peak_mb"]
    # a job's record, its queue entries and history: hundreds of bytes to a few kilobytes, not nothing
    assert 500 < report["redis_bytes_per_queued_job"] < 20_000
    assert report["redis_bytes_per_site"] > 0
    assert report["redis_keys"] > 2000  # at least one hash per job
    timeline = report["broker_rss_timeline"]
    assert timeline and timeline[-1][2] == 2000 and all(point[1] > 0 for point in timeline)
