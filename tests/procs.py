"""Run `flashsale serve` and `flashsale worker` as real processes, as production does."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx

from flashsale.embedded import free_port
from flashsale.settings import Settings


def env_for(settings: Settings, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "REDIS_URL": settings.redis_url,
        "DATABASE_URL": settings.database_url,
        "FLASHSALE_OPS_KEYS": ",".join(settings.ops_keys),
        "FLASHSALE_STOREFRONT_KEYS": ",".join(settings.storefront_keys),
        "FLASHSALE_KEY_PREFIX": settings.key_prefix,
        "FLASHSALE_USER_RATE": str(settings.user_rate_per_s),
        "FLASHSALE_SWEEP_MS": str(settings.sweep_interval_ms),
        "FLASHSALE_CLAIM_IDLE_MS": str(settings.claim_idle_ms),
        "LOG_LEVEL": "WARNING",
        **extra,
    }


def spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "flashsale", *args], env=env, stdout=subprocess.DEVNULL)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def api(settings: Settings, workers: int = 2, **extra: str) -> Iterator[str]:
    """`flashsale serve --workers N` on a free port; yields its base URL once it answers."""
    port = free_port()
    proc = spawn(["serve", "--port", str(port), "--workers", str(workers)], env_for(settings, **extra))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, "flashsale serve exited during start-up"
            assert time.monotonic() < deadline, "flashsale serve did not answer in 30 s"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            time.sleep(0.1)
        yield url
    finally:
        stop(proc)


@contextlib.contextmanager
def worker(settings: Settings, **extra: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = spawn(["worker"], env_for(settings, **extra))
    try:
        yield proc
    finally:
        stop(proc)
