"""Faults: the persister killed mid-batch, Postgres down during a sale."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis

from flashsale import db
from flashsale.embedded import EmbeddedPostgres
from flashsale.keys import Keys
from flashsale.persister import Persister
from flashsale.queue import backlog
from flashsale.reconcile import reconcile
from flashsale.settings import Settings

from . import procs
from .conftest import STORE, create_sale, drained, serving

# Heavy (many processes, thousands of requests): these run one after another on one xdist
# worker (make test uses --dist loadgroup), never two at once on this 2-core machine.
pytestmark = pytest.mark.xdist_group("heavy")

N = 600


async def crowd(c: httpx.AsyncClient, sale_id: str, n: int, offset: int = 0) -> list[str]:
    sem = asyncio.Semaphore(100)

    async def one(i: int) -> str:
        async with sem:
            r = await c.post(
                f"/v1/sales/{sale_id}/reservations", json={"user_id": f"u{offset + i}", "sku": "phone", "quantity": 1}
            )
            assert r.status_code == 201, r.text
            rid: str = r.json()["reservation_id"]
            return rid

    return list(await asyncio.gather(*(one(i) for i in range(n))))


async def slow_inserts(pg: asyncpg.Connection) -> None:
    """A trigger slows every insert, so that a kill lands while a batch is being written."""
    await pg.execute("""
        CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN PERFORM pg_sleep(0.002); RETURN NEW; END $$;
        CREATE TRIGGER slow BEFORE INSERT ON reservations FOR EACH ROW EXECUTE FUNCTION slow();""")


async def test_persister_killed_mid_batch_loses_nothing_and_doubles_nothing(
    client: httpx.AsyncClient, settings: Settings, redis: Redis, keys: Keys, pg: asyncpg.Connection
) -> None:
    sale = await create_sale(
        client, items=[{"sku": "phone", "name": "P", "price_cents": 1, "stock": N, "per_user_limit": 1}]
    )
    rids = await crowd(client, sale["id"], N)
    await slow_inserts(pg)
    count = "SELECT count(*) FROM reservations WHERE sale_id = $1"
    with procs.worker(settings, FLASHSALE_PERSIST_BATCH="200") as first:
        while await pg.fetchval(count, sale["id"]) < 200:
            await asyncio.sleep(0.01)
        first.send_signal(signal.SIGKILL)
        first.wait()
    persisted = await pg.fetchval(count, sale["id"])
    assert 0 < persisted < N, "the kill should land mid-way"
    assert (await backlog(redis, keys, sale["id"])).events > 0
    with procs.worker(settings, FLASHSALE_PERSIST_BATCH="200"):  # a new consumer claims the dead one's entries
        await drained(redis, keys, sale["id"], timeout=90)
    found = await pg.fetch("SELECT id, status FROM reservations WHERE sale_id = $1", sale["id"])
    assert sorted(r["id"] for r in found) == sorted(rids)
    assert {r["status"] for r in found} == {"held"}
    assert (await reconcile(redis, pg, keys, sale["id"])).differences == []


@pytest.fixture
async def own_postgres(settings: Settings) -> AsyncIterator[tuple[EmbeddedPostgres, Settings]]:
    """A throwaway Postgres this test may stop and start, migrated."""
    server = await asyncio.to_thread(lambda: EmbeddedPostgres().start())
    conn = await asyncpg.connect(server.url)
    await db.migrate(conn, settings.migrations_dir)
    await conn.close()
    try:
        yield server, dataclasses.replace(settings, database_url=server.url)
    finally:
        await asyncio.to_thread(server.stop)


async def test_postgres_down_during_a_sale_reservations_go_on_and_the_backlog_drains(
    own_postgres: tuple[EmbeddedPostgres, Settings], redis: Redis, keys: Keys
) -> None:
    server, settings = own_postgres
    pool = await db.create_pool(settings.database_url, 2)
    persister = Persister(redis, pool, keys, settings)
    stop = asyncio.Event()
    task = asyncio.create_task(persister.run(stop))
    try:
        async with serving(settings) as url, httpx.AsyncClient(base_url=url, headers=STORE, timeout=30) as c:
            sale = await create_sale(
                c, items=[{"sku": "phone", "name": "P", "price_cents": 1, "stock": 1000, "per_user_limit": 1}]
            )
            before = await crowd(c, sale["id"], 100)
            await drained(redis, keys, sale["id"])

            await asyncio.to_thread(server.pause)
            during = await crowd(c, sale["id"], 300, offset=100)  # every one still a 201
            assert (await c.get("/readyz")).status_code == 503
            await asyncio.sleep(1)
            lag = await backlog(redis, keys, sale["id"])
            assert lag.events >= 300 and lag.oldest_age_s >= 1

            await asyncio.to_thread(server.start)
            await drained(redis, keys, sale["id"], timeout=60)
            assert (await c.get("/readyz")).status_code == 200
        conn = await asyncpg.connect(settings.database_url)
        try:
            found = await conn.fetch("SELECT id FROM reservations WHERE sale_id = $1", sale["id"])
            assert sorted(r["id"] for r in found) == sorted(before + during)
            assert (await reconcile(redis, conn, keys, sale["id"])).differences == []
        finally:
            await conn.close()
    finally:
        stop.set()
        await task
        await pool.close()
