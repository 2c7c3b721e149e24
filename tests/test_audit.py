"""The live audit: units that do not add up, and Redis against Postgres, on progress, in the
metrics and in the log (contract, "Scale")."""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest
from redis.asyncio import Redis

from flashsale import db
from flashsale.audit import Auditor
from flashsale.keys import Keys
from flashsale.persister import Persister
from flashsale.settings import Settings

from .conftest import OPS, create_sale, drained
from .test_metrics import scrape, value
from .test_reservations import reserve


async def progress(client: httpx.AsyncClient, sale: str) -> dict[str, object]:
    r = await client.get(f"/v1/sales/{sale}/progress", headers=OPS)
    assert r.status_code == 200, r.text
    doc: dict[str, object] = r.json()
    return doc


async def test_a_corrupted_counter_shows_as_drift_on_progress_and_in_the_metrics_at_once(
    client: httpx.AsyncClient, redis: Redis, keys: Keys
) -> None:
    sale = (await create_sale(client))["id"]  # 10 phones
    assert (await reserve(client, sale)).status_code == 201
    clean = await progress(client, sale)
    assert clean["drift"] == [] and clean["items"][0]["drift"] == 0  # type: ignore[index]

    await redis.hincrby(keys.item(sale, "phone"), "available", 1)  # a unit made from nothing

    doc = await progress(client, sale)
    assert doc["items"][0]["drift"] == 1  # type: ignore[index]
    assert doc["drift"] == ["phone: available 10 + held 1 + confirmed 0 = 11, stock_total 10 (drift +1)"]
    m = await scrape(client)
    assert value(m, "flashsale_item_drift_units", sale_id=sale, sku="phone") == 1
    assert value(m, "flashsale_sale_drift", sale_id=sale) == 1


async def test_the_audit_logs_a_drift_once_with_its_numbers_and_once_when_it_is_gone(
    client: httpx.AsyncClient, redis: Redis, keys: Keys, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    sale = (await create_sale(client))["id"]
    pool = await db.create_pool(settings.database_url, 1)
    auditor = Auditor(redis, pool, keys)
    await redis.hincrby(keys.item(sale, "phone"), "held", -2)
    with caplog.at_level(logging.INFO, logger="flashsale.audit"):
        for _ in range(3):
            await auditor.audit(sale)
            assert (await reserve(client, sale, f"u{_}")).status_code == 201  # the numbers move, the drift stays
        await redis.hincrby(keys.item(sale, "phone"), "held", 2)
        await auditor.audit(sale)
    await pool.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "flashsale.audit"]
    assert lines == [
        "audit: phone: available 10 + held -2 + confirmed 0 = 8, stock_total 10 (drift -2)",
        "audit: the numbers add up again",
    ]


async def test_redis_against_postgres_is_compared_once_the_queue_is_empty_and_shows_on_progress(
    client: httpx.AsyncClient, redis: Redis, keys: Keys, worker: Persister
) -> None:
    sale = (await create_sale(client))["id"]
    for user in ("a", "b"):
        assert (await reserve(client, sale, user)).status_code == 201
    await drained(redis, keys, sale)
    auditor = Auditor(redis, worker.pool, keys, postgres_every_s=0)
    assert await auditor.audit(sale) == []

    # Units moved in Redis without an event (the units still add up): Postgres disagrees.
    await redis.hincrby(keys.item(sale, "phone"), "held", 1)
    await redis.hincrby(keys.item(sale, "phone"), "available", -1)

    found = await auditor.audit(sale)
    assert found == ["postgres: phone held: redis 3, postgres 2"]
    assert (await progress(client, sale))["drift"] == found

    await redis.hincrby(keys.item(sale, "phone"), "held", -1)  # put right: the drift goes
    await redis.hincrby(keys.item(sale, "phone"), "available", 1)
    assert await auditor.audit(sale) == []
    assert (await progress(client, sale))["drift"] == []


async def test_an_audit_that_fails_never_stops_the_persister(
    client: httpx.AsyncClient, redis: Redis, keys: Keys, worker: Persister
) -> None:
    async def broken(sale_ids: object, owner: str) -> None:
        raise RuntimeError("postgres says: the database system is starting up")

    worker.auditor.run_once = broken  # type: ignore[method-assign]
    await asyncio.sleep(1.5)  # a failed pass or two
    sale = (await create_sale(client))["id"]
    assert (await reserve(client, sale, "a")).status_code == 201
    await drained(redis, keys, sale)
