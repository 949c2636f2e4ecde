"""MQTT topic names (version 1) in one place."""

from __future__ import annotations

ROOT = "suanwang/v1"
ALLOCATIONS = f"{ROOT}/allocations"
ALLOCATIONS_BATCH = f"{ROOT}/allocations/batch"  # the same events, many to a message (a JSON array, in order)


def capacity(site: str) -> str:
    return f"{ROOT}/sites/{site}/capacity"


def status(site: str) -> str:
    return f"{ROOT}/sites/{site}/status"


def assignments(site: str) -> str:
    return f"{ROOT}/sites/{site}/assignments"


def events(site: str) -> str:
    return f"{ROOT}/sites/{site}/events"


def site_of(topic: str) -> tuple[str, str] | None:
    """Split `suanwang/v1/sites/{site}/{kind}` into (site, kind); None for any other topic."""
    parts = topic.split("/")
    if len(parts) != 5 or parts[0] != "suanwang" or parts[1] != "v1" or parts[2] != "sites":
        return None
    return parts[3], parts[4]


def shared(topic_filter: str, group: str | None) -> str:
    """A shared subscription (`$share/group/filter`) when a group is set, the plain filter otherwise."""
    return f"$share/{group}/{topic_filter}" if group else topic_filter
