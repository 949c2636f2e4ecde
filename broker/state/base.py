"""What every part of the store shares: the connection, the key layout and the Lua scripts."""

from __future__ import annotations

from importlib import resources

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from broker.state.keys import Keys

SCRIPTS = ("capacity", "site_status", "allocate", "transition", "submit", "reconcile", "archive", "waiting", "heads")


class StoreBase:
    redis: aioredis.Redis
    keys: Keys
    events_maxlen: int
    max_attempts: int

    def __init__(self, redis: aioredis.Redis, keys: Keys, events_maxlen: int = 100_000, max_attempts: int = 5) -> None:
        self.redis = redis
        self.keys = keys
        self.events_maxlen = events_maxlen
        self.max_attempts = max_attempts
        lua = resources.files("broker.state") / "lua"
        scripts = {name: redis.register_script((lua / f"{name}.lua").read_text()) for name in SCRIPTS}
        self._capacity: AsyncScript = scripts["capacity"]
        self._status: AsyncScript = scripts["site_status"]
        self._allocate: AsyncScript = scripts["allocate"]
        self._transition: AsyncScript = scripts["transition"]
        self._submit: AsyncScript = scripts["submit"]
        self._reconcile: AsyncScript = scripts["reconcile"]
        self._waiting: AsyncScript = scripts["waiting"]
        self._heads: AsyncScript = scripts["heads"]
        self._archive: AsyncScript = scripts["archive"]
        self.wake_seen = 0  # the `wake` generation as of the last changed_sites()
        self.usage: dict[str, int] = {}  # devices held per tenant, as of the last queue_heads()
        self.limits: dict[str, int] = {}  # most devices a tenant may hold, as of the last queue_heads()
