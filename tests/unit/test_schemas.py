"""Wire-format validation: the documented samples parse, and every bad input names the offending field."""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest

from broker.model.job import JobSpec, Priority
from common.errors import InvalidInput
from common.protocol import Capacity, SiteEvent, SiteEventKind
from common.validation import Arch, parse

# The samples from INTERFACE.md, verbatim.
JOB: dict[str, Any] = {
    "name": "llm-finetune", "workload": "training",
    "resources": {"arch": "GPU", "models": ["A100-80G", "H800"], "count": 16, "min_memory_gb": 80, "same_site": True},
    "origin": "shanghai", "max_latency_ms": 30, "max_price_cny_per_hour": 15,
    "duration_hours": 6, "priority": "normal",
}  # fmt: skip
CAPACITY: dict[str, Any] = {
    "schema": "suanwang.capacity/1", "site": "guian-01", "hub": "guizhou", "seq": 1842,
    "pools": [{"arch": "GPU", "model": "A100-80G", "memory_gb": 80, "total": 512, "in_use_external": 64,
               "per_node": 8, "interconnect": "nvlink", "stacks": ["cuda-12.4"], "price_cny_per_hour": 12.5},
              {"arch": "ASIC", "model": "Ascend-910B", "memory_gb": 64, "total": 256, "in_use_external": 0,
               "per_node": 8, "interconnect": "hccs", "stacks": ["cann-8.0"], "price_cny_per_hour": 7.0}],
    "energy": {"pue": 1.18, "green_share": 0.65, "tariff_cny_per_kwh": 0.31},
}  # fmt: skip
EVENT: dict[str, Any] = {"schema": "suanwang.event/1", "site": "guian-01", "job": "j-1", "attempt": 1,
                         "event": "accepted"}  # fmt: skip


DELETE = object()  # marks a field to remove in `changed`


def changed(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of `base` with the dotted `path` set to `value` (or removed when value is DELETE)."""
    doc = copy.deepcopy(base)
    *parents, last = path.split(".")
    node: Any = doc
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        node[int(last)] = value
    elif value is DELETE:
        del node[last]
    else:
        node[last] = value
    return doc


# --------------------------------------------------------------------------- valid inputs


def test_interface_job_sample_parses_from_json_bytes():
    """The job sample in INTERFACE.md parses from JSON bytes with every field as written."""
    spec = parse(JobSpec, orjson.dumps(JOB))
    assert spec.resources.arch is Arch.GPU
    assert spec.resources.models == ("A100-80G", "H800")
    assert spec.resources.count == 16
    assert spec.resources.min_memory_gb == 80
    assert (spec.origin, spec.max_latency_ms, spec.max_price_cny_per_hour) == ("shanghai", 30, 15)
    assert spec.duration_hours == 6
    assert spec.priority is Priority.NORMAL
    assert spec.tenant == "default"


def test_minimal_job_gets_documented_defaults():
    """A job with only the required fields gets any model, no caps, normal priority and the default tenant."""
    spec = parse(JobSpec, {"resources": {"arch": "CPU", "count": 1}, "origin": "beijing", "duration_hours": 0.5})
    assert spec.resources.models == ()
    assert spec.max_latency_ms is None and spec.max_price_cny_per_hour is None
    assert spec.priority is Priority.NORMAL
    assert spec.workload == "general"


def test_job_strings_are_stripped_before_validation():
    """Surrounding whitespace in an identifier is stripped rather than rejected by the pattern."""
    spec = parse(JobSpec, changed(JOB, "origin", "  shanghai "))
    assert spec.origin == "shanghai"


def test_interface_capacity_sample_parses_from_json_text():
    """The capacity sample in INTERFACE.md parses from a JSON string, pools in order, energy as given."""
    cap = parse(Capacity, orjson.dumps(CAPACITY).decode())
    assert (cap.site, cap.hub, cap.seq, cap.cluster) == ("guian-01", "guizhou", 1842, None)
    pools = [(p.arch, p.model, p.total, p.in_use_external) for p in cap.pools]
    assert pools == [(Arch.GPU, "A100-80G", 512, 64), (Arch.ASIC, "Ascend-910B", 256, 0)]
    assert cap.pools[0].stacks == ("cuda-12.4",)
    assert cap.energy.pue == 1.18
    assert cap.latency_ms == {}


def test_capacity_external_equal_to_total_is_valid():
    """A pool fully used outside the broker (in_use_external == total) is valid."""
    cap = parse(Capacity, changed(CAPACITY, "pools.0.in_use_external", 512))
    assert cap.pools[0].in_use_external == cap.pools[0].total == 512


def test_site_event_parses():
    """A site event with schema, site, job, attempt and kind parses."""
    event = parse(SiteEvent, EVENT)
    assert (event.site, event.job, event.attempt, event.event) == ("guian-01", "j-1", 1, SiteEventKind.ACCEPTED)


# --------------------------------------------------------------------------- invalid inputs


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        ("resources.count", 0, "resources.count"),
        ("resources.count", 100_001, "resources.count"),
        ("resources.arch", "TPU", "resources.arch"),
        ("resources.models", ["A100-80G", "bad model"], "resources.models.1"),
        ("resources.min_memory_gb", -1, "resources.min_memory_gb"),
        ("resources.colour", "red", "resources.colour"),
        ("colour", "red", "colour"),
        ("origin", "Shang Hai", "origin"),
        ("origin", DELETE, "origin"),
        ("resources", DELETE, "resources"),
        ("duration_hours", 0, "duration_hours"),
        ("max_latency_ms", 0, "max_latency_ms"),
        ("max_price_cny_per_hour", -5, "max_price_cny_per_hour"),
        ("priority", "urgent", "priority"),
        ("workload", "mining", "workload"),
        ("tenant", "", "tenant"),
        ("labels", {"team": "x" * 257}, "labels.team"),
    ],
)
def test_invalid_job_names_the_field(path, value, field):
    """Each invalid job is rejected with InvalidInput whose `field` is the dotted path of the bad value."""
    with pytest.raises(InvalidInput) as caught:
        parse(JobSpec, changed(JOB, path, value))
    assert caught.value.field == field
    assert caught.value.code == "invalid"
    assert caught.value.message.startswith(f"{field}: ")


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        ("schema", DELETE, "schema"),
        ("schema", "suanwang.capacity/2", "schema"),
        ("site", "Guian 01", "site"),
        ("hub", DELETE, "hub"),
        ("seq", -1, "seq"),
        ("pools.0.in_use_external", -1, "pools.0.in_use_external"),
        ("pools.1.in_use_external", 257, "pools.1"),
        ("pools.0.total", -3, "pools.0.total"),
        ("pools.0.arch", "TPU", "pools.0.arch"),
        ("pools.1.model", "A100-80G", "pools"),
        ("pools.0.price_cny_per_hour", -0.5, "pools.0.price_cny_per_hour"),
        ("pools.0.per_node", 0, "pools.0.per_node"),
        ("energy.pue", 0.9, "energy.pue"),
        ("latency_ms", {"shanghai": -1}, "latency_ms.shanghai"),
        ("owner", "me", "owner"),
    ],
)
def test_invalid_capacity_names_the_field(path, value, field):
    """Each invalid capacity message is rejected with InvalidInput naming the offending field."""
    with pytest.raises(InvalidInput) as caught:
        parse(Capacity, changed(CAPACITY, path, value))
    assert caught.value.field == field


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        ("schema", "suanwang.capacity/1", "schema"),
        ("attempt", 0, "attempt"),
        ("event", "started", "event"),
        ("job", DELETE, "job"),
        ("reason", "x" * 513, "reason"),
    ],
)
def test_invalid_site_event_names_the_field(path, value, field):
    """Each invalid site event is rejected with InvalidInput naming the offending field."""
    with pytest.raises(InvalidInput) as caught:
        parse(SiteEvent, changed(EVENT, path, value))
    assert caught.value.field == field


@pytest.mark.parametrize("payload", [b"{not json", b"", '{"resources": ', b"\xff\xfe"])
def test_malformed_json_is_reported_as_malformed(payload):
    """Bytes or text that are not JSON raise InvalidInput with code malformed_json and no field."""
    with pytest.raises(InvalidInput) as caught:
        parse(JobSpec, payload)
    assert caught.value.code == "malformed_json"
    assert caught.value.field is None


@pytest.mark.parametrize("payload", [b"[1, 2]", b"[]", "null", b'"job"', b"42", [JOB]])
def test_json_that_is_not_an_object_is_invalid(payload):
    """Valid JSON that is not an object (array, null, string, number) raises InvalidInput, not a crash."""
    with pytest.raises(InvalidInput) as caught:
        parse(Capacity, payload)
    assert caught.value.code == "invalid"
    assert caught.value.field is None
