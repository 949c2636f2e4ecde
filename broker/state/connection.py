"""The Redis connection's edge: redis-py errors become the project's own, replies become text."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from redis import exceptions as redis_errors

from common.errors import StoreUnavailable


def now_ms() -> int:
    return int(time.time() * 1000)


# What XRANGE, XREAD and XREADGROUP give back (redis-py's own annotations are too wide to use)
StreamEntries = list[tuple[bytes, dict[bytes, bytes]]]
StreamReply = list[tuple[bytes, StreamEntries]]


def text(value: object) -> str:
    """A reply value as text ('' for a missing one)."""
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)


def decode_hash(raw: Mapping[Any, Any]) -> dict[str, str]:
    return {text(k): text(v) for k, v in raw.items()}


@contextlib.asynccontextmanager
async def translated() -> AsyncIterator[None]:
    """Turn redis-py's connection and server errors into the project's own."""
    try:
        yield
    except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
        raise StoreUnavailable(f"Redis is unreachable: {exc}") from None
    except redis_errors.RedisError as exc:
        raise StoreUnavailable(f"Redis error: {exc}") from None
