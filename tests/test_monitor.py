"""Watching a sale: GET .../progress, its event stream, and who may see them."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis

from flashsale import db
from flashsale.keys import WORKER_TTL_MS, Keys
from flashsale.monitor import Monitor
from flashsale.persister import Persister
from flashsale.scripts import Scripts
from flashsale.settings import Settings

from .conftest import OPS, STORE, create_sale, drained
from .test_reservations import reserve

OPS_ENDPOINTS = ["/v1/sales/{sale}/progress", "/v1/sales/{sale}/progress/stream", "/metrics"]


async def progress(client: httpx.AsyncClient, sale_id: str) -> dict[str, Any]:
    r = await client.get(f"/v1/sales/{sale_id}/progress", headers=OPS)
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


async def events(client: httpx.AsyncClient, sale_id: str) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """(event, data) of the sale's progress stream, parsed as a browser would."""
    async with client.stream("GET", f"/v1/sales/{sale_id}/progress/stream", headers=OPS) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        kind, data = "message", list[str]()
        async for line in r.aiter_lines():
            if line == "":
                if data:
                    yield kind, json.loads("\n".join(data))
                kind, data = "message", list[str]()
            elif line.startswith("event:"):
                kind = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())


def one_item(stock: int = 10, limit: int = 3) -> list[dict[str, Any]]:
    return [{"sku": "phone", "name": "Phone", "price_cents": 100, "stock": stock, "per_user_limit": limit}]


async def test_progress_counts_holds_confirms_cancels_and_rejections_exactly(
    client: httpx.AsyncClient,
) -> None:
    sale = (await create_sale(client, items=one_item(stock=10, limit=3)))["id"]
    rids = [(await reserve(client, sale, user=f"u{n}", qty=2)).json()["reservation_id"] for n in range(4)]
    for n in (0, 1):
        r = await client.post(f"/v1/reservations/{rids[n]}/confirm", json={"user_id": f"u{n}", "payment_ref": "p"})
        assert r.status_code == 200
    assert (await client.post(f"/v1/reservations/{rids[2]}/cancel", json={"user_id": "u2"})).status_code == 200
    assert (await reserve(client, sale, user="u4", qty=3)).status_code == 201  # takes 3 of the 4 left
    assert (await reserve(client, sale, user="u5", qty=2)).json()["error"]["code"] == "sold_out"
    assert (await reserve(client, sale, user="u4", qty=1)).json()["error"]["code"] == "limit_exceeded"

    [item] = (await progress(client, sale))["items"]

    assert {
        k: item[k]
        for k in (
            "stock_total",
            "available",
            "held",
            "confirmed",
            "released",
            "cancelled",
            "expired",
            "reservations",
            "attempts",
        )
    } == {
        "stock_total": 10,
        "available": 1,
        "held": 5,
        "confirmed": 4,
        "released": 2,
        "cancelled": 2,
        "expired": 0,
        "reservations": 5,
        "attempts": 7,
    }
    assert item["rejected"] == {"sold_out": 1, "limit_exceeded": 1}


async def test_progress_counts_an_expired_hold_as_released(client: httpx.AsyncClient) -> None:
    sale = (await create_sale(client, hold_seconds=1, items=one_item()))["id"]
    await reserve(client, sale, qty=2)
    deadline = time.monotonic() + 5
    while (item := (await progress(client, sale))["items"][0])["expired"] == 0:
        assert time.monotonic() < deadline, "the hold was not swept"
        await asyncio.sleep(0.1)
    assert (item["held"], item["expired"], item["released"], item["available"]) == (0, 2, 2, 10)


async def test_progress_says_the_sale_status(client: httpx.AsyncClient) -> None:
    sale = (await create_sale(client, items=one_item(stock=1, limit=1)))["id"]
    assert (await progress(client, sale))["status"] == "live"
    await reserve(client, sale)
    rid = (await reserve(client, sale, user="u2")).json()
    assert rid["error"]["code"] == "sold_out"
    assert (await progress(client, sale))["status"] == "live"  # a hold may still be released


async def test_progress_of_an_unknown_sale_is_404(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/sales/nope/progress", headers=OPS)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


async def test_progress_reports_the_backlog_while_no_persister_runs(client: httpx.AsyncClient) -> None:
    sale = (await create_sale(client, items=one_item(stock=10, limit=1)))["id"]
    for n in range(3):
        await reserve(client, sale, user=f"u{n}")
    doc = await progress(client, sale)
    # the sale's own event plus one per hold, none in Postgres yet
    assert (doc["queue_backlog"], doc["persisted"], doc["workers_alive"]) == (4, 0, 0)
    assert doc["oldest_unpersisted_age_s"] >= 0


async def test_progress_counts_persisted_rows_once_the_persister_drained_the_queue(
    client: httpx.AsyncClient, worker: Persister, redis: Redis, keys: Keys
) -> None:
    sale = (await create_sale(client, items=one_item(stock=10, limit=1)))["id"]
    for n in range(3):
        await reserve(client, sale, user=f"u{n}")
    await drained(redis, keys, sale)
    doc = await progress(client, sale)
    assert (doc["queue_backlog"], doc["oldest_unpersisted_age_s"], doc["persisted"], doc["dead_lettered"]) == (
        0,
        0.0,
        3,
        0,
    )


async def test_progress_counts_live_persisters(client: httpx.AsyncClient, worker: Persister) -> None:
    sale = (await create_sale(client))["id"]
    deadline = time.monotonic() + 5
    while (await progress(client, sale))["workers_alive"] != 1:
        assert time.monotonic() < deadline, "the persister's heartbeat was not counted"
        await asyncio.sleep(0.2)


async def test_a_persister_silent_past_its_heartbeat_is_not_counted(
    client: httpx.AsyncClient, redis: Redis, keys: Keys
) -> None:
    sale = (await create_sale(client))["id"]
    now = int(time.time() * 1000)
    await redis.zadd(keys.workers, {"gone": now - WORKER_TTL_MS - 1, "here": now})
    assert (await progress(client, sale))["workers_alive"] == 1
    assert await redis.zrange(keys.workers, 0, -1) == ["here"]  # the dead one is dropped, not kept forever


async def test_a_persister_that_stops_cleanly_leaves_the_count_at_once(
    client: httpx.AsyncClient, settings: Settings, redis: Redis, keys: Keys
) -> None:
    sale = (await create_sale(client))["id"]
    pool = await db.create_pool(settings.database_url, 2)
    stop = asyncio.Event()
    task = asyncio.create_task(Persister(redis, pool, keys, settings).run(stop))
    try:
        deadline = time.monotonic() + 5
        while (await progress(client, sale))["workers_alive"] != 1:
            assert time.monotonic() < deadline, "the persister's heartbeat was not counted"
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        await task
        await pool.close()
    assert (await progress(client, sale))["workers_alive"] == 0


async def test_progress_rates_are_reservations_attempts_and_rejections_per_second(
    client: httpx.AsyncClient,
) -> None:
    sale = (await create_sale(client, items=one_item(stock=5, limit=1)))["id"]
    first = await progress(client, sale)
    assert first["rates"]["1s"] == {"window_s": 0.0, "reservations": 0.0, "attempts": 0.0, "rejected": {}}
    for n in range(7):  # 5 holds, then 2 sold out
        await reserve(client, sale, user=f"u{n}")
    await asyncio.sleep(1.2)
    rates = (await progress(client, sale))["rates"]
    for window in ("1s", "10s", "60s"):  # only one earlier snapshot so far: every window measures from it
        r = rates[window]
        assert 1.0 <= r["window_s"] < 3.0
        assert round(r["reservations"] * r["window_s"]) == 5
        assert round(r["attempts"] * r["window_s"]) == 7
        assert round(r["rejected"]["sold_out"] * r["window_s"]) == 2


async def test_stream_sends_progress_events_whose_numbers_follow_the_sale(client: httpx.AsyncClient) -> None:
    sale = (await create_sale(client, items=one_item(stock=10, limit=1)))["id"]
    held: list[int] = []
    async with asyncio.timeout(15):
        async for kind, doc in events(client, sale):
            assert kind == "progress" and doc["sale_id"] == sale
            held.append(doc["items"][0]["held"])
            if len(held) < 4:
                await reserve(client, sale, user=f"u{len(held)}")
            else:
                break
    assert held == [0, 1, 2, 3]


async def test_stream_sends_an_event_at_least_once_a_second(client: httpx.AsyncClient) -> None:
    sale = (await create_sale(client))["id"]
    times: list[float] = []
    async with asyncio.timeout(10):
        async for _ in events(client, sale):
            times.append(time.monotonic())
            if len(times) == 4:
                break
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert max(gaps) < 1.3, gaps


async def test_stream_of_an_unknown_sale_is_404(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/sales/nope/progress/stream", headers=OPS)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize("path", OPS_ENDPOINTS)
async def test_ops_endpoints_refuse_a_storefront_key_with_403(client: httpx.AsyncClient, path: str) -> None:
    sale = (await create_sale(client))["id"]
    r = await client.get(path.format(sale=sale), headers=STORE)
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"


@pytest.mark.parametrize("path", OPS_ENDPOINTS)
async def test_ops_endpoints_refuse_a_request_without_a_key_with_401(client: httpx.AsyncClient, path: str) -> None:
    sale = (await create_sale(client))["id"]
    r = await client.get(path.format(sale=sale), headers={"Authorization": ""})
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"


@pytest.fixture
async def monitor(settings: Settings, redis: Redis, keys: Keys, scripts: Scripts) -> AsyncIterator[Monitor]:
    pool = await db.create_pool(settings.database_url, 2)
    m = Monitor(redis, pool, keys, scripts)
    yield m
    await m.close()
    await pool.close()


async def next_events(monitor: Monitor, sale_id: str, n: int) -> list[bytes]:
    stream = monitor.events(sale_id)
    try:
        return [await anext(stream) for _ in range(n)]
    finally:
        await stream.aclose()


async def test_streams_of_one_sale_share_one_computation_a_tick(client: httpx.AsyncClient, monitor: Monitor) -> None:
    sale = (await create_sale(client))["id"]
    async with asyncio.timeout(10):
        got = await asyncio.gather(*(next_events(monitor, sale, 3) for _ in range(50)))
    assert all(g == got[0] for g in got)  # the very same bytes, encoded once
    assert monitor.computed <= 4  # three ticks, maybe a fourth begun; not 150


async def test_the_ticker_stops_when_the_last_stream_leaves(client: httpx.AsyncClient, monitor: Monitor) -> None:
    sale = (await create_sale(client))["id"]
    async with asyncio.timeout(10):
        await asyncio.gather(next_events(monitor, sale, 1), next_events(monitor, sale, 2))
    assert monitor.watching() == {}
    computed = monitor.computed
    await asyncio.sleep(1.5)
    assert monitor.computed == computed


async def test_a_stream_that_joins_late_gets_the_newest_document_at_once(
    client: httpx.AsyncClient, monitor: Monitor
) -> None:
    sale = (await create_sale(client))["id"]
    async with monitor.watch(sale) as watch:
        first, version = await watch.next(0)
        async with asyncio.timeout(0.2):
            again, _ = await watch.next(0)
        assert again == first and version == 1


async def test_progress_reports_null_persisted_when_postgres_does_not_answer(
    client: httpx.AsyncClient, redis: Redis, keys: Keys, settings: Settings, scripts: Scripts
) -> None:
    sale = (await create_sale(client))["id"]
    pool = await db.create_pool(settings.database_url, 1)
    await pool.close()  # a pool that cannot give a connection, like a Postgres that is down
    doc = await Monitor(redis, pool, keys, scripts).progress(sale)
    assert doc.persisted is None and doc.items[0].stock_total == 10


async def test_persisted_is_a_count_of_the_sale_rows(
    client: httpx.AsyncClient, pg: asyncpg.Connection, monitor: Monitor
) -> None:
    sale = (await create_sale(client))["id"]
    await pg.execute(
        "INSERT INTO reservations (id, sale_id, sku, user_id, quantity, status, created_at, expires_at) "
        "VALUES ('a', $1, 'phone', 'u', 1, 'held', now(), now()), "
        "('b', 'other-sale', 'phone', 'u', 1, 'held', now(), now())",
        sale,
    )
    assert (await monitor.progress(sale)).persisted == 1
