"""The store and the broker on a real Redis Cluster of three masters (`redis+cluster://`).

Every key of a namespace shares the hash tag `{namespace}`, so a namespace lives whole on the node serving
that slot; what has no key (TIME, INFO, WAIT, SCAN, transactions) goes there too. The tests use namespaces
on each of the three nodes, so a command sent to the wrong node shows.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import cast

import aiohttp
import pytest
from redis.exceptions import WatchError

from adapters.sim import run_sim
from broker.state.audit import audit_report
from broker.state.history import check_history
from broker.state.keys import Keys
from broker.state.store import Store
from broker.state.tokens import Tokens
from common.config import MqttTarget
from suanwang.servers import MosquittoServer, RedisClusterGroup, RedisServer
from tests.integration.test_end_to_end import HUB, get_json, job_body, job_when, online, submit
from tests.integration.test_holds import option
from tests.integration.test_store import MODEL, SITE, _overbooking_race, capacity, counters, placement, spec
from tests.support import running_broker


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterGroup]:
    group = RedisClusterGroup(masters=3)
    group.start()
    yield group
    group.cleanup()


def namespace_on(cluster: RedisClusterGroup, port: int) -> str:
    """A fresh namespace whose slot the node on `port` serves."""
    while True:
        namespace = f"t{uuid.uuid4().hex[:10]}"
        if cluster.node_for(Keys(namespace).prefix).port == port:
            return namespace


@pytest.fixture
async def store(cluster: RedisClusterGroup, namespace: str) -> AsyncIterator[Store]:
    store = Store.from_url(cluster.url, namespace)
    yield store
    await store.close()


def _reply_port(info: dict[str, object]) -> int:
    return int(cast(int, info["tcp_port"]))


async def test_commands_without_keys_go_to_the_node_serving_the_namespace(cluster: RedisClusterGroup) -> None:
    """INFO, TIME, SCAN and WAIT, alone or in a pipeline, and transactions reach the namespace's node, whichever
    of the three serves it."""
    for node in cluster.nodes:
        store = Store.from_url(cluster.url, namespace_on(cluster, node.port))
        try:
            for _ in range(3):  # redis-py alone picks a node at random for each
                assert _reply_port(await store.redis.info("server")) == node.port
                pipe = store.redis.pipeline(transaction=False)
                pipe.execute_command("INFO", "server")
                pipe.execute_command("WAIT", 0, 100)
                info, replicas = await pipe.execute()
                assert _reply_port(info) == node.port and replicas == 0
            assert await store.clock_ms() > 0
            # the namespace's first primary is the node's own replication id (INFO replication read there)
            assert await store.new_primary() == [] and await store.new_primary() == []
            assert await store.redis.get(store.keys.only.primary) == cluster.replication_id(node.port).encode()
            await store.redis.set(store.keys.only.job("x"), "1")
            cursor, found = await store.redis.scan(0, match=store.keys.prefix + ":*", count=1000)
            assert cursor == 0, "one cursor, as one Redis gives it"
            assert sorted(found) == sorted(k.encode() for k in (store.keys.only.job("x"), store.keys.only.primary))
            assert sorted([key async for key in store.redis.scan_iter(match=store.keys.prefix + ":*")]) == sorted(found)
            async with store.redis.pipeline(transaction=True) as watch:
                await watch.watch(store.keys.only.job("x"))
                await store.redis.set(store.keys.only.job("x"), "2")
                watch.multi()
                watch.get(store.keys.only.job("x"))
                with pytest.raises(WatchError):
                    await watch.execute()
        finally:
            await store.close()


async def test_the_store_runs_its_scripts_and_transactions_on_the_cluster(
    cluster: RedisClusterGroup, store: Store, namespace: str
) -> None:
    """Submit, allocate, the lifecycle, the reconcile list, a hold used by its job (one MULTI), tokens; then the
    audit and the history checker find nothing wrong."""
    assert await store.apply_capacity(capacity(1, {MODEL: (64, 0)}))
    await store.submit("j1", spec(count=8))
    (commit,) = await store.allocate([placement("j1", 8)], accept_timeout_ms=60_000)
    assert commit.ok and commit.attempt == 1
    assert await store.reconcile_list(SITE) == (commit.seq, [("j1", 1)])
    assert await store.transition("j1", "accepted", SITE, 1) == "assigned"
    assert await store.transition("j1", "running", SITE, 1) == "running"
    assert await store.transition("j1", "completed", SITE, 1) == "completed"
    assert await store.transition("j1", "completed", SITE, 1) == "", "a duplicate changes nothing"

    held = spec(count=8)
    taken = await store.take_hold("h1", "default", [option()], 60_000, held.placement_hash())
    assert taken.hold is not None and taken.hold.standing
    result = await store.submit_held("j2", held.model_copy(update={"hold": "h1"}), 30_000)
    assert not isinstance(result, Exception)
    record, created, placed = result
    assert created and placed is not None and placed.ok and record["state"] == "assigned"
    assert await store.take_hold("h2", "default", [option()], 60_000, held.placement_hash())
    assert await store.release_hold("h2") and not await store.release_hold("h2")
    assert (await counters(store))[f"a:{MODEL}"] == 8, "only j2 holds devices"
    assert sorted(j for j, _ in (await store.reconcile_list(SITE))[1]) == ["j2"]

    tokens = Tokens(store.redis, store.keys)
    token, identity = await tokens.create("user", "default", "cluster")
    assert (await tokens.lookup(token)) == identity
    assert (await tokens.revoke(identity.id)).id == identity.id

    report = await audit_report(store, page=2)
    assert report.violations == [] and report.warnings == []
    history = await check_history(store)
    assert history.violations == () and history.jobs == 2
    where = cluster.keys_per_node(store.keys.prefix + ":*")
    home = cluster.node_for(store.keys.prefix).port
    print(f"\nnamespace {namespace}: keys per node {where}; home node {home}")
    assert where[home] > 0 and sum(where.values()) == where[home]


async def test_a_burst_of_calls_waits_for_a_connection(cluster: RedisClusterGroup, namespace: str) -> None:
    """200 concurrent allocations through a store of 8 connections a node all run (none fails for want of a
    connection), and exactly the 33 that fit win."""
    store = Store.from_url(cluster.url, namespace, max_connections=8)
    try:
        await _overbooking_race(store)
    finally:
        await store.close()


async def test_a_job_is_placed_runs_and_completes_through_a_broker_on_the_cluster(
    cluster: RedisClusterGroup, own_mosquitto: MosquittoServer, namespace: str
) -> None:
    """A broker on the cluster URL places a job on a simulated site; it runs and completes."""
    # MQTT topics are not namespaced: a Mosquitto of its own keeps other tests' retained sites away
    stop = asyncio.Event()
    sim = asyncio.create_task(run_sim(MqttTarget.from_url(own_mosquitto.url), HUB, 2, time_scale=7200.0,
                                      interval=0.5, stop=stop))  # fmt: skip
    try:
        # running_broker reads only `.url` of the server it is given
        async with running_broker(cast(RedisServer, cluster), own_mosquitto, namespace) as broker, \
                aiohttp.ClientSession(base_url=broker.url) as http:  # fmt: skip
            model = "Ascend-910B"
            await online(http, "guian-01", model)
            job_id = await submit(http, job_body(8, arch="ASIC", models=(model,)))
            view = await job_when(http, job_id, lambda j: j["state"] == "completed", timeout=30)
            assert view["allocation"]["devices"] == 8 and view["allocation"]["site"].startswith("guian-")
            status, health = await get_json(http, "/healthz")
            assert status == 200, health
    finally:
        stop.set()
        await asyncio.wait_for(sim, 15)
    where = cluster.keys_per_node(Keys(namespace).prefix + ":*")
    print(f"\nbroker namespace {namespace}: keys per node {where} (all on the node serving {{{namespace}}})")
    assert sorted(where.values())[:2] == [0, 0]
    assert cluster.keys_per_node("{*") == cluster.keys_per_node(), "every key in the cluster is under a hash tag"
