"""Admin routes over HTTP: tokens and the site registry, each answer shown once and refusals kept."""

from __future__ import annotations

from tests.http.harness import Api


async def test_token_made_over_http_works_and_revoked_stops(api: Api) -> None:
    """An admin makes a token (201, shown once), which then authenticates; once revoked by id it is 401."""
    admin = api.tokens.add("admin", "ops")
    made = await api.call("POST", "/v1/admin/tokens", admin, {"role": "operator", "tenant": "ops", "name": "noc"})
    assert made.status == 201 and made.body["role"] == "operator"
    assert (await api.call("GET", "/v1/sites", made.body["token"])).status == 200
    listed = (await api.call("GET", "/v1/admin/tokens", admin)).body["tokens"]
    assert made.body["id"] in {t["id"] for t in listed} and all("token" not in t for t in listed)
    assert (await api.call("DELETE", f"/v1/admin/tokens/{made.body['id']}", admin)).status == 200
    assert (await api.call("GET", "/v1/sites", made.body["token"])).status == 401


async def test_bad_token_request_is_400_naming_the_field(api: Api) -> None:
    """A token request with an unknown role is 400 naming `role`."""
    reply = await api.call("POST", "/v1/admin/tokens", api.tokens.add("admin", "ops"), {"role": "root",
                                                                                         "tenant": "ops"})  # fmt: skip
    assert reply.status == 400 and reply.body["error"]["field"] == "role"


async def test_site_registers_once(api: Api) -> None:
    """A site registers with its MQTT credentials (201); the same id again is 409 unless rotated; removed, it is
    gone."""
    admin = api.tokens.add("admin", "ops")
    site = {"id": "guian-09", "hub": "guizhou"}
    first = await api.call("POST", "/v1/admin/sites", admin, site)
    assert first.status == 201 and first.body["mqtt_username"] == "guian-09" and first.body["mqtt_password"]
    assert (await api.call("POST", "/v1/admin/sites", admin, site)).status == 409
    assert (await api.call("POST", "/v1/admin/sites", admin, {**site, "rotate": True})).status == 201
    assert (await api.call("DELETE", "/v1/admin/sites/guian-09", admin)).body == {"revoked": "guian-09"}
    assert (await api.call("DELETE", "/v1/admin/sites/guian-09", admin)).status == 404
