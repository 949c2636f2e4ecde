"""Who may call the API: roles, tenants and the identity a token stands for (pure; tokens live in
`broker.state.tokens`, the role each route needs in `broker.http`).

Roles are ordered: `user` (its own tenant's jobs) < `operator` (every job, the sites, the dashboard and
the live stream) < `admin` (also tokens and the site registry).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from common.errors import InvalidInput

ROLES = ("user", "operator", "admin")
PUBLIC = "public"
RANK = {PUBLIC: -1, "user": 0, "operator": 1, "admin": 2}
TOKEN_PREFIX = "sw_"
TENANT = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")  # as the job schema's Identifier


@dataclass(frozen=True)
class Identity:
    """Who is calling: a token's id, role and tenant."""

    id: str
    role: str
    tenant: str
    name: str = ""
    created: str = ""

    def at_least(self, role: str) -> bool:
        return RANK[self.role] >= RANK[role]

    def as_dict(self) -> dict[str, str]:
        return {"id": self.id, "role": self.role, "tenant": self.tenant, "name": self.name, "created": self.created}


# With authentication off every caller is an admin of the `default` tenant that may act for any tenant.
OPEN = Identity(id="", role="admin", tenant="default", name="auth off")


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_tenant(tenant: str) -> str:
    if not TENANT.match(tenant):
        raise InvalidInput(f"tenant must be 1-64 lowercase letters, digits, '.', '_' or '-', got {tenant[:70]!r}",
                           "tenant")  # fmt: skip
    return tenant
