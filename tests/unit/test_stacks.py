"""Software stacks: version ordering, stack tags and the version ranges jobs ask for."""

from __future__ import annotations

import pytest

from broker.model.job import JobSpec
from broker.model.stacks import Version, parse_requirement, split_tag
from common.errors import InvalidInput
from common.validation import parse

# --------------------------------------------------------------------------- versions

ORDER = [
    pytest.param("12.1", "12.10", id="12.1<12.10"),
    pytest.param("12.9", "12.10", id="12.9<12.10"),
    pytest.param("12.4", "13.0", id="12.4<13.0"),
    pytest.param("23.10", "24.04", id="23.10<24.04"),
    pytest.param("armv8.1", "armv8.2", id="armv8.1<armv8.2"),
    pytest.param("v3", "v4", id="v3<v4"),
    pytest.param("12", "12.0.1", id="12<12.0.1"),
    pytest.param("2024.1", "2024.2", id="2024.1<2024.2"),
]


@pytest.mark.parametrize(("low", "high"), ORDER)
def test_versions_order_by_numeric_and_alphabetic_runs(low, high):
    """Versions compare part by part as numbers (not strings), so 12.10 sorts after 12.9 and 12.1."""
    a, b = Version.parse(low), Version.parse(high)
    assert a < b and b > a
    assert a != b
    assert sorted([b, a]) == [a, b]


EQUAL = [
    pytest.param("12.1", "12.1.0", id="trailing-zero"),
    pytest.param("12", "12.0.0", id="two-trailing-zeros"),
    pytest.param("24.04", "24.4", id="leading-zero-in-a-part"),
    pytest.param("ARMv8.2", "armv8.2", id="case-insensitive"),
]


@pytest.mark.parametrize(("left", "right"), EQUAL)
def test_equal_versions_are_equal_and_hash_alike(left, right):
    """Versions that differ only by trailing zeros, leading zeros or case are equal and hash alike."""
    a, b = Version.parse(left), Version.parse(right)
    assert a == b
    assert not a < b and not b < a
    assert hash(a) == hash(b)
    assert len({a, b}) == 1


# --------------------------------------------------------------------------- tags

TAGS = [
    pytest.param("cuda-12.4", ("cuda", "12.4"), id="cuda"),
    pytest.param("cann-8.0", ("cann", "8.0"), id="cann"),
    pytest.param("x86-64-v4", ("x86-64", "v4"), id="dash-in-name-then-version"),
    pytest.param("aarch64-armv8.2", ("aarch64", "armv8.2"), id="aarch64"),
    pytest.param("loongarch64-1.0", ("loongarch64", "1.0"), id="loongarch"),
    pytest.param("dtk-24.04", ("dtk", "24.04"), id="dtk"),
    pytest.param("tpu-v5e", ("tpu", "v5e"), id="letters-around-digits"),
    pytest.param("cann", ("cann", ""), id="no-version"),
    pytest.param("x86-64", ("x86-64", ""), id="dash-in-name-without-version"),
]


@pytest.mark.parametrize(("tag", "expected"), TAGS)
def test_split_tag_separates_stack_name_and_version(tag, expected):
    """A tag splits at its last dash into name and version, except where the dash belongs to the name (x86-64)."""
    assert split_tag(tag) == expected


# --------------------------------------------------------------------------- requirements

ADMITS = [
    # (stack, range, tag, admitted)
    pytest.param("cuda", ">=12.1", "cuda-12.10", True, id=">=12.1 admits 12.10"),
    pytest.param("cuda", ">=12.1", "cuda-12.0", False, id=">=12.1 refuses 12.0"),
    pytest.param("cuda", ">=12.1", "cuda-12.1", True, id=">=12.1 admits 12.1"),
    pytest.param("cuda", ">=12.1", "cuda-12.1.0", True, id=">=12.1 admits 12.1.0"),
    pytest.param("cuda", ">=12.1", "cuda-13.0", True, id=">=12.1 admits 13.0"),
    pytest.param("cuda", ">12.1", "cuda-12.1", False, id=">12.1 refuses 12.1"),
    pytest.param("cuda", "<=12.1", "cuda-12.10", False, id="<=12.1 refuses 12.10"),
    pytest.param("cann", "==8.*", "cann-8.0", True, id="==8.* admits 8.0"),
    pytest.param("cann", "==8.*", "cann-8.1.rc1", True, id="==8.* admits 8.1.rc1"),
    pytest.param("cann", "==8.*", "cann-8", True, id="==8.* admits 8"),
    pytest.param("cann", "==8.*", "cann-80.0", False, id="==8.* refuses 80.0"),
    pytest.param("cann", "==8.*", "cann-7.0", False, id="==8.* refuses 7.0"),
    pytest.param("cuda", "==12.1.*", "cuda-12.10", False, id="==12.1.* refuses 12.10"),
    pytest.param("cuda", "==12.0.*", "cuda-12", True, id="==12.0.* admits 12 (as 12.0 does)"),
    pytest.param("cann", "!=8.0", "cann-8.0", False, id="!=8.0 refuses 8.0"),
    pytest.param("cann", "!=8.0", "cann-8.0.0", False, id="!=8.0 refuses 8.0.0"),
    pytest.param("cann", "!=8.0", "cann-8.1", True, id="!=8.0 admits 8.1"),
    pytest.param("cann", "!=8.*", "cann-8.1", False, id="!=8.* refuses 8.1"),
    pytest.param("cann", "~=8.0", "cann-8.5", True, id="~=8.0 admits 8.5"),
    pytest.param("cann", "~=8.0", "cann-9.0", False, id="~=8.0 refuses 9.0"),
    pytest.param("cann", "~=8.2", "cann-8.1", False, id="~=8.2 refuses 8.1"),
    pytest.param("cuda", "~=12.1.0", "cuda-12.1.5", True, id="~=12.1.0 admits 12.1.5"),
    pytest.param("cuda", "~=12.1.0", "cuda-12.2", False, id="~=12.1.0 refuses 12.2"),
    pytest.param("cuda", ">=12.1,<13", "cuda-12.4", True, id="range admits inside"),
    pytest.param("cuda", ">=12.1,<13", "cuda-13.0", False, id="range refuses upper bound"),
    pytest.param("cuda", ">=12.1,<13", "cuda-12.0", False, id="range refuses below"),
    pytest.param("cuda", " >= 12.1 , < 13 ", "cuda-12.10", True, id="spaces-around-clauses"),
    pytest.param("cuda", "12.4", "cuda-12.4", True, id="bare-version-means-equal"),
    pytest.param("cuda", "12.4", "cuda-12.40", False, id="bare-version-is-not-a-prefix"),
    pytest.param("cuda", ">=12.1", "cann-12.4", False, id="other-stack-never"),
    pytest.param("cuda", "", "cann-8.0", False, id="other-stack-never-even-without-range"),
    pytest.param("cuda", "", "cudax-12.4", False, id="stack-name-is-not-a-prefix"),
    pytest.param("cuda", "", "cuda-12.4", True, id="no-range-admits-any-version"),
    pytest.param("cann", "", "cann", True, id="no-range-admits-versionless-tag"),
    pytest.param("cuda", ">=12.1", "cuda", False, id="versionless-tag-fails-a-range"),
    pytest.param("CUDA", ">=12.1", "cuda-12.4", True, id="stack-name-case-insensitive"),
    pytest.param("x86-64", ">=v3", "x86-64-v4", True, id="x86-64 >=v3 admits v4"),
    pytest.param("x86-64", ">=v4", "x86-64-v3", False, id="x86-64 >=v4 refuses v3"),
    pytest.param("x86-64", "", "x86-64", True, id="x86-64 admits a versionless x86-64 tag"),
    pytest.param("aarch64", ">=armv8.2", "aarch64-armv8.1", False, id="aarch64 >=armv8.2 refuses armv8.1"),
    pytest.param("dtk", ">=23.10", "dtk-24.04", True, id="dtk >=23.10 admits 24.04"),
]


@pytest.mark.parametrize(("stack", "versions", "tag", "admitted"), ADMITS)
def test_requirement_admits_tags_by_stack_and_range(stack, versions, tag, admitted):
    """A requirement admits a site's tag only for the same stack name and a version inside every clause."""
    assert parse_requirement(stack, versions).admits(tag) is admitted


def test_requirement_keeps_its_image_and_text():
    """A parsed requirement carries the image to run and a readable text for explanations."""
    req = parse_requirement("cann", ">=8.0", "registry.example/train:cann8")
    assert (req.stack, req.image, req.text) == ("cann", "registry.example/train:cann8", "cann>=8.0")


BAD_RANGES = [">=", "=>12", "~=8", ">=12.*", "<8.*", "~=8.*", ">=12.1;<13", ">= 12 13", "=12", ">>12", "*"]


@pytest.mark.parametrize("versions", BAD_RANGES)
def test_bad_ranges_raise_invalid_input_naming_software(versions):
    """A range that does not parse raises InvalidInput for the field "software", quoting the clause."""
    with pytest.raises(InvalidInput) as caught:
        parse_requirement("cuda", versions)
    assert caught.value.field == "software"


@pytest.mark.parametrize("versions", [">=", "=>12", "~=8", ">=12.*"])
def test_job_spec_with_a_bad_range_fails_validation_on_software(versions):
    """A JobSpec whose software option has a bad range is refused with field "software"."""
    body = {"resources": {"arch": "GPU", "count": 1}, "origin": "shanghai", "duration_hours": 1,
            "software": [{"stack": "cuda", "versions": ">=12.1", "image": "a"},
                         {"stack": "cann", "versions": versions, "image": "b"}]}  # fmt: skip
    with pytest.raises(InvalidInput) as caught:
        parse(JobSpec, body)
    assert caught.value.field == "software"


def test_job_spec_with_good_ranges_validates():
    """Good ranges (with wildcards, compatible releases and several clauses) pass JobSpec validation."""
    spec = parse(JobSpec, {
        "resources": {"arch": "GPU", "count": 1}, "origin": "shanghai", "duration_hours": 1,
        "software": [{"stack": "cuda", "versions": ">=12.1,<13"}, {"stack": "cann", "versions": "==8.*"},
                     {"stack": "neuware", "versions": "~=3.10"}, {"stack": "musa"}],
    })  # fmt: skip
    assert [s.stack for s in spec.software] == ["cuda", "cann", "neuware", "musa"]
