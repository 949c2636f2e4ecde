"""Job shards' keys: where a tenant's and a job's keys live, and how the shards' tags spread over the slots."""

from __future__ import annotations

import pytest
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from broker.state.keys import Keys


def test_one_job_shard_keeps_the_namespaces_own_tag_and_plain_ids() -> None:
    keys = Keys("sw")
    assert keys.only.prefix == keys.prefix == "{sw}"
    assert keys.with_shard("j1", "acme") == "j1" and keys.for_id("j1.3") is keys.only


@pytest.mark.parametrize("count", [2, 3, 4, 6, 12])
def test_each_shards_tag_lies_in_its_own_equal_range_of_the_slots(count: int) -> None:
    keys = Keys("sw", count)
    for sk in keys.each_shard:
        slot = key_slot(sk.prefix.encode())
        assert REDIS_CLUSTER_HASH_SLOTS * sk.index // count <= slot < REDIS_CLUSTER_HASH_SLOTS * (sk.index + 1) // count
    assert [sk.prefix for sk in Keys("sw", count).each_shard] == [sk.prefix for sk in keys.each_shard], "fixed"
    assert len({sk.prefix for sk in keys.each_shard}) == count


def test_a_jobs_id_names_its_tenants_shard() -> None:
    keys = Keys("sw", 4)
    tenants = [f"t{i}" for i in range(200)]
    assert {keys.shard_index(t) for t in tenants} == {0, 1, 2, 3}
    for tenant in tenants[:20]:
        job = keys.with_shard("j0193", tenant)
        assert keys.for_id(job) is keys.for_tenant(tenant)
        assert keys.for_owner(f"hold:{keys.with_shard('h1', tenant)}") is keys.for_tenant(tenant)
        step = "\t".join(["release", "guizhou", "guian-01", job, "1"])
        assert keys.for_step(step).outbox == keys.for_tenant(tenant).outbox
    assert keys.id_shard("j1") == 0 and keys.id_shard("j1.9") == 0, "no shard named: the first"
    with pytest.raises(ValueError):
        Keys("sw", 0)
