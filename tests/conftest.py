"""Fixtures: real servers (the ones in REDIS_URL / DATABASE_URL, else throwaway embedded ones),
a fresh Redis key space and a fresh database per test, and the app running under uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import secrets
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import asyncpg
import httpx
import pytest
import uvicorn
from redis.asyncio import Redis
from starlette.types import ASGIApp

from flashsale import db
from flashsale.api import create_app
from flashsale.dispatch import Dispatcher
from flashsale.embedded import EmbeddedPostgres, EmbeddedRedis, free_port
from flashsale.keys import Keys
from flashsale.persister import Persister
from flashsale.scripts import Scripts
from flashsale.settings import ROOT, Settings

OPS_KEY = "test-ops-" + secrets.token_hex(8)
STORE_KEY = "test-store-" + secrets.token_hex(8)
OPS = {"Authorization": f"Bearer {OPS_KEY}"}
STORE = {"Authorization": f"Bearer {STORE_KEY}"}
RUN = secrets.token_hex(4)


def with_database(url: str, name: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))


@dataclasses.dataclass
class Servers:
    redis_url: str
    admin_url: str  # a database we may CREATE DATABASE from
    template: str = ""


@pytest.fixture(scope="session")
def servers() -> Iterator[Servers]:
    started: list[EmbeddedRedis | EmbeddedPostgres] = []
    redis_url = os.environ.get("REDIS_URL", "")
    admin_url = os.environ.get("DATABASE_URL", "")
    if not redis_url:
        started.append(EmbeddedRedis().start())
        redis_url = started[-1].url
    if not admin_url:
        started.append(EmbeddedPostgres().start())
        admin_url = started[-1].url
    s = Servers(redis_url, admin_url, template=f"flashsale_test_{RUN}_template")

    async def setup() -> None:
        admin = await asyncpg.connect(admin_url)
        await admin.execute(f'CREATE DATABASE "{s.template}"')
        await admin.close()
        conn = await asyncpg.connect(with_database(admin_url, s.template))
        await db.migrate(conn, ROOT / "migrations")
        await conn.close()

    async def teardown() -> None:
        admin = await asyncpg.connect(admin_url)
        names = await admin.fetch("SELECT datname FROM pg_database WHERE datname LIKE $1", f"flashsale_test_{RUN}_%")
        for row in names:
            await admin.execute(f'DROP DATABASE IF EXISTS "{row["datname"]}" WITH (FORCE)')
        await admin.close()

    asyncio.run(setup())
    try:
        yield s
    finally:
        asyncio.run(teardown())
        for server in reversed(started):
            server.stop()


@pytest.fixture
async def database_url(servers: Servers) -> AsyncIterator[str]:
    """A fresh, migrated database of this test's own."""
    name = f"flashsale_test_{RUN}_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(servers.admin_url)
    await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{servers.template}"')
    await admin.close()
    yield with_database(servers.admin_url, name)
    admin = await asyncpg.connect(servers.admin_url)
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.close()


@pytest.fixture
def settings(servers: Servers, database_url: str) -> Settings:
    """A key space of this test's own (its own prefix) and fast timers."""
    return Settings(
        redis_url=servers.redis_url,
        database_url=database_url,
        ops_keys=(OPS_KEY,),
        storefront_keys=(STORE_KEY,),
        key_prefix=f"fst{RUN}{secrets.token_hex(3)}",
        user_rate_per_s=0,
        sweep_interval_ms=50,
        claim_idle_ms=500,
        persist_block_ms=50,
        log_level="WARNING",
    )


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    client = Redis.from_url(settings.redis_url, decode_responses=True)
    yield client
    async for key in client.scan_iter(match=f"{settings.key_prefix}:*", count=1000):
        await client.unlink(key)
    await client.aclose()


@pytest.fixture
def keys(settings: Settings) -> Keys:
    return Keys(settings.key_prefix)


@pytest.fixture
async def scripts(redis: Redis, settings: Settings) -> AsyncIterator[Scripts]:
    """The Lua scripts on the test's Redis; its pipelines done before the loop closes."""
    loaded = Scripts.load(redis, settings.lua_dir)
    yield loaded
    await loaded.calls.close()


@pytest.fixture
async def pg(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()


@contextlib.asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[str]:
    """The real app under uvicorn on a free loopback port, in this event loop."""
    async with serving_asgi(create_app(settings)) as url:
        yield url


@contextlib.asynccontextmanager
async def serving_asgi(app: ASGIApp) -> AsyncIterator[str]:
    """An ASGI app under uvicorn on a free loopback port, in this event loop, until the block ends."""
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="on",
        backlog=4096,
        timeout_keep_alive=30,
    )
    server = uvicorn.Server(config)
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]  # Ctrl-C is pytest's
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("the app did not start; see the log above")
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        done, _ = await asyncio.wait([task], timeout=5)
        if not done:
            for t in asyncio.all_tasks():
                t.print_stack()
            await task


@pytest.fixture
async def app_url(settings: Settings, redis: Redis) -> AsyncIterator[str]:
    async with serving(settings) as url:
        yield url


@pytest.fixture
async def client(app_url: str) -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=app_url, headers=STORE, limits=limits, timeout=30) as c:
        yield c


@contextlib.asynccontextmanager
async def persisting(settings: Settings, redis: Any) -> AsyncIterator[Persister]:
    """What `flashsale worker` runs, in this process (on ``redis``, a plain or a cluster client)
    until the block ends: a persister, and beside it the webhooks' dispatcher (without it, no
    stream is trimmed and no sale retires: the webhooks group would never be done)."""
    async with dispatching(settings, redis), persister_alone(settings, redis) as persister:
        yield persister


@contextlib.asynccontextmanager
async def persister_alone(settings: Settings, redis: Any) -> AsyncIterator[Persister]:
    """A persister with no dispatcher beside it, in this process, until the block ends."""
    pool = await db.create_pool(settings.database_url, 2)
    persister = Persister(redis, pool, Keys(settings.key_prefix), settings)
    stop = asyncio.Event()
    task = asyncio.create_task(persister.run(stop))
    try:
        yield persister
    finally:
        stop.set()
        await task
        await pool.close()


@contextlib.asynccontextmanager
async def dispatching(settings: Settings, redis: Any) -> AsyncIterator[Dispatcher]:
    """The webhooks' dispatcher alone, in this process, until the block ends."""
    pool = await db.create_pool(settings.database_url, 2)
    scripts = Scripts.load(redis, settings.lua_dir)
    dispatcher = Dispatcher(redis, pool, Keys(settings.key_prefix), scripts, settings)
    stop = asyncio.Event()
    task = asyncio.create_task(dispatcher.run(stop))
    try:
        yield dispatcher
    finally:
        stop.set()
        await task
        await scripts.calls.close()
        await pool.close()


@pytest.fixture
async def worker(settings: Settings, redis: Redis) -> AsyncIterator[Persister]:
    """A persister running in this process, stopped at the end of the test."""
    async with persisting(settings, redis) as persister:
        yield persister


def sale_body(sale_id: str | None = None, **overrides: Any) -> dict[str, Any]:
    now = datetime.now(UTC)
    body: dict[str, Any] = {
        "id": sale_id or f"sale-{secrets.token_hex(4)}",
        "name": "Test sale",
        "starts_at": (now - timedelta(seconds=1)).isoformat(),
        "ends_at": (now + timedelta(hours=1)).isoformat(),
        "hold_seconds": 600,
        "items": [{"sku": "phone", "name": "Phone", "price_cents": 49900, "stock": 10, "per_user_limit": 2}],
    }
    body.update(overrides)
    return body


async def create_sale(client: httpx.AsyncClient, **overrides: Any) -> dict[str, Any]:
    r = await client.post("/v1/sales", json=sale_body(**overrides), headers=OPS)
    assert r.status_code == 201, r.text
    sale: dict[str, Any] = r.json()
    return sale


async def drained(redis: Redis, keys: Keys, sale_id: str, timeout: float = 20.0) -> None:
    """Waits until every event of the sale (in every slot of it) is in Postgres."""
    from flashsale.queue import backlog

    slots = [s for s in cast(str, await redis.hget(keys.sale(sale_id), "slots") or "").split(",") if s]
    deadline = asyncio.get_running_loop().time() + timeout
    while (await backlog(redis, keys, sale_id, slots)).events:
        assert asyncio.get_running_loop().time() < deadline, "the queue did not drain"
        await asyncio.sleep(0.05)


TESTS = Path(__file__).parent
