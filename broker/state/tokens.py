"""API tokens in Redis. A token is shown once when it is made; Redis keeps only its SHA-256, so a copy
of the database gives no working token.

Each replica remembers, for a short time, the tokens it found valid (`VALID_TTL_S`: a revoked token stops
working on every replica within that time) and the ones it found unknown (`UNKNOWN_TTL_S`: a client
repeating a bad or revoked token is answered without asking Redis each time). Both caches are bounded;
the oldest entries go first.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import redis.asyncio as aioredis

from broker.model.identity import ROLES, TOKEN_PREFIX, Identity, check_tenant, digest
from broker.state.connection import now_ms, text, translated
from broker.state.keys import Keys
from common.errors import InvalidInput, NotFound

VALID_TTL_S = 2.0  # a revoked token stops working on every replica within this time
UNKNOWN_TTL_S = 5.0  # a token Redis does not know is not asked about again for this long
CACHE_MAX = 10_000  # entries per cache

V = TypeVar("V")


def _decoded(raw: Any) -> dict[str, str]:
    return {text(k): text(v) for k, v in raw.items()}


class ExpiringCache(Generic[V]):
    """At most `size` entries, each kept `ttl_s` seconds; when full, the oldest entry goes, so memory stays
    bounded whatever callers send."""

    def __init__(self, ttl_s: float, size: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.size = size
        self.clock = clock
        self._entries: OrderedDict[str, tuple[float, V]] = OrderedDict()

    def get(self, key: str) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= self.clock():
            del self._entries[key]
            return None
        return entry[1]

    def put(self, key: str, value: V) -> None:
        self._entries.pop(key, None)
        self._entries[key] = (self.clock() + self.ttl_s, value)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def pop(self, key: str) -> None:
        self._entries.pop(key, None)

    def __len__(self) -> int:
        return len(self._entries)


class Tokens:
    """API tokens in Redis, with short in-process caches of the ones seen valid and the ones seen unknown."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, valid_ttl_s: float = VALID_TTL_S,
                 unknown_ttl_s: float = UNKNOWN_TTL_S, cache_max: int = CACHE_MAX) -> None:  # fmt: skip
        self.redis = redis
        self.keys = keys
        self._valid: ExpiringCache[Identity] = ExpiringCache(valid_ttl_s, cache_max)
        self._unknown: ExpiringCache[bool] = ExpiringCache(unknown_ttl_s, cache_max)

    async def create(self, role: str, tenant: str, name: str = "") -> tuple[str, Identity]:
        """A new token (returned once, never stored) and its identity."""
        if role not in ROLES:
            raise InvalidInput(f"role must be one of {', '.join(ROLES)}", "role")
        check_tenant(tenant)
        if len(name) > 128:
            raise InvalidInput("name must be at most 128 characters", "name")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        identity = Identity(id="tok-" + secrets.token_hex(6), role=role, tenant=tenant, name=name,
                            created=str(now_ms()))  # fmt: skip
        async with translated():
            pipe = self.redis.pipeline(transaction=True)
            pipe.hset(self.keys.token(digest(token)), mapping=identity.as_dict())  # type: ignore[arg-type]
            pipe.hset(self.keys.tokens, identity.id, digest(token))
            await pipe.execute()
        return token, identity

    async def lookup(self, token: str) -> Identity | None:
        """Who `token` stands for, or None; Redis is asked only when neither cache knows the token."""
        hashed = digest(token)
        identity = self._valid.get(hashed)
        if identity is not None:
            return identity
        if self._unknown.get(hashed):
            return None
        async with translated():
            raw = await self.redis.hgetall(self.keys.token(hashed))
        if not raw:
            self._unknown.put(hashed, True)
            return None
        fields = _decoded(raw)
        identity = Identity(fields["id"], fields["role"], fields["tenant"], fields.get("name", ""),
                            fields.get("created", ""))  # fmt: skip
        self._valid.put(hashed, identity)
        return identity

    def cached(self, token: str) -> Identity | None:
        """Who `token` stands for if this replica found it valid within the cache time; never asks Redis."""
        return self._valid.get(digest(token))

    async def list(self) -> list[Identity]:
        async with translated():
            digests = [text(d) for d in (await self.redis.hgetall(self.keys.tokens)).values()]
            pipe = self.redis.pipeline(transaction=False)
            for hashed in digests:
                pipe.hgetall(self.keys.token(hashed))
            rows = [_decoded(r) for r in await pipe.execute()]
        return sorted((Identity(r["id"], r["role"], r["tenant"], r.get("name", ""), r.get("created", ""))
                       for r in rows if r), key=lambda i: i.created)  # fmt: skip

    async def revoke(self, token_or_id: str) -> Identity:
        """Revoke by the token itself or by its id; NotFound when there is no such token."""
        async with translated():
            if token_or_id.startswith(TOKEN_PREFIX):
                hashed = digest(token_or_id)
            else:
                hashed = text(await self.redis.hget(self.keys.tokens, token_or_id))
            raw = _decoded(await self.redis.hgetall(self.keys.token(hashed))) if hashed else {}
            if not raw:
                raise NotFound(f"no token {token_or_id[:12]}")
            pipe = self.redis.pipeline(transaction=True)
            pipe.delete(self.keys.token(hashed))
            pipe.hdel(self.keys.tokens, raw["id"])
            await pipe.execute()
        self._valid.pop(hashed)
        return Identity(raw["id"], raw["role"], raw["tenant"], raw.get("name", ""), raw.get("created", ""))
