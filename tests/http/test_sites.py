"""Sites and hubs over HTTP against an in-memory store: what each site has free, and the totals per hub."""

from __future__ import annotations

from broker.model.records import SiteRecord
from tests.http.harness import Api

POOL = {"arch": "GPU", "model": "A100-80G", "memory_gb": 80, "per_node": 8, "price_cny_per_hour": 12.5}


def site(site_id: str, hub: str, status: str = "online", total: int = 64, external: int = 8, allocated: int = 16
         ) -> SiteRecord:  # fmt: skip
    return SiteRecord(id=site_id, hub=hub, cluster="", status=status, seen_ms=1_700_000_000_000, meta_version=1,
                      meta={"pools": [POOL], "energy": {"pue": 1.2}},
                      capacity={"t:A100-80G": total, "x:A100-80G": external, "a:A100-80G": allocated})  # fmt: skip


async def test_sites_show_free_capacity_and_filter_by_hub(api: Api) -> None:
    """Each pool shows free = total - in use outside - allocated, sites come sorted by id, and ?hub= filters."""
    api.store.sites = {"guian-02": site("guian-02", "guizhou"), "guian-01": site("guian-01", "guizhou"),
                       "wuhu-01": site("wuhu-01", "yangtze", total=8, external=4, allocated=8)}  # fmt: skip
    operator = api.tokens.add("operator", "ops")
    listed = (await api.call("GET", "/v1/sites", operator)).body["sites"]
    assert [s["id"] for s in listed] == ["guian-01", "guian-02", "wuhu-01"]
    assert listed[0]["pools"] == [{**POOL, "total": 64, "in_use_external": 8, "allocated": 16, "free": 40}]
    assert listed[2]["pools"][0]["free"] == 0  # over-committed counters never show negative capacity
    assert listed[0]["last_seen"] == "2023-11-14T22:13:20.000Z" and listed[0]["cluster"] is None
    filtered = (await api.call("GET", "/v1/sites?hub=yangtze", operator)).body["sites"]
    assert [s["id"] for s in filtered] == ["wuhu-01"]


async def test_one_site_has_its_status_history_and_unknown_is_404(api: Api) -> None:
    """A site's page adds its status changes; a site never heard of is 404."""
    api.store.sites = {"guian-01": site("guian-01", "guizhou")}
    api.store.site_statuses = {"guian-01": [{"ts": 1_700_000_000_000, "status": "online"}]}
    operator = api.tokens.add("operator", "ops")
    reply = await api.call("GET", "/v1/sites/guian-01", operator)
    assert reply.status == 200
    assert reply.body["status_history"] == [{"ts": "2023-11-14T22:13:20.000Z", "status": "online"}]
    assert (await api.call("GET", "/v1/sites/nowhere-01", operator)).status == 404


async def test_hubs_sum_their_sites(api: Api) -> None:
    """Every hub is listed; a hub's sites are counted (online apart) and their pools summed by architecture."""
    api.store.sites = {"guian-01": site("guian-01", "guizhou"), "guian-02": site("guian-02", "guizhou", "offline")}
    hubs = {h["id"]: h for h in (await api.call("GET", "/v1/hubs", api.tokens.add("user", "acme"))).body["hubs"]}
    assert "yangtze" in hubs and hubs["yangtze"]["sites"] == {"total": 0, "online": 0}
    assert hubs["guizhou"]["sites"] == {"total": 2, "online": 1}
    assert hubs["guizhou"]["capacity"] == {"GPU": {"total": 128, "allocated": 32, "free": 80, "in_use_external": 16}}
