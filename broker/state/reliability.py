"""Sites' reliability records in Redis: read (decayed to Redis's clock) and reset by an operator.

The record is kept by `transition.lua` in the step of the transition it counts; its fields and the score
are in `broker.model.reliability`. A reset deletes it, marks the site changed (so every replica's view
reads it again) and logs a `reliability_reset` event, in one script.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import resources
from typing import Any

from redis.commands.core import AsyncScript

from broker.model.reliability import Reliability
from broker.state.connection import decode_hash, translated
from broker.state.ledger import Ledger

_RESET = (resources.files("broker.state") / "lua" / "reliability_reset.lua").read_text()


def reliability_of(raw: Mapping[Any, Any], now_ms: int) -> Reliability:
    """A record as read (its hash, empty when the site has none), decayed to `now_ms`."""
    return Reliability.from_fields(decode_hash(raw)).at(now_ms) if raw else Reliability()


def redis_ms(reply: tuple[Any, Any] | list[Any]) -> int:
    """Redis's TIME reply as epoch milliseconds."""
    seconds, micros = reply
    return int(seconds) * 1000 + int(micros) // 1000


class SiteReliability(Ledger):
    _reset_script: AsyncScript | None = None

    async def reliability(self, site: str) -> Reliability:
        """The site's record decayed to Redis's clock now (a site with no record: all counters 0)."""
        async with translated():
            pipe = self.redis.pipeline(transaction=False)
            pipe.execute_command("TIME")  # as pipe.time() sends it, which a cluster pipeline refuses
            pipe.hgetall(self.keys.site_reliability(site))
            now, raw = await pipe.execute()
        return reliability_of(raw, redis_ms(now))

    async def reset_reliability(self, site: str, who: str = "operator", now_ms: int | None = None) -> bool | None:
        """Forget the site's record: True when it had one, False when it had none, None for an unknown site."""
        if self._reset_script is None:
            self._reset_script = self.redis.register_script(_RESET)
        k = self.keys
        async with translated():
            done = int(await self._reset_script(
                keys=[k.site_reliability(site), k.sites, k.clock, k.events, k.places],
                args=[site, self.events_maxlen, who, "" if now_ms is None else now_ms]))  # fmt: skip
        return None if done < 0 else bool(done)
