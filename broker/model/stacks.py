"""Software stacks: the tags sites publish ("cuda-12.4", "cann-8.0", "x86-64-v4") and the ranges jobs ask
for ("cuda>=12.1,<13").

Accelerator stacks do not follow PEP 440 ("armv8.2", "v4", "24.04"), so versions compare as sequences
of numeric and alphabetic runs: 12.10 > 12.9 > 12.1, and "armv8.2" > "armv8.1".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache, total_ordering

from common.errors import InvalidInput

_RUN = re.compile(r"\d+|[a-z]+")
_CLAUSE = re.compile(r"^(>=|<=|==|!=|~=|>|<)?\s*([a-z0-9][a-z0-9.*+-]*)$")


@total_ordering
@dataclass(frozen=True)
class Version:
    parts: tuple[tuple[int, int | str], ...]  # (0, number) sorts before (1, letters) at the same position

    @classmethod
    def parse(cls, text: str) -> Version:
        runs = _RUN.findall(text.lower())
        return cls(tuple((0, int(r)) if r.isdigit() else (1, r) for r in runs))

    def _padded(self, n: int) -> tuple[tuple[int, int | str], ...]:
        return self.parts + ((0, 0),) * (n - len(self.parts))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        n = max(len(self.parts), len(other.parts))
        return self._padded(n) == other._padded(n)

    def __hash__(self) -> int:
        parts = list(self.parts)
        while parts and parts[-1] == (0, 0):
            parts.pop()
        return hash(tuple(parts))

    def __lt__(self, other: Version) -> bool:
        n = max(len(self.parts), len(other.parts))
        return self._padded(n) < other._padded(n)

    def startswith(self, prefix: Version) -> bool:
        """Whether the version lies in the series `prefix` (12 is in 12.0.*, as 12 == 12.0)."""
        return self._padded(max(len(self.parts), len(prefix.parts)))[: len(prefix.parts)] == prefix.parts


# Stack names that contain a dash themselves.
DASHED_NAMES = ("x86-64",)


def split_tag(tag: str) -> tuple[str, str]:
    """ "cuda-12.4" -> ("cuda", "12.4"); "x86-64-v4" -> ("x86-64", "v4"); "cann" -> ("cann", "")."""
    for name in DASHED_NAMES:
        if tag == name:
            return tag, ""
        if tag.startswith(name + "-"):
            return name, tag[len(name) + 1 :]
    name, sep, version = tag.rpartition("-")
    if not sep or not name or not version or not version[0].isalnum():
        return tag, ""
    if not any(ch.isdigit() for ch in version):
        return tag, ""  # a dash inside a name ("x86-64") without a version after it
    return name, version


@dataclass(frozen=True)
class Requirement:
    """One stack a job can run on, with an optional version range and the image to use there."""

    stack: str
    clauses: tuple[tuple[str, Version, bool], ...]  # (operator, version, wildcard)
    image: str | None = None
    text: str = ""

    def admits(self, tag: str) -> bool:
        name, raw = split_tag(tag)
        if name != self.stack:
            return False
        if not self.clauses:
            return True
        if not raw:
            return False
        version = Version.parse(raw)
        return all(_holds(version, op, bound, wildcard) for op, bound, wildcard in self.clauses)


def _holds(version: Version, op: str, bound: Version, wildcard: bool) -> bool:
    if wildcard:
        match = version.startswith(bound)
        return match if op == "==" else not match
    if op == "~=":  # compatible release: >= bound and the same series (all but the last part)
        return version >= bound and version.startswith(Version(bound.parts[:-1]))
    return {
        ">=": version >= bound, "<=": version <= bound, ">": version > bound, "<": version < bound,
        "==": version == bound, "!=": version != bound,
    }[op]  # fmt: skip


@lru_cache(maxsize=4096)
def parse_requirement(stack: str, versions: str = "", image: str | None = None) -> Requirement:
    """Parse `versions` like ">=12.1,<13" or "==8.*"; raises InvalidInput naming the bad clause."""
    stack = stack.strip().lower()
    clauses = []
    for raw in filter(None, (c.strip() for c in versions.lower().split(","))):
        found = _CLAUSE.match(raw)
        if not found:
            raise InvalidInput(f"bad version range {raw!r} for {stack}: use e.g. '>=12.1,<13'", "software")
        op, bound = found.group(1) or "==", found.group(2)
        wildcard = bound.endswith(".*")
        if wildcard and op not in ("==", "!="):
            raise InvalidInput(f"wildcard only with == or != in {raw!r}", "software")
        if op == "~=" and len(Version.parse(bound).parts) < 2:
            raise InvalidInput(f"~= needs at least two version parts in {raw!r}", "software")
        clauses.append((op, Version.parse(bound.removesuffix(".*")), wildcard))
    return Requirement(stack, tuple(clauses), image, f"{stack}{versions}")
