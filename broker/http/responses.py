"""JSON answers and the one shape every error leaves in: `{"error": {"code", "message", "field"}}`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from common import logs
from common.errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    NotFound,
    StoreUnavailable,
    SuanwangError,
    TooManyRequests,
    Unauthorized,
)

log = logs.get("suanwang.api")

_STATUS_OF = {InvalidInput: 400, Unauthorized: 401, Forbidden: 403, NotFound: 404, Conflict: 409,
              TooManyRequests: 429, StoreUnavailable: 503}  # fmt: skip


def status_of(exc: SuanwangError) -> int:
    """The HTTP status an error of ours answers with."""
    if exc.code == "unsupported_media_type":
        return 415
    return next((s for cls, s in _STATUS_OF.items() if isinstance(exc, cls)), 500)


def error_body(exc: SuanwangError) -> dict[str, Any]:
    return {"code": exc.code, "message": str(exc), "field": getattr(exc, "field", None)}


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def error_response(status: int, code: str, message: str, field: str | None = None) -> web.Response:
    return json_response({"error": {"code": code, "message": message, "field": field}}, status)


async def json_body(request: web.Request, what: str = "send application/json", max_bytes: int | None = None
                    ) -> bytes:  # fmt: skip
    """The raw body of a JSON request; 415 for any other media type. `max_bytes` allows a route a larger
    body than the application's limit (413 beyond it)."""
    if request.content_type != "application/json":
        raise InvalidInput(what, None, code="unsupported_media_type")
    if max_bytes is None:
        return await request.read()
    chunks, size = [], 0
    while chunk := await request.content.read(1 << 16):
        size += len(chunk)
        if size > max_bytes:
            raise web.HTTPRequestEntityTooLarge(max_size=max_bytes, actual_size=size)
        chunks.append(chunk)
    return b"".join(chunks)


@web.middleware
async def errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                 ) -> web.StreamResponse:  # fmt: skip
    """Every error leaves as `{"error": {"code", "message", "field"}}`; only a bug is a 500."""
    try:
        return await handler(request)
    except SuanwangError as exc:
        response = error_response(status_of(exc), exc.code, str(exc), getattr(exc, "field", None))
        if isinstance(exc, Unauthorized):
            response.headers["WWW-Authenticate"] = 'Bearer realm="suanwang"'
        elif isinstance(exc, TooManyRequests) and exc.retry_after_s:
            response.headers["Retry-After"] = str(exc.retry_after_s)
        return response
    except web.HTTPRequestEntityTooLarge as exc:
        return error_response(413, "too_large", f"request body too large: {exc.text}")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc.status, exc.reason.lower().replace(" ", "_"), exc.reason)
    except Exception:
        log.exception("http.unhandled", path=request.path, method=request.method)
        return error_response(500, "internal", "internal error")
