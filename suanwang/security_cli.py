"""`suanwang token`, `suanwang site` and `suanwang mqtt-config`: identities, straight against Redis (as
`suanwang audit` works), so the first admin token can be made before any broker runs."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from broker.model.identity import ROLES
from broker.state.registry import DEFAULT_BROKER_USER, SiteRegistry, write_mosquitto_files
from broker.state.store import Store
from broker.state.tokens import Tokens
from common.config import DEFAULT_REDIS
from suanwang.options import redis_option

T = TypeVar("T")
console = Console()

namespace_option = click.option("--namespace", envvar="SUANWANG_NAMESPACE", default="sw", show_default=True,
                                help="Redis key namespace (one deployment per namespace)")  # fmt: skip


async def with_store(redis_url: str | None, namespace: str, work: Callable[[Store], Awaitable[T]]) -> T:
    store = Store.from_url(redis_url or DEFAULT_REDIS, namespace)
    try:
        await store.use_layout()
        return await work(store)
    finally:
        await store.close()


def register(main: click.Group, run: Callable[[Any], Any], print_json: Callable[[Any], None]) -> None:
    """Add the identity commands to the `suanwang` group; `run` is the CLI's asyncio runner."""

    @main.group()
    def token() -> None:
        """API tokens: each has a role (user, operator, admin) and a tenant."""

    @token.command("create")
    @click.option("--role", type=click.Choice(ROLES), required=True)
    @click.option("--tenant", required=True, help="The tenant the token acts for")
    @click.option("--name", default="", help="A note on who holds it")
    @redis_option
    @namespace_option
    @click.option("--json", "as_json", is_flag=True)
    def token_create(role: str, tenant: str, name: str, redis_url: str | None, namespace: str, as_json: bool) -> None:
        """Create a token and print it; this is the only time it is shown."""
        made, identity = run(
            with_store(redis_url, namespace, lambda s: Tokens(s.redis, s.keys).create(role, tenant, name))
        )
        if as_json:
            print_json({"token": made, **identity.as_dict()})
            return
        console.print(f"{identity.role} token {identity.id} for tenant {identity.tenant} (shown once):",
                      highlight=False)  # fmt: skip
        click.echo(made)

    @token.command("revoke")
    @click.argument("token_or_id")
    @redis_option
    @namespace_option
    def token_revoke(token_or_id: str, redis_url: str | None, namespace: str) -> None:
        """Revoke a token, given the token itself or its id (brokers stop taking it within 2 s)."""
        identity = run(with_store(redis_url, namespace, lambda s: Tokens(s.redis, s.keys).revoke(token_or_id)))
        console.print(f"revoked {identity.role} token {identity.id} of tenant {identity.tenant}", highlight=False)

    @token.command("list")
    @redis_option
    @namespace_option
    @click.option("--json", "as_json", is_flag=True)
    def token_list(redis_url: str | None, namespace: str, as_json: bool) -> None:
        """List tokens (ids, roles, tenants; never the tokens)."""
        identities = run(with_store(redis_url, namespace, lambda s: Tokens(s.redis, s.keys).list()))
        if as_json:
            print_json({"tokens": [i.as_dict() for i in identities]})
            return
        table = Table("id", "role", "tenant", "name")
        for i in identities:
            table.add_row(i.id, i.role, i.tenant, i.name)
        console.print(table)

    @main.group()
    def site() -> None:
        """The site registry: which sites may speak, each with its own MQTT password."""

    @site.command("register")
    @click.argument("site_id")
    @click.option("--hub", required=True, help="Hub id, e.g. guizhou")
    @click.option("--cluster", default=None, help="Cluster id within the hub, e.g. guian")
    @click.option("--rotate", is_flag=True, help="Give an already registered site a new password")
    @redis_option
    @namespace_option
    def site_register(site_id: str, hub: str, cluster: str | None, rotate: bool, redis_url: str | None,
                      namespace: str) -> None:  # fmt: skip
        """Register a site and print its MQTT password (shown once); then regenerate `mqtt-config`."""
        from regions import load_geography

        geo = load_geography()
        _, password = run(with_store(redis_url, namespace,
                                     lambda s: SiteRegistry(s.redis, s.keys).register(site_id, hub, cluster, geo,
                                                                                      rotate=rotate)))  # fmt: skip
        console.print(f"site {site_id} registered; its MQTT user is {site_id}, its password (shown once):",
                      highlight=False)  # fmt: skip
        click.echo(password)
        console.print(f"adapter URL: mqtt://{site_id}:<password>@<mqtt-host>:1883; then run "
                      "`suanwang mqtt-config --out DIR` and reload Mosquitto (kill -HUP)", highlight=False)  # fmt: skip

    @site.command("list")
    @redis_option
    @namespace_option
    @click.option("--json", "as_json", is_flag=True)
    def site_list(redis_url: str | None, namespace: str, as_json: bool) -> None:
        """List registered sites."""
        sites = run(with_store(redis_url, namespace, lambda s: SiteRegistry(s.redis, s.keys).sites()))
        if as_json:
            print_json({"sites": [s.as_dict() for s in sites]})
            return
        table = Table("site", "hub", "cluster", "registered")
        for s in sites:
            table.add_row(s.id, s.hub, s.cluster or "", s.created)
        console.print(table)

    @site.command("revoke")
    @click.argument("site_id")
    @redis_option
    @namespace_option
    def site_revoke(site_id: str, redis_url: str | None, namespace: str) -> None:
        """Remove a site from the registry (regenerate `mqtt-config` to take away its MQTT login)."""
        run(with_store(redis_url, namespace, lambda s: SiteRegistry(s.redis, s.keys).revoke(site_id)))
        console.print(f"site {site_id} revoked", highlight=False)

    @main.command("mqtt-config")
    @click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
                  help="Folder for passwd, acl and suanwang.conf")  # fmt: skip
    @click.option("--broker-user", default=DEFAULT_BROKER_USER, show_default=True,
                  help="The broker's own MQTT account")  # fmt: skip
    @click.option(
        "--broker-password",
        envvar="SUANWANG_MQTT_BROKER_PASSWORD",
        default=None,
        help="Its password [default: the one stored by an earlier run, else a new one, printed once]",
    )
    @click.option(
        "--bridge-to",
        metavar="HOST:PORT",
        default=None,
        help="Also write hubs/<hub>/ for each hub with sites: its own Mosquitto's passwd and acl (that hub's "
        "sites only) and bridge.conf, a bridge to the core broker at HOST:PORT under the hub's bridge account",
    )
    @redis_option
    @namespace_option
    def mqtt_config(out_dir: Path, broker_user: str, broker_password: str | None, bridge_to: str | None,
                    redis_url: str | None, namespace: str) -> None:  # fmt: skip
        """Write Mosquitto's password and ACL files from the site registry (and, with --bridge-to, each hub's)."""
        texts, generated = run(
            with_store(
                redis_url,
                namespace,
                lambda s: SiteRegistry(s.redis, s.keys).mosquitto_files(broker_user, broker_password, bridge_to),
            )
        )
        files = write_mosquitto_files(out_dir, texts)
        for path in files:
            console.print(f"wrote {path}", highlight=False)
        if generated:
            console.print(f"new password for the broker's account {broker_user} (shown once):", highlight=False)
            click.echo(generated)
        console.print(
            f"add `include_dir {out_dir.resolve()}` (or the lines of suanwang.conf) to mosquitto.conf; "
            f"brokers connect with --mqtt mqtt://{broker_user}:<password>@host:1883",
            highlight=False,
        )
        hubs = [path.parent.name for path in files if path.name == "bridge.conf"]
        if hubs:
            console.print(
                f"bridged hubs {', '.join(hubs)}: add `include_dir {(out_dir / 'hubs').resolve()}/<hub>` to each "
                "hub's mosquitto.conf and point its sites there; restart a hub's Mosquitto after regenerating "
                "(bridges are not reloaded on SIGHUP)",
                highlight=False,
            )
