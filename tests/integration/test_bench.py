"""`suanwang bench` end to end, small: the open-loop and the batch modes place every job they offer and
report what they measured."""

from __future__ import annotations

from suanwang.bench import BenchOptions, run_bench
from suanwang.servers import MosquittoServer, RedisServer


async def test_open_loop_and_batch_benches_place_every_job(redis_server: RedisServer, mosquitto: MosquittoServer
                                                           ) -> None:  # fmt: skip
    def options(**mode: float) -> BenchOptions:
        return BenchOptions(redis_server.url, mosquitto.url, sites=16, heartbeat_s=2.0, **mode)  # type: ignore[arg-type]

    open_loop = await run_bench(options(jobs=60, rate=40.0))
    assert open_loop["mode"] == "open loop at 40 jobs/s" and open_loop["submit"] == "one job per POST"
    assert open_loop["jobs_submitted"] == open_loop["jobs_placed"] == 60 and open_loop["submit_errors"] == 0
    assert 20 <= open_loop["submits_per_s"] <= 60  # paced by the offer, not by the answers
    assert open_loop["submit_to_stream_ms"]["p99.9"] >= open_loop["submit_to_stream_ms"]["p50"] > 0
    batch = await run_bench(options(jobs=100, batch=25, concurrency=2))
    assert batch["submit"] == "batches of 25" and batch["mode"] == "closed loop"
    assert batch["jobs_submitted"] == batch["jobs_placed"] == 100 and batch["submit_errors"] == 0
    assert set(batch["cpu_ms_per_placement"]) == {"brokers", "sites", "redis", "mosquitto", "client"}
    assert batch["cpu_ms_per_placement"]["brokers"] > 0
    assert batch["refused_commits"] == 0, batch["refused_by_reason"]


async def test_the_bench_with_tokens_on_places_every_job(redis_server: RedisServer, mosquitto: MosquittoServer
                                                         ) -> None:  # fmt: skip
    """`--tokens`: the brokers require tokens; submits carry a user token, the stream an operator's."""
    report = await run_bench(BenchOptions(redis_server.url, mosquitto.url, sites=16, heartbeat_s=2.0, jobs=40,
                                          concurrency=4, tokens=True))  # fmt: skip
    assert report["auth"] == "tokens"
    assert report["jobs_submitted"] == report["jobs_placed"] == 40 and report["submit_errors"] == 0


async def test_the_bench_on_a_cluster_of_its_own_reports_redis_cpu_by_node(mosquitto: MosquittoServer) -> None:
    """`--shards 3`: the bench starts a real three-master Redis Cluster, places every job on it, and splits
    Redis's CPU per placement by node (the nodes' shares add up to the total)."""
    report = await run_bench(BenchOptions(None, mosquitto.url, sites=16, heartbeat_s=2.0, jobs=60, concurrency=4,
                                          shards=3))  # fmt: skip
    assert report["jobs_submitted"] == report["jobs_placed"] == 60 and report["submit_errors"] == 0
    by_node = report["redis_cpu_ms_per_placement_by_node"]
    assert report["redis_shards"] == len(by_node) == 3
    assert abs(sum(by_node.values()) - report["cpu_ms_per_placement"]["redis"]) <= 0.005
