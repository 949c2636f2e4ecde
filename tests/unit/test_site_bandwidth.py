"""A site's measured bandwidth: from its config file to its capacity message, refused by name when wrong."""

from __future__ import annotations

import pytest

from adapters.site import SiteLink
from adapters.siteconfig import parse_site_config
from common.config import MqttTarget
from common.errors import InvalidInput

POOL = {"arch": "GPU", "model": "A100-80G", "memory_gb": 80, "total": 8, "in_use_external": 0, "per_node": 8,
        "interconnect": "nvlink", "stacks": ["cuda-12.4"], "price_cny_per_hour": 8.0}  # fmt: skip


def link(**kwargs: object) -> SiteLink:
    return SiteLink(MqttTarget.from_url("mqtt://127.0.0.1:1"), "guian-01", "guizhou", [POOL], **kwargs)  # type: ignore[arg-type]


def test_a_config_names_measured_rates_per_hub_or_cluster() -> None:
    config = parse_site_config({"site": "guian-01", "hub": "guizhou", "bandwidth_gbps": {"yangtze": 25, "tianfu": 8}})
    assert config.bandwidth_gbps == {"yangtze": 25.0, "tianfu": 8.0}
    with pytest.raises(InvalidInput) as bad:
        parse_site_config({"site": "guian-01", "hub": "guizhou", "bandwidth_gbps": {"yangtze": 0}})
    assert bad.value.field == "bandwidth_gbps.yangtze"


def test_the_capacity_message_carries_the_rates_and_a_bad_one_changes_nothing() -> None:
    site = link(bandwidth_gbps={"yangtze": 25.0})
    assert site._capacity_message(site.pools, seq=1).bandwidth_gbps == {"yangtze": 25.0}
    site.set_bandwidth({"jingjinji": 12.5})
    assert site._capacity_message(site.pools, seq=2).bandwidth_gbps == {"jingjinji": 12.5}
    with pytest.raises(ValueError, match="bandwidth_gbps"):
        site.set_bandwidth({"jingjinji": -1.0})
    assert site._capacity_message(site.pools, seq=3).bandwidth_gbps == {"jingjinji": 12.5}
    assert link()._capacity_message(site.pools, seq=1).bandwidth_gbps == {}
