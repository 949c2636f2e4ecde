"""Sites' reliability records in Redis: read (decayed to Redis's clock) and reset by an operator.

The record is kept by `transition.lua` in the step of the transition it counts; its fields and the score
are in `broker.model.reliability`. A reset deletes it, marks the site changed (so every replica's view
reads it again) and logs a `reliability_reset` event, in one script.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any

from redis.commands.core import AsyncScript

from broker.model.reliability import COUNTERS, Reliability
from broker.state.connection import decode_hash, translated
from broker.state.ledger import Ledger

_RESET = (resources.files("broker.state") / "lua" / "reliability_reset.lua").read_text()


def reliability_of(raw: Mapping[Any, Any], now_ms: int) -> Reliability:
    """A record as read (its hash, empty when the site has none), decayed to `now_ms`."""
    return Reliability.from_fields(decode_hash(raw)).at(now_ms) if raw else Reliability()


def reliability_across(raws: Sequence[Mapping[Any, Any]], now_ms: int) -> Reliability:
    """A site's record from every job shard's share of it (each kept by the transitions of that shard's jobs):
    each share decayed to `now_ms`, then summed (decay is a factor, so the sum decays as one record would)."""
    shares = [reliability_of(raw, now_ms) for raw in raws if raw]
    if len(shares) <= 1:
        return shares[0] if shares else Reliability()
    totals = {name: sum(getattr(r, name) for r in shares) for name in COUNTERS}
    return Reliability(**totals, t=max(r.t for r in shares), updated=max(r.updated for r in shares))


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
            for sk in self.keys.each_shard:
                pipe.hgetall(sk.site_reliability(site))
            now, *raws = await pipe.execute()
        return reliability_across(raws, redis_ms(now))

    async def reset_reliability(self, site: str, who: str = "operator", now_ms: int | None = None) -> bool | None:
        """Forget the site's record: True when it had one, False when it had none, None for an unknown site."""
        if self._reset_script is None:
            self._reset_script = self.redis.register_script(_RESET)
        if await self.place(site) is None:
            return None
        # every job shard's share of the record; the event is logged by the first shard's reset
        calls = [(self._reset_script, [sk.site_reliability(site), sk.sites, sk.clock, sk.events],
                  [site, self.events_maxlen, who, "" if now_ms is None else now_ms, 1 if sk.index == 0 else 0])
                 for sk in self.keys.each_shard]  # fmt: skip
        async with translated():
            done = await self.run_scripts(calls)
        return any(int(d) for d in done)
