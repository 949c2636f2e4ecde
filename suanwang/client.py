"""HTTP client side of the CLI: submit, list, and follow the allocation stream."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson

from common.errors import SuanwangError


class ApiError(SuanwangError):
    code = "api"

    def __init__(self, status: int, body: Any) -> None:
        error = body.get("error", {}) if isinstance(body, dict) else {}
        field = f" (field: {error['field']})" if error.get("field") else ""
        super().__init__(f"HTTP {status}: {error.get('message', body)}{field}")
        self.status = status
        self.body = body


def base_url(http: str) -> str:
    return http if http.startswith(("http://", "https://")) else f"http://{http}"


async def call(http: str, method: str, path: str, body: bytes | None = None,
               params: dict[str, str] | None = None, tenant: str | None = None, token: str | None = None
               ) -> Any:  # fmt: skip
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if tenant:
        headers["X-Suanwang-Tenant"] = tenant
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.request(method, base_url(http) + path, data=body, params=params, headers=headers) as response,
        ):
            payload = orjson.loads(await response.read() or b"null")
            if response.status >= 400:
                raise ApiError(response.status, payload)
            return payload
    except aiohttp.ClientError as exc:
        raise SuanwangError(f"cannot reach the broker at {base_url(http)}: {exc}") from None


async def follow(http: str, last_event_id: str | None = None, token: str | None = None
                 ) -> AsyncIterator[dict[str, Any]]:  # fmt: skip
    """Yield events from the SSE stream, reconnecting with Last-Event-ID after a drop (not after a refusal)."""
    import asyncio

    timeout = aiohttp.ClientTimeout(total=None, sock_read=60)
    while True:
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.get(base_url(http) + "/v1/allocations/stream", headers=headers) as response,
            ):
                if response.status != 200:
                    raise ApiError(response.status, orjson.loads(await response.read() or b"null"))
                data: list[bytes] = []
                async for raw in response.content:
                    line = raw.rstrip(b"\r\n")
                    if line.startswith(b"id: "):
                        last_event_id = line[4:].decode()
                    elif line.startswith(b"data: "):
                        data.append(line[6:])
                    elif not line and data:
                        yield orjson.loads(b"\n".join(data))
                        data = []
        except (aiohttp.ClientError, TimeoutError):
            await asyncio.sleep(1.0)
