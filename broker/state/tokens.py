"""API tokens in Redis. A token is shown once when it is made; Redis keeps only its SHA-256, so a copy
of the database gives no working token."""

from __future__ import annotations

import secrets
import time
from typing import Any

import redis.asyncio as aioredis

from broker.model.identity import ROLES, TOKEN_PREFIX, Identity, check_tenant, digest
from broker.state.connection import now_ms, text, translated
from broker.state.keys import Keys
from common.errors import InvalidInput, NotFound

CACHE_TTL_S = 2.0  # a revoked token stops working on every replica within this time
CACHE_MAX = 10_000


def _decoded(raw: Any) -> dict[str, str]:
    return {text(k): text(v) for k, v in raw.items()}


class Tokens:
    """API tokens in Redis, with a short in-process cache of the ones seen valid."""

    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._cache: dict[str, tuple[float, Identity]] = {}

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
        hashed = digest(token)
        cached = self._cache.get(hashed)
        now = time.monotonic()
        if cached and cached[0] > now:
            return cached[1]
        async with translated():
            raw = await self.redis.hgetall(self.keys.token(hashed))
        if not raw:
            self._cache.pop(hashed, None)
            return None
        fields = _decoded(raw)
        identity = Identity(fields["id"], fields["role"], fields["tenant"], fields.get("name", ""),
                            fields.get("created", ""))  # fmt: skip
        if len(self._cache) >= CACHE_MAX:
            self._cache.clear()
        self._cache[hashed] = (now + CACHE_TTL_S, identity)
        return identity

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
        self._cache.pop(hashed, None)
        return Identity(raw["id"], raw["role"], raw["tenant"], raw.get("name", ""), raw.get("created", ""))
