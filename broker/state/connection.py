"""The Redis connection's edge: redis-py errors become the project's own, replies become text."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator

from redis import exceptions as redis_errors

from common.errors import StoreUnavailable


def now_ms() -> int:
    return int(time.time() * 1000)


def text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value


def decode_hash(raw: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in raw.items()}


@contextlib.asynccontextmanager
async def translated() -> AsyncIterator[None]:
    """Turn redis-py's connection and server errors into the project's own."""
    try:
        yield
    except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
        raise StoreUnavailable(f"Redis is unreachable: {exc}") from None
    except redis_errors.RedisError as exc:
        raise StoreUnavailable(f"Redis error: {exc}") from None
