"""The options every `suanwang` command shares, defined once: where the broker and Redis are, the caller's
token and tenant, and JSON output for scripts."""

from __future__ import annotations

import click

from common.config import DEFAULT_HTTP, DEFAULT_REDIS

redis_option = click.option("--redis", "redis_url", envvar="SUANWANG_REDIS_URL", show_envvar=True,
                            help="Redis URL: redis://, rediss://, through Sentinel "
                                 "redis+sentinel://HOST:PORT[,HOST:PORT...]/MASTER/DB, or a Redis Cluster "
                                 f"redis+cluster://HOST:PORT[,HOST:PORT...]/ [default: {DEFAULT_REDIS}]")
http_option = click.option("--http", envvar="SUANWANG_HTTP", show_envvar=True, default=DEFAULT_HTTP,
                           show_default=True, help="HTTP address host:port")  # fmt: skip
token_option = click.option("--token", envvar="SUANWANG_TOKEN", show_envvar=True, default=None,
                            help="API token (suanwang token create)")  # fmt: skip
tenant_option = click.option("--tenant", envvar="SUANWANG_TENANT", default=None)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
