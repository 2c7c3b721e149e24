"""``flashsale recover``: what Redis lost, put back from Postgres (contract, "Scale")."""

from __future__ import annotations

import asyncio

import asyncpg
import httpx
from redis.asyncio import Redis

from flashsale.keys import Keys
from flashsale.persister import Persister
from flashsale.reconcile import reconcile
from flashsale.recover import Recovery, recover
from flashsale.scripts import Scripts
from flashsale.settings import Settings

from .conftest import OPS, create_sale, drained
from .test_reservations import item, reserve


async def forget_sale(redis: Redis, keys: Keys, sale_id: str) -> None:
    """Every key of the sale gone, as after a restart without AOF."""
    async for key in redis.scan_iter(match=keys.sale_pattern(sale_id), count=1000):
        await redis.unlink(key)


async def run_recover(redis: Redis, pg: asyncpg.Connection, settings: Settings, sale_id: str) -> Recovery:
    keys = Keys(settings.key_prefix)
    scripts = Scripts.load(redis, settings.lua_dir)
    try:
        return await recover(redis, pg, keys, scripts, sale_id)
    finally:
        await scripts.calls.close()


async def test_a_sale_whose_keys_are_gone_comes_back_with_its_holds_counts_limits_and_keys(
    client: httpx.AsyncClient, redis: Redis, keys: Keys, pg: asyncpg.Connection, settings: Settings, worker: Persister
) -> None:
    sale = (await create_sale(client))["id"]  # 10 phones, 2 per user
    a = await reserve(client, sale, "a", qty=2, key="a-1")
    b = await reserve(client, sale, "b")
    c = await reserve(client, sale, "c")
    d = await reserve(client, sale, "d")
    assert [r.status_code for r in (a, b, c, d)] == [201] * 4
    confirm = await client.post(
        f"/v1/reservations/{c.json()['reservation_id']}/confirm", json={"user_id": "c", "payment_ref": "pay-c"}
    )
    cancel = await client.post(f"/v1/reservations/{d.json()['reservation_id']}/cancel", json={"user_id": "d"})
    assert (confirm.status_code, cancel.status_code) == (200, 200)
    await drained(redis, keys, sale)

    await forget_sale(redis, keys, sale)
    assert (await client.get(f"/v1/sales/{sale}")).status_code == 404
    report = await run_recover(redis, pg, settings, sale)

    assert report.sale_reloaded and report.outcomes == {"added": 4} and not report.oversold
    counts = await item(client, sale)
    assert (counts["available"], counts["held"]) == (6, 3)
    assert (await reserve(client, sale, "a")).json()["error"]["code"] == "limit_exceeded"  # a holds 2 of 2
    again = await reserve(client, sale, "a", qty=2, key="a-1")  # a retry of a's reservation
    assert again.status_code == 200 and again.json()["reservation_id"] == a.json()["reservation_id"]
    held = await client.post(
        f"/v1/reservations/{b.json()['reservation_id']}/confirm", json={"user_id": "b", "payment_ref": "pay-b"}
    )
    assert held.status_code == 200 and held.json()["status"] == "confirmed"
    await drained(redis, keys, sale)
    assert not (await reconcile(redis, pg, keys, sale)).differences


async def test_recover_twice_changes_nothing_the_second_time(
    client: httpx.AsyncClient, redis: Redis, keys: Keys, pg: asyncpg.Connection, settings: Settings, worker: Persister
) -> None:
    sale = (await create_sale(client))["id"]
    for user in ("a", "b", "c"):
        assert (await reserve(client, sale, user)).status_code == 201
    await drained(redis, keys, sale)
    await forget_sale(redis, keys, sale)
    await run_recover(redis, pg, settings, sale)
    before = await item(client, sale)
    second = await run_recover(redis, pg, settings, sale)
    assert not second.sale_reloaded and second.outcomes == {"kept": 3}
    assert await item(client, sale) == before


async def test_a_final_status_redis_lost_is_taken_from_postgres_and_its_units_come_back(
    client: httpx.AsyncClient, redis: Redis, keys: Keys, pg: asyncpg.Connection, settings: Settings, worker: Persister
) -> None:
    sale = (await create_sale(client, items=[phone(stock=1)]))["id"]
    r = await reserve(client, sale, "a")
    rid = r.json()["reservation_id"]
    assert (await client.post(f"/v1/reservations/{rid}/cancel", json={"user_id": "a"})).status_code == 200
    await drained(redis, keys, sale)
    # Redis lost the cancel (a failover to a replica that had the hold, not the cancel).
    await redis.hset(keys.reservation(sale, rid), "status", "held")
    await redis.hset(keys.reservation(sale, rid), "final_ms", "")
    await redis.zadd(keys.holds(sale, "phone"), {rid: 2**50})
    await redis.hincrby(keys.item(sale, "phone"), "available", -1)
    await redis.hincrby(keys.item(sale, "phone"), "held", 1)
    await redis.hincrby(keys.item(sale, "phone"), "cancelled", -1)
    await redis.hincrby(keys.users(sale, "phone"), "a", 1)
    assert (await reserve(client, sale, "b")).json()["error"]["code"] == "sold_out"

    report = await run_recover(redis, pg, settings, sale)

    assert report.outcomes == {"settled": 1}
    assert (await reserve(client, sale, "b")).status_code == 201  # the unit is back, also from memory
    assert await redis.zscore(keys.holds(sale, "phone"), rid) is None


async def test_a_unit_sold_again_after_redis_lost_its_hold_is_reported_as_promised_twice(
    client: httpx.AsyncClient, redis: Redis, keys: Keys, pg: asyncpg.Connection, settings: Settings, worker: Persister
) -> None:
    sale = (await create_sale(client, items=[phone(stock=1)]))["id"]
    rid = (await reserve(client, sale, "a")).json()["reservation_id"]
    await drained(redis, keys, sale)
    # Redis lost a's hold after Postgres had it; the unit looked free and was sold to b.
    await redis.unlink(keys.reservation(sale, rid))
    await redis.zrem(keys.holds(sale, "phone"), rid)
    await redis.hincrby(keys.item(sale, "phone"), "available", 1)
    await redis.hincrby(keys.item(sale, "phone"), "held", -1)
    await redis.hincrby(keys.item(sale, "phone"), "reservations", -1)
    await redis.hdel(keys.users(sale, "phone"), "a")
    assert (await reserve(client, sale, "b")).status_code == 201

    report = await run_recover(redis, pg, settings, sale)

    assert report.oversold == {"phone": 1} and "OVERSOLD: phone: 1 units promised twice" in report.table()
    assert (await reserve(client, sale, "c")).json()["error"]["code"] == "sold_out"
    counts = await item(client, sale)
    assert (counts["available"], counts["held"]) == (-1, 2)


async def test_recover_of_a_sale_postgres_never_had_says_so_and_changes_nothing(
    redis: Redis, pg: asyncpg.Connection, settings: Settings
) -> None:
    report = await run_recover(redis, pg, settings, "no-such-sale")
    assert report.problems and "no sale 'no-such-sale' in Postgres" in report.problems[0]
    assert not await redis.exists(Keys(settings.key_prefix).sale("no-such-sale"))


def phone(stock: int) -> dict[str, object]:
    return {"sku": "phone", "name": "Phone", "price_cents": 100, "stock": stock, "per_user_limit": 2}


async def test_a_paused_sale_comes_back_paused(
    client: httpx.AsyncClient, redis: Redis, keys: Keys, pg: asyncpg.Connection, settings: Settings, worker: Persister
) -> None:
    sale = (await create_sale(client))["id"]
    assert (await client.post(f"/v1/sales/{sale}/pause", headers=OPS)).status_code == 200
    await drained(redis, keys, sale)
    await forget_sale(redis, keys, sale)
    await run_recover(redis, pg, settings, sale)
    assert (await reserve(client, sale, "a")).json()["error"]["code"] == "sale_paused"


async def test_a_sale_loaded_again_sells_nothing_postgres_counts_as_taken_while_its_holds_come_back(
    client: httpx.AsyncClient, redis: Redis, keys: Keys, pg: asyncpg.Connection, settings: Settings, worker: Persister
) -> None:
    sale = (await create_sale(client, items=[phone(stock=2)]))["id"]
    for user in ("a", "b"):
        assert (await reserve(client, sale, user)).status_code == 201
    await drained(redis, keys, sale)
    await forget_sale(redis, keys, sale)
    done = asyncio.Event()
    won: list[int] = []

    async def crowd(n: int) -> None:
        i = 0
        while not done.is_set():
            i += 1
            won.append((await reserve(client, sale, f"c{n}-{i}")).status_code)

    crowding = [asyncio.create_task(crowd(n)) for n in range(6)]
    await asyncio.sleep(0.05)
    report = await run_recover(redis, pg, settings, sale)
    for _ in range(5):  # the sale is live again: the crowd is told sold out
        await asyncio.sleep(0.05)
    done.set()
    await asyncio.gather(*crowding)

    assert not report.oversold and 201 not in won
    counts = await item(client, sale)
    assert (counts["available"], counts["held"]) == (0, 2)
    assert (await client.get(f"/v1/sales/{sale}")).json()["status"] == "live"


async def test_a_partial_loss_is_refused_with_what_to_do_and_changes_nothing(
    client: httpx.AsyncClient, redis: Redis, keys: Keys, pg: asyncpg.Connection, settings: Settings, worker: Persister
) -> None:
    sale = (await create_sale(client, items=[phone(stock=2)]))["id"]
    assert (await reserve(client, sale, "a", qty=2)).status_code == 201
    await drained(redis, keys, sale)
    await redis.unlink(keys.sale(sale))  # only the sale hash lost
    before = await redis.hgetall(keys.item(sale, "phone"))

    report = await run_recover(redis, pg, settings, sale)

    assert "partial loss" in report.problems[0] and not report.sale_reloaded
    assert await redis.hgetall(keys.item(sale, "phone")) == before
    assert not await redis.exists(keys.sale(sale))
