"""HTTPS on the broker: `--tls-cert/--tls-key` (Settings.tls_cert/tls_key) serve the API over TLS."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import aiohttp
import pytest

from suanwang.servers import MosquittoServer, RedisServer
from tests.integration.test_end_to_end import running_broker


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, made with the system's openssl."""
    if shutil.which("openssl") is None:
        subprocess.run(["apt-get", "install", "-y", "-q", "openssl"], check=True)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)  # fmt: skip
    return cert, key


async def test_api_is_served_over_https(redis_server: RedisServer, own_mosquitto: MosquittoServer, namespace: str,
                                        certificate: tuple[Path, Path]) -> None:  # fmt: skip
    """With a certificate the broker answers HTTPS, verified against that certificate, and not plain HTTP."""
    cert, key = certificate
    async with running_broker(redis_server, own_mosquitto, namespace, tls_cert=str(cert), tls_key=str(key)) as broker:
        assert broker.url.startswith("https://")
        trust = ssl.create_default_context(cafile=str(cert))
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{broker.url}/healthz", ssl=trust) as response:
                assert response.status == 200
            with pytest.raises(aiohttp.ClientError):
                async with session.get(broker.url.replace("https://", "http://") + "/healthz") as response:
                    await response.read()
