"""The project's own exceptions; library errors are translated into these at the boundary."""

from __future__ import annotations


class SuanwangError(Exception):
    """Base class of every error Suanwang raises on purpose."""

    code = "internal"


class InvalidInput(SuanwangError):
    """A request body or message that fails validation; `field` names the offending part."""

    code = "invalid"

    def __init__(self, message: str, field: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        if code:
            self.code = code


class NotFound(SuanwangError):
    code = "not_found"


class Conflict(SuanwangError):
    """The request is valid but the object is in a state that does not allow it."""

    code = "conflict"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code:
            self.code = code


class HoldNotStanding(Conflict):
    """A hold that was used, released, has expired, or is not the caller's: `state` says which (`expired`,
    `used`, `released`, `unknown`); the code is `hold_<state>`."""

    def __init__(self, message: str, state: str) -> None:
        super().__init__(message, code=f"hold_{state}")
        self.state = state


class StoreUnavailable(SuanwangError):
    """Redis cannot be reached or answered with an error."""

    code = "store_unavailable"


class NotDurable(StoreUnavailable):
    """Durable accept: the primary has the job but not enough replicas acknowledged it in time."""

    code = "not_durable"


class MessagingUnavailable(SuanwangError):
    """The MQTT broker cannot be reached."""

    code = "mqtt_unavailable"


class Unauthorized(SuanwangError):
    """No credentials, or credentials that are not (or no longer) valid."""

    code = "unauthorized"


class Forbidden(SuanwangError):
    """Valid credentials whose role may not do this."""

    code = "forbidden"


class TooManyRequests(SuanwangError):
    """A rate or size limit was reached; `retry_after_s` says when trying again can succeed (0: unknown)."""

    code = "rate_limited"

    def __init__(self, message: str, retry_after_s: int = 0, code: str | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        if code:
            self.code = code
