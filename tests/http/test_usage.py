"""Usage over HTTP: a user reads its own tenant's records only; operators may read every tenant's."""

from __future__ import annotations

from tests.http.doubles import MemoryQueries
from tests.http.harness import Start

RECORDS = [
    {"job": "j1", "tenant": "acme", "hub": "guizhou", "device_hours": 2.0, "cost": 20.0},
    {"job": "j2", "tenant": "globex", "hub": "yangtze", "device_hours": 1.0, "cost": 30.0},
]


async def test_user_reads_only_its_tenants_usage(start: Start) -> None:
    """A user's usage is its tenant's records with their totals; asking for every tenant is 403."""
    api = await start(queries=MemoryQueries(RECORDS))
    user = api.tokens.add("user", "acme")
    reply = await api.call("GET", "/v1/usage", user)
    assert [r["job"] for r in reply.body["records"]] == ["j1"] and reply.body["total_cost_cny"] == 20.0
    assert reply.body["by_tenant"] == [{"tenant": "acme", "jobs": 1, "device_hours": 2.0, "cost_cny": 20.0}]
    assert (await api.call("GET", "/v1/usage?tenant=*", user)).status == 403
    assert api.queries.asked_tenants == ["acme"]


async def test_operator_reads_every_tenant_largest_cost_first(start: Start) -> None:
    """With ?tenant=* an operator gets all records, totals by hub ordered by cost."""
    api = await start(queries=MemoryQueries(RECORDS))
    reply = await api.call("GET", "/v1/usage?tenant=*", api.tokens.add("operator", "ops"))
    assert [row["hub"] for row in reply.body["by_hub"]] == ["yangtze", "guizhou"]
    assert api.queries.asked_tenants == [None]


async def test_usage_as_csv_and_bad_times(start: Start) -> None:
    """format=csv answers a spreadsheet with the record columns; a time that is neither epoch ms nor ISO is 400."""
    api = await start(queries=MemoryQueries(RECORDS))
    user = api.tokens.add("user", "acme")
    csv = await api.call("GET", "/v1/usage?format=csv", user)
    assert csv.status == 200 and csv.headers["Content-Type"].startswith("text/csv")
    assert csv.body.decode().splitlines()[0].startswith("job,tenant,site,hub")
    bad = await api.call("GET", "/v1/usage?from=last-week", user)
    assert bad.status == 400 and bad.body["error"]["field"] == "from"
    naive = await api.call("GET", "/v1/usage?to=2026-01-01T00:00:00", user)
    assert naive.status == 400 and naive.body["error"]["field"] == "to"
