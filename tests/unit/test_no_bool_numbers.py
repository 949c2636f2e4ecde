"""`true` is not a number: a boolean where a count, a size or a price belongs is refused naming the field
(pydantic alone reads it as 1), while boolean fields still take booleans."""

from __future__ import annotations

import pytest

from broker.model.job import JobSpec
from common.errors import InvalidInput
from common.validation import parse

BASE = {"name": "n", "resources": {"arch": "GPU", "count": 2}, "origin": "shanghai", "duration_hours": 1}


@pytest.mark.parametrize(("path", "value"), [
    (("resources", "count"), True), (("resources", "min_memory_gb"), False), (("duration_hours",), True),
    (("max_price_cny_per_hour",), True),
])  # fmt: skip
def test_a_boolean_for_a_number_is_refused_naming_the_field(path: tuple[str, ...], value: bool) -> None:
    body: dict[str, object] = {**BASE, "resources": dict(BASE["resources"])}  # type: ignore[call-overload]
    target = body["resources"] if len(path) == 2 else body
    target[path[-1]] = value  # type: ignore[index]
    with pytest.raises(InvalidInput) as refused:
        parse(JobSpec, __import__("orjson").dumps(body))
    assert refused.value.field == ".".join(path)


def test_boolean_fields_still_take_booleans() -> None:
    spec = JobSpec.model_validate({**BASE, "resources": {"arch": "GPU", "count": 2, "same_site": False}})
    assert spec.resources.same_site is False and spec.resources.count == 2
