"""Settings from flags and environment variables (flag wins), as one plain dataclass."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from suanwang.errors import InvalidInput

DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
DEFAULT_MQTT = "mqtt://127.0.0.1:1883"
DEFAULT_HTTP = "127.0.0.1:8080"


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
    # Most jobs one scheduling pass takes from the queue.
    batch: int = 512
    max_body_bytes: int = 64 * 1024
    replica: str = field(default_factory=lambda: f"{os.uname().nodename}-{os.getpid()}")

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
        }
        for name, var in (("site_ttl_s", "SUANWANG_SITE_TTL"), ("accept_timeout_s", "SUANWANG_ACCEPT_TIMEOUT")):
            if var in env:
                try:
                    values[name] = float(env[var])
                except ValueError:
                    raise InvalidInput(f"{var} must be a number of seconds, got {env[var]!r}", var) from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]
