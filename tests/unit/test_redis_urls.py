"""Redis URLs: `redis+sentinel://` read into sentinels, master, database and credentials; a bad one is refused
naming the setting."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import SSLConnection
from redis.asyncio.sentinel import SentinelConnectionPool

from broker.state.connection import ClusterTarget, SentinelTarget, is_cluster_url, is_sentinel_url, redis_client
from common.errors import InvalidInput


def test_a_sentinel_url_names_its_sentinels_master_and_database() -> None:
    target = SentinelTarget.parse("redis+sentinel://s1:26379,s2:26380,10.0.0.3:26381/suanwang/2")
    assert target.sentinels == (("s1", 26379), ("s2", 26380), ("10.0.0.3", 26381))
    assert (target.master, target.db, target.tls, target.password, target.username) == ("suanwang", 2, False,
                                                                                         None, None)


def test_credentials_tls_and_the_sentinels_own_password() -> None:
    target = SentinelTarget.parse("rediss+sentinel://ops:p%40ss@s1:26379/main?sentinel_password=sp&ssl_ca_certs=/ca.pem")
    assert (target.username, target.password, target.tls) == ("ops", "p@ss", True)
    assert target.sentinel_password == "sp"
    assert dict(target.options) == {"ssl_ca_certs": "/ca.pem"}
    assert SentinelTarget.parse("redis+sentinel://secret@s1:26379/main").password == "secret"
    assert SentinelTarget.parse("redis+sentinel://s1:26379/main").db == 0


@pytest.mark.parametrize(("parse", "url"), [
    (SentinelTarget.parse, "redis+sentinel://s1/main/0"),  # no port
    (SentinelTarget.parse, "redis+sentinel://s1:port/main/0"),
    (SentinelTarget.parse, "redis+sentinel://s1:26379"),  # no master
    (SentinelTarget.parse, "redis+sentinel://s1:26379/main/zero"),
    (SentinelTarget.parse, "redis+sentinel://s1:99999/main/0"),
    (SentinelTarget.parse, "redis://s1:6379/0"),
    (ClusterTarget.parse, "redis+cluster://n1/"),  # no port
    (ClusterTarget.parse, "redis+cluster://n1:port/"),
    (ClusterTarget.parse, "redis+cluster://n1:99999/"),
    (ClusterTarget.parse, "redis+cluster://n1:7000,/"),  # an empty address
    (ClusterTarget.parse, "redis+cluster://n1:7000/2"),  # a cluster has database 0 only
    (ClusterTarget.parse, "redis+cluster://n1:7000/?socket_timeout=3"),  # not a URL option here
    (ClusterTarget.parse, "redis://n1:7000/0"),
])  # fmt: skip
def test_a_bad_sentinel_or_cluster_url_is_refused_naming_the_setting(parse: Callable[[str], object], url: str
                                                                      ) -> None:  # fmt: skip
    with pytest.raises(InvalidInput) as refused:
        parse(url)
    assert refused.value.field == "redis_url"


def test_a_sentinel_client_asks_the_sentinels_for_the_primary() -> None:
    assert is_sentinel_url("redis+sentinel://s1:26379/main") and not is_sentinel_url("redis://h:6379/0")
    client = redis_client("redis+sentinel://s1:26379,s2:26379/main/1", max_connections=8, timeout=3)
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool) and pool.service_name == "main"
    assert pool.connection_kwargs["db"] == 1 and pool.max_connections == 8
    plain = redis_client("redis://127.0.0.1:6379/3", max_connections=4)
    assert plain.connection_pool.connection_kwargs["db"] == 3


# --------------------------------------------------------------------------- Redis Cluster


def test_a_cluster_url_names_the_nodes_to_start_from() -> None:
    target = ClusterTarget.parse("redis+cluster://n1:7000,n2:7001,[::1]:7002/")
    assert target.nodes == (("n1", 7000), ("n2", 7001), ("::1", 7002))
    assert (target.tls, target.username, target.password, target.options) == (False, None, None, ())
    assert ClusterTarget.parse("redis+cluster://n1:7000").nodes == (("n1", 7000),)
    assert ClusterTarget.parse("redis+cluster://n1:7000/0").nodes == (("n1", 7000),)
    assert is_cluster_url("rediss+cluster://n1:7000/") and not is_cluster_url("redis+sentinel://s1:26379/main")


def test_cluster_credentials_and_tls() -> None:
    target = ClusterTarget.parse("rediss+cluster://ops:p%40ss@n1:7000,n2:7000/?ssl_ca_certs=/ca.pem")
    assert (target.username, target.password, target.tls) == ("ops", "p@ss", True)
    assert dict(target.options) == {"ssl_ca_certs": "/ca.pem"}
    assert ClusterTarget.parse("redis+cluster://secret@n1:7000/").password == "secret"


def test_a_cluster_url_gives_a_cluster_client() -> None:
    client = redis_client("redis+cluster://n1:7000,n2:7001/", max_connections=8, timeout=3, socket_timeout=5)
    assert isinstance(client, RedisCluster)
    assert [(n.host, n.port) for n in client.startup_nodes] == [("n1", 7000), ("n2", 7001)]
    assert client.connection_kwargs["max_connections"] == 8 and client.connection_kwargs["socket_timeout"] == 5
    secure = redis_client("rediss+cluster://u:pw@n1:7000/")
    assert isinstance(secure, RedisCluster) and secure.connection_kwargs["connection_class"] is SSLConnection
    assert (secure.connection_kwargs["username"], secure.connection_kwargs["password"]) == ("u", "pw")
    with pytest.raises(InvalidInput):
        redis_client("redis+cluster://n1:7000/1")
