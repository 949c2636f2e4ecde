"""Which sites a simulated hub runs: the seeded fleet first, then deterministic synthetic look-alikes.

The benchmark asks for far more sites than the seed data describes (1,000 per hub), so extra sites are
cloned from the hub's seeded ones with their sizes and prices jittered by a seeded RNG. Generation is
sequential, so `sites_for_hub(h, 500)` is a prefix of `sites_for_hub(h, 1000)` for the same seed.
"""

from __future__ import annotations

import copy
import dataclasses
import random
from collections.abc import Mapping
from typing import Any

from regions import SiteSeed, load_fleet

# Sizes vary by up to ±50 % and prices by up to ±15 % from the template pool.
TOTAL_JITTER = 0.5
PRICE_JITTER = 0.15


def _clone(template: SiteSeed, **changes: Any) -> SiteSeed:
    """A copy of `template` with `changes`, whatever kind of record SiteSeed turns out to be."""
    if dataclasses.is_dataclass(template):
        return dataclasses.replace(template, **changes)  # type: ignore[type-var]
    if hasattr(template, "_replace"):  # NamedTuple
        return template._replace(**changes)  # type: ignore[no-any-return]
    if hasattr(template, "model_copy"):  # pydantic
        return template.model_copy(update=changes)  # type: ignore[no-any-return]
    raise TypeError(f"cannot copy a {type(template).__name__}")


def _jitter_pool(pool: Mapping[str, Any], rng: random.Random) -> dict[str, Any]:
    out = copy.deepcopy(dict(pool))  # seed pools are shared; never alias their lists
    total = int(pool["total"])
    per_node = max(1, int(pool.get("per_node", 1)))
    factor = rng.uniform(1 - TOTAL_JITTER, 1 + TOTAL_JITTER)
    if total >= per_node:
        # Whole nodes: a site never has 7.5 eight-GPU servers.
        new_total = max(per_node, round(total * factor / per_node) * per_node)
    else:
        new_total = max(1, round(total * factor)) if total else 0
    # External use scales with the pool so it stays a plausible share and never exceeds the total.
    out["total"] = new_total
    out["in_use_external"] = (
        min(new_total, round(int(pool.get("in_use_external", 0)) * new_total / total)) if total else 0
    )
    price = float(pool["price_cny_per_hour"])
    out["price_cny_per_hour"] = round(price * rng.uniform(1 - PRICE_JITTER, 1 + PRICE_JITTER), 2)
    return out


def sites_for_hub(hub: str, n: int | None = None, seed: int = 0) -> list[SiteSeed]:
    """The hub's seeded sites, then (if `n` asks for more) synthetic ones cloned from them.

    `n=None` means exactly the seeded sites; `n` smaller than the seeded count takes the first `n`.
    Synthetic ids are `{template.cluster}-s{i:04d}`, `i` counting on from the seeded sites' count.
    """
    seeded = [site for site in load_fleet() if site.hub == hub]
    if not seeded:
        raise ValueError(f"no seeded sites in hub {hub!r}")
    if n is None:
        return seeded
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n <= len(seeded):
        return seeded[:n]
    # A string seed is hashed deterministically by random.Random, unlike hash() of a tuple across runs.
    rng = random.Random(f"{seed}:{hub}")
    out = list(seeded)
    taken = {site.id for site in seeded}
    i = len(out)
    while len(out) < n:
        template = rng.choice(seeded)
        site_id = f"{template.cluster}-s{i:04d}"
        i += 1
        if site_id in taken:  # only if the seed data itself uses this naming scheme
            continue
        taken.add(site_id)
        pools = tuple(_jitter_pool(pool, rng) for pool in template.pools)
        out.append(_clone(template, id=site_id, pools=pools))
    return out


def all_sites(n_per_hub: int | None = None, seed: int = 0) -> list[SiteSeed]:
    """`sites_for_hub` for every hub that has seeded sites, hubs in seed-data order."""
    hubs = list(dict.fromkeys(site.hub for site in load_fleet()))
    return [site for hub in hubs for site in sites_for_hub(hub, n_per_hub, seed)]
