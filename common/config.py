"""Settings from flags and environment variables (flag wins), as one plain dataclass."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from common.errors import InvalidInput

DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
DEFAULT_MQTT = "mqtt://127.0.0.1:1883"
DEFAULT_HTTP = "127.0.0.1:8080"
AUTH_MODES = ("required", "off")
# What the MQTT mirror of the event log publishes: one message per event on `allocations`, one message per
# read of the log (a JSON array, in order) on `allocations/batch`, both, or nothing.
MIRROR_MODES = ("events", "batches", "both", "off")
_TRUE = ("1", "true", "yes", "on")
# Numeric settings read from the environment: (field, variable, type, what the variable must be)
_NUMBER_VARS: tuple[tuple[str, str, type[float] | type[int], str], ...] = (
    ("site_ttl_s", "SUANWANG_SITE_TTL", float, "a number of seconds"),
    ("accept_timeout_s", "SUANWANG_ACCEPT_TIMEOUT", float, "a number of seconds"),
    ("finished_retention_hours", "SUANWANG_FINISHED_RETENTION_HOURS", float, "a number"),
    ("usage_retention_days", "SUANWANG_USAGE_RETENTION_DAYS", float, "a number"),
    ("archive_retention_days", "SUANWANG_ARCHIVE_RETENTION_DAYS", float, "a number"),
    ("quote_rate", "SUANWANG_QUOTE_RATE", float, "a number"), ("quote_burst", "SUANWANG_QUOTE_BURST", int, "a number"),
    ("auth_failures_per_minute", "SUANWANG_AUTH_FAILURES", int, "a number"),
    ("hold_ttl_s", "SUANWANG_HOLD_TTL", float, "a number of seconds"),
    ("hold_max_ttl_s", "SUANWANG_HOLD_MAX_TTL", float, "a number of seconds"),
    ("max_holds_per_tenant", "SUANWANG_MAX_HOLDS_PER_TENANT", int, "a number"),
    ("max_preemptions", "SUANWANG_MAX_PREEMPTIONS", int, "a number"),
    ("durable_accept", "SUANWANG_DURABLE_ACCEPT", int, "a number of replicas"),
    ("durable_accept_timeout_ms", "SUANWANG_DURABLE_ACCEPT_TIMEOUT_MS", int, "a number of milliseconds"),
    ("job_shards", "SUANWANG_JOB_SHARDS", int, "a number of job shards"),
)  # fmt: skip


@dataclass(frozen=True)
class MqttTarget:
    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls: bool = False

    @classmethod
    def from_url(cls, url: str) -> MqttTarget:
        """Parse `mqtt://user:pass@host:port` (or `mqtts://` for TLS)."""
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise InvalidInput(f"MQTT URL must start with mqtt:// or mqtts://, got {url!r}", "mqtt")
        tls = parts.scheme in ("mqtts", "ssl")
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError:
            raise InvalidInput(f"MQTT URL has a bad port: {url!r}", "mqtt") from None
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=port,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            tls=tls,
        )

    @property
    def url(self) -> str:
        auth = f"{self.username}:{self.password}@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{auth}{self.host}:{self.port}"

    @property
    def safe_url(self) -> str:
        """The URL without the password, for logs."""
        auth = f"{self.username}:***@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{auth}{self.host}:{self.port}"

    def tls_params(self) -> Any:
        """aiomqtt's TLS parameters for `mqtts://` (CA bundle from SUANWANG_MQTT_CA, else the system's)."""
        if not self.tls:
            return None
        import aiomqtt  # here: config stays importable without the MQTT client

        return aiomqtt.TLSParameters(ca_certs=os.environ.get("SUANWANG_MQTT_CA") or None)


def redact_url(url: str) -> str:
    """`scheme://user:***@host...`: a URL fit for logs."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)


def parse_prices(text: str, var: str) -> tuple[tuple[str, float], ...]:
    """`hub=price,hub=price` (CNY per GB) as pairs; InvalidInput naming `var` when malformed."""
    pairs: list[tuple[str, float]] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        hub, sep, price = item.partition("=")
        try:
            value = float(price)
        except ValueError:
            value = -1.0
        if not sep or not hub.strip() or not value >= 0:
            raise InvalidInput(f"{var} must be hub=price pairs separated by commas (CNY per GB), got {item!r}", var)
        pairs.append((hub.strip(), value))
    return tuple(pairs)


def parse_http(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise InvalidInput(f"HTTP address must be host:port, got {address!r}", "http")
    return host or "127.0.0.1", int(port)


@dataclass(frozen=True)
class Settings:
    redis_url: str = DEFAULT_REDIS
    mqtt_url: str = DEFAULT_MQTT
    http: str = DEFAULT_HTTP
    namespace: str = "sw"
    # `$share` group for site events; empty for brokers without shared subscriptions (embedded demo broker)
    share_group: str = "suanwang"
    # Seconds a site may stay silent before the matcher stops offering it.
    site_ttl_s: float = 30.0
    # Seconds an assignment may wait for the site's `accepted` before it returns to the queue.
    accept_timeout_s: float = 30.0
    # Seconds a job waits before a pool is held back for it (EASY backfill: only shorter work may use it).
    reserve_after_s: float = 30.0
    # Most jobs one scheduling pass takes from the queue.
    batch: int = 512
    max_body_bytes: int = 64 * 1024
    # API tokens: "required" (what `suanwang serve` runs with) or "off" (every caller is an admin).
    auth: str = "off"
    # Drop MQTT messages from sites missing from the registry (`suanwang site register`).
    require_registered: bool = False
    # Largest MQTT payload ingest applies; a larger one is dropped unread.
    max_message_bytes: int = 256 * 1024
    # Submissions per API token: a bucket of `submit_burst` refilled at `submit_rate` per second.
    submit_rate: float = 20.0
    submit_burst: int = 100
    # Most jobs one tenant may have queued at once.
    max_queued_per_tenant: int = 10_000
    # Quotes per API token (every replica shares the bucket): a bucket of `quote_burst` refilled at `quote_rate`/s.
    quote_rate: float = 2.0
    quote_burst: int = 10
    # Unknown API tokens one client address may send per minute (per replica) before it is answered 429.
    auth_failures_per_minute: int = 30
    # Holds (POST /v1/quote?hold=true): how long one lasts unless asked otherwise, the longest it may be asked
    # to last, and how many one tenant may have standing at once.
    hold_ttl_s: float = 60.0
    hold_max_ttl_s: float = 600.0
    max_holds_per_tenant: int = 20
    # Times a preemptible job may be preempted before it is no longer preemptible; 0 turns preemption off.
    max_preemptions: int = 3
    # Hours a finished job stays in the hot set (listings, state indexes) before it is archived.
    finished_retention_hours: float = 168.0
    # Days the global usage log keeps (operators' reads across tenants, the dashboard's revenue).
    usage_retention_days: float = 35.0
    # Days an archived job stays readable by id; 0 keeps archived jobs.
    archive_retention_days: float = 365.0
    # HTTPS: certificate chain and private key (PEM); both or neither.
    tls_cert: str | None = None
    tls_key: str | None = None
    mirror: str = "events"
    # Egress price per GB sent out of a hub, overriding the seeded estimates: (hub, CNY per GB) pairs.
    egress_cny_per_gb: tuple[tuple[str, float], ...] = ()
    # Durable accept: a submission is answered 202 only once this many Redis replicas have its job (WAIT), so
    # a failover to one of them loses no accepted job; 0 answers once the primary has it.
    durable_accept: int = 0
    durable_accept_timeout_ms: int = 1000
    # Job shards: tenants' jobs, queues and holds spread over this many hash tags (Redis Cluster spreads them
    # over its nodes). Fixed from a deployment's first start; None: as recorded (1 for a new one).
    job_shards: int | None = None
    replica: str = field(default_factory=lambda: f"{os.uname().nodename}-{os.getpid()}")

    def __post_init__(self) -> None:
        if self.auth not in AUTH_MODES:
            raise InvalidInput(f"auth must be one of {', '.join(AUTH_MODES)}, got {self.auth!r}", "auth")
        if self.mirror not in MIRROR_MODES:
            raise InvalidInput(f"mirror must be one of {', '.join(MIRROR_MODES)}, got {self.mirror!r}", "mirror")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise InvalidInput("give both --tls-cert and --tls-key, or neither", "tls_cert")
        if self.submit_rate <= 0 or self.submit_burst < 1 or self.max_queued_per_tenant < 1:
            raise InvalidInput("submit rate, burst and the queued-jobs bound must be positive", "submit_rate")
        if self.quote_rate <= 0 or self.quote_burst < 1:
            raise InvalidInput("quote rate and burst must be positive", "quote_rate")
        if self.auth_failures_per_minute < 1:
            raise InvalidInput("auth_failures_per_minute must be at least 1", "auth_failures_per_minute")
        if self.finished_retention_hours <= 0 or self.archive_retention_days < 0:
            raise InvalidInput("finished_retention_hours must be positive and archive_retention_days not negative",
                               "finished_retention_hours")  # fmt: skip
        if self.max_preemptions < 0:
            raise InvalidInput("max_preemptions must not be negative", "max_preemptions")
        if not 0 < self.hold_ttl_s <= self.hold_max_ttl_s or self.max_holds_per_tenant < 1:
            raise InvalidInput("hold_ttl_s must be positive and at most hold_max_ttl_s, and max_holds_per_tenant at "
                               "least 1", "hold_ttl_s")  # fmt: skip
        if self.durable_accept < 0 or self.durable_accept_timeout_ms < 1:
            raise InvalidInput("durable_accept must not be negative and durable_accept_timeout_ms must be positive",
                               "durable_accept")  # fmt: skip
        if self.usage_retention_days < 1:  # the dashboard's revenue reads the last 24 hours of the log
            raise InvalidInput("usage_retention_days must be at least 1", "usage_retention_days")

    @property
    def mqtt(self) -> MqttTarget:
        return MqttTarget.from_url(self.mqtt_url)

    @property
    def http_address(self) -> tuple[str, int]:
        return parse_http(self.http)

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        """Settings from SUANWANG_* variables; keyword overrides that are not None win."""
        env = os.environ
        values: dict[str, object] = {
            "redis_url": env.get("SUANWANG_REDIS_URL", DEFAULT_REDIS),
            "mqtt_url": env.get("SUANWANG_MQTT_URL", DEFAULT_MQTT),
            "http": env.get("SUANWANG_HTTP", DEFAULT_HTTP),
            "namespace": env.get("SUANWANG_NAMESPACE", "sw"),
            "share_group": env.get("SUANWANG_SHARE_GROUP", "suanwang"),
            # the dataclass default is "off" for in-process brokers; anything started from the environment
            # (serve, demo) requires tokens unless told otherwise
            "auth": env.get("SUANWANG_AUTH", "required"),
            "require_registered": env.get("SUANWANG_REQUIRE_REGISTERED", "").lower() in _TRUE,
            "tls_cert": env.get("SUANWANG_TLS_CERT") or None,
            "tls_key": env.get("SUANWANG_TLS_KEY") or None,
            "mirror": env.get("SUANWANG_MIRROR", "events"),
            "egress_cny_per_gb": parse_prices(env.get("SUANWANG_EGRESS_CNY_PER_GB", ""), "SUANWANG_EGRESS_CNY_PER_GB"),
        }
        for name, var, kind, what in _NUMBER_VARS:
            if var in env:
                try:
                    values[name] = kind(env[var])
                except ValueError:
                    raise InvalidInput(f"{var} must be {what}, got {env[var]!r}", var) from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]
