"""Redis URLs: `redis+sentinel://` read into sentinels, master, database and credentials; a bad one is refused
naming the setting."""

from __future__ import annotations

import pytest
from redis.asyncio.sentinel import SentinelConnectionPool

from broker.state.connection import SentinelTarget, is_sentinel_url, redis_client
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


@pytest.mark.parametrize("url", [
    "redis+sentinel://s1/main/0",  # no port
    "redis+sentinel://s1:port/main/0",
    "redis+sentinel://s1:26379",  # no master
    "redis+sentinel://s1:26379/main/zero",
    "redis+sentinel://s1:99999/main/0",
    "redis://s1:6379/0",
])  # fmt: skip
def test_a_bad_sentinel_url_is_refused_naming_the_setting(url: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        SentinelTarget.parse(url)
    assert refused.value.field == "redis_url"


def test_a_sentinel_client_asks_the_sentinels_for_the_primary() -> None:
    assert is_sentinel_url("redis+sentinel://s1:26379/main") and not is_sentinel_url("redis://h:6379/0")
    client = redis_client("redis+sentinel://s1:26379,s2:26379/main/1", max_connections=8, timeout=3)
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool) and pool.service_name == "main"
    assert pool.connection_kwargs["db"] == 1 and pool.max_connections == 8
    plain = redis_client("redis://127.0.0.1:6379/3", max_connections=4)
    assert plain.connection_pool.connection_kwargs["db"] == 3
