"""Authentication for the API: the bearer token of each request, the identity it stands for, and the check
of that identity's role against the least role the route declares (broker.http.routes).

Failed authentications are limited per client address: each address may send `per_minute` unknown tokens
a minute (a bucket of that many, refilled evenly); past that, a token this replica has not seen valid in
the last `VOUCH_S` is answered 429 with Retry-After, without asking Redis. A token it has seen valid is
still looked up as usual (a revoked one is refused), so someone sending bad tokens from a shared address
never locks out the people behind it. The buckets live in the replica (their point is to spare Redis),
so the limit applies per replica; at most `max_clients` addresses and tokens are remembered.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from aiohttp import web

from broker.http.deps import DEPS, TokenLookup
from broker.http.routes import ADMIN, ROUTE_TABLE, TENANT_HEADER
from broker.model.identity import OPEN, PUBLIC, Identity, check_tenant
from common import logs
from common.errors import Forbidden, TooManyRequests, Unauthorized

log = logs.get("suanwang.api")

IDENTITY: web.RequestKey[Identity] = web.RequestKey("identity", Identity)
MAX_CLIENTS = 10_000
VOUCH_S = 900.0  # a token seen valid this recently still reaches the lookup from a blocked address


def client_of(remote: str | None) -> str:
    """The address a client is limited by: IPv4 as is, IPv6 by its /64 (one host's usual share)."""
    if not remote:
        return "unknown"
    try:
        address = ipaddress.ip_address(remote)
    except ValueError:
        return remote
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class FailureLimiter:
    """Failed authentications per client: a bucket of `per_minute` failures refilled at `per_minute`/60 a
    second, for at most `max_clients` clients (the least recently failing are forgotten first)."""

    def __init__(self, per_minute: int, max_clients: int = MAX_CLIENTS, clock: Callable[[], float] = time.monotonic
                 ) -> None:  # fmt: skip
        self.burst = float(per_minute)
        self.rate = per_minute / 60.0
        self.max_clients = max_clients
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, at)
        self._vouched: OrderedDict[bytes, float] = OrderedDict()  # digest of a token seen valid -> when

    @staticmethod
    def _digest(token: str) -> bytes:
        return hashlib.blake2b(token.encode(), digest_size=16).digest()

    def vouch(self, token: str) -> None:
        """Remember that `token` was valid just now."""
        digest = self._digest(token)
        self._vouched.pop(digest, None)
        self._vouched[digest] = self.clock()
        while len(self._vouched) > self.max_clients:
            self._vouched.popitem(last=False)

    def vouched(self, token: str) -> bool:
        """Whether `token` was seen valid in the last VOUCH_S seconds."""
        at = self._vouched.get(self._digest(token))
        return at is not None and self.clock() - at <= VOUCH_S

    def _tokens(self, client: str, now: float) -> float:
        tokens, at = self._buckets.get(client, (self.burst, now))
        return min(self.burst, tokens + (now - at) * self.rate)

    def retry_after(self, client: str) -> float:
        """Seconds until `client` may fail again; 0 when it may now."""
        tokens = self._tokens(client, self.clock())
        if tokens >= 1:
            return 0.0
        return (1 - tokens) / self.rate

    def failed(self, client: str) -> None:
        now = self.clock()
        tokens = self._tokens(client, now)
        self._buckets.pop(client, None)
        self._buckets[client] = (max(tokens - 1, 0.0), now)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)


AUTH_FAILURES: web.AppKey[FailureLimiter] = web.AppKey("suanwang.auth-failures", FailureLimiter)


def bearer(request: web.Request, allow_query: bool) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    if allow_query:
        return request.query.get("access_token") or None
    return None


@web.middleware
async def authenticate(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                       ) -> web.StreamResponse:  # fmt: skip
    """Find the caller's identity and check its role against the route's; 401 without one, 403 if too low."""
    resource = request.match_info.route.resource
    if resource is None:  # no such route (404) or method (405): nothing to protect
        return await handler(request)
    tokens = request.app[DEPS].tokens
    if tokens is None:
        request[IDENTITY] = OPEN
        return await handler(request)
    route = request.app[ROUTE_TABLE].find(request.method, resource.canonical)
    need = route.role if route is not None else ADMIN
    token = bearer(request, route is not None and route.query_token)
    identity = await _identify(request, tokens, token, need == PUBLIC) if token else None
    if identity is None:
        if need == PUBLIC:
            return await handler(request)
        raise Unauthorized("send a valid API token: Authorization: Bearer <token>" if not token
                           else "the API token is not valid (revoked or mistyped)")  # fmt: skip
    if not identity.at_least(need):
        raise Forbidden(f"this needs the {need} role; the token's role is {identity.role}")
    request[IDENTITY] = identity
    return await handler(request)


async def _identify(request: web.Request, tokens: TokenLookup, token: str, public: bool) -> Identity | None:
    """Who `token` stands for; a client past its failed-authentication budget gets 429 unless this replica
    has seen the token valid in the last VOUCH_S (so a shared address does not lock out everyone behind
    it), or the route is public (its token is then not looked at)."""
    failures = request.app[AUTH_FAILURES]
    client = client_of(request.remote)
    wait = failures.retry_after(client)
    if wait > 0 and not failures.vouched(token):
        identity = tokens.cached(token)
        if identity is None and not public:
            raise TooManyRequests(f"too many failed authentications from this address; retry in {math.ceil(wait)} s",
                                  math.ceil(wait), code="auth_rate_limited")  # fmt: skip
        return identity
    identity = await tokens.lookup(token)
    if identity is not None:
        failures.vouch(token)
    else:
        failures.failed(client)
        if failures.retry_after(client) > 0:
            log.warning("auth.limited", client=client)
    return identity


def identity_of(request: web.Request) -> Identity:
    """The caller, as `authenticate` found it; a public route's anonymous caller has none (fail closed)."""
    identity = request.get(IDENTITY)
    if identity is None:
        raise Unauthorized("send a valid API token: Authorization: Bearer <token>")
    return identity


def acting_tenant(request: web.Request, named: str | None = None) -> str:
    """The tenant a request acts for: a user's own; an operator or admin may name one (header, query or
    `named`, e.g. the job's body), else their token's."""
    identity = identity_of(request)
    asked = request.headers.get(TENANT_HEADER) or request.query.get("tenant") or named
    if identity.role == "user":
        if asked and asked != identity.tenant:
            raise Forbidden(f"this token acts for tenant {identity.tenant!r} only")
        return identity.tenant
    return check_tenant(asked) if asked else identity.tenant


def may_see(request: web.Request, tenant: str) -> bool:
    """Whether the caller may see (and cancel) a job of `tenant`."""
    identity = identity_of(request)
    return identity.role != "user" or identity.tenant == tenant
