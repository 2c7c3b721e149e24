"""Hold extension (contract, "Storefront integration"): bounded per hold by the sale, atomic with
the sweeper's due-time index, and kept in Postgres."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

import asyncpg
import httpx
from redis.asyncio import Redis

from flashsale.keys import Keys
from flashsale.persister import Persister
from flashsale.recover import recover
from flashsale.scripts import Scripts
from flashsale.sweeper import sweep_once

from .conftest import create_sale, drained
from .test_recover import forget_sale


async def hold(c: httpx.AsyncClient, sale: str, user: str) -> dict[str, Any]:
    r = await c.post(f"/v1/sales/{sale}/reservations", json={"user_id": user, "sku": "phone"})
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


async def extend(c: httpx.AsyncClient, rid: str, user: str, seconds: int) -> httpx.Response:
    return await c.post(f"/v1/reservations/{rid}/extend", json={"user_id": user, "seconds": seconds})


def seconds_between(a: str, b: str) -> float:
    return (datetime.fromisoformat(b) - datetime.fromisoformat(a)).total_seconds()


async def test_an_extension_moves_expires_at_later_and_postgres_gets_it(
    client: httpx.AsyncClient, redis: Redis, keys: Keys, pg: asyncpg.Connection, worker: Persister
) -> None:
    sale = (await create_sale(client))["id"]
    held = await hold(client, sale, "alice")
    r = await extend(client, held["reservation_id"], "alice", 120)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "held"
    assert seconds_between(held["expires_at"], r.json()["expires_at"]) == 120
    due = await redis.zscore(keys.holds(sale, "phone"), held["reservation_id"])
    assert due == datetime.fromisoformat(r.json()["expires_at"]).timestamp() * 1000  # the sweeper's index moved too
    await drained(redis, keys, sale)
    row = await pg.fetchval("SELECT expires_at FROM reservations WHERE id = $1", held["reservation_id"])
    assert row == datetime.fromisoformat(r.json()["expires_at"])


async def test_extensions_past_max_extensions_or_max_extension_seconds_are_409_and_change_nothing(
    client: httpx.AsyncClient,
) -> None:
    sale = (await create_sale(client, max_extensions=2, max_extension_seconds=100))["id"]
    rid = (await hold(client, sale, "bob"))["reservation_id"]
    assert (await extend(client, rid, "bob", 60)).status_code == 200
    too_long = await extend(client, rid, "bob", 41)  # 60 + 41 > 100
    assert (too_long.status_code, too_long.json()["error"]["code"]) == (409, "extension_limit")
    assert (await extend(client, rid, "bob", 40)).status_code == 200  # exactly 100 in all
    third = await extend(client, rid, "bob", 1)  # a third extension
    assert (third.status_code, third.json()["error"]["code"]) == (409, "extension_limit")
    sale_view = (await client.get(f"/v1/sales/{sale}")).json()
    assert (sale_view["max_extensions"], sale_view["max_extension_seconds"]) == (2, 100)


async def test_a_hold_that_ran_out_is_410_and_a_settled_one_409(client: httpx.AsyncClient) -> None:
    sale = (await create_sale(client, hold_seconds=1))["id"]
    late = (await hold(client, sale, "carol"))["reservation_id"]
    paid = (await hold(client, sale, "dave"))["reservation_id"]
    paying = {"user_id": "dave", "payment_ref": "psp-1"}
    assert (await client.post(f"/v1/reservations/{paid}/confirm", json=paying)).status_code == 200
    await asyncio.sleep(1.05)
    expired = await extend(client, late, "carol", 60)  # due, whether or not the sweeper got to it
    assert (expired.status_code, expired.json()["error"]["code"]) == (410, "hold_expired")
    confirmed = await extend(client, paid, "dave", 60)
    assert (confirmed.status_code, confirmed.json()["error"]["code"]) == (409, "invalid_state")
    other = await extend(client, paid, "mallory", 60)
    assert other.status_code == 404


async def test_bad_extensions_are_a_clear_422_that_changes_nothing(client: httpx.AsyncClient) -> None:
    sale = (await create_sale(client))["id"]
    held = await hold(client, sale, "erin")
    for bad in ({"user_id": "erin"}, {"user_id": "erin", "seconds": 0}, {"user_id": "erin", "seconds": 86_401}):
        r = await client.post(f"/v1/reservations/{held['reservation_id']}/extend", json=bad)
        assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_request"), bad
    got = await client.get(f"/v1/reservations/{held['reservation_id']}", params={"user_id": "erin"})
    assert got.json()["expires_at"] == held["expires_at"]


async def test_a_sweep_racing_an_extension_never_releases_the_extended_hold(
    client: httpx.AsyncClient, redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    holds = 40
    sale = (await create_sale(client, hold_seconds=1, items=[phone(holds)]))["id"]
    made = [await hold(client, sale, f"u{n}") for n in range(holds)]
    stop = asyncio.Event()

    async def sweeping() -> None:
        while not stop.is_set():
            await sweep_once(redis, keys, scripts, 100)

    sweeper = asyncio.create_task(sweeping())
    try:

        async def extend_at_due(n: int, h: dict[str, Any]) -> tuple[dict[str, Any], int]:
            # sent 50 to 10 ms before its expiry: some arrive in time, some after it
            due = datetime.fromisoformat(h["expires_at"]).timestamp() + (n % 9 - 10) * 0.005
            await asyncio.sleep(max(0.0, due - datetime.now().timestamp()))
            r = await extend(client, h["reservation_id"], h["user_id"], 30)
            return h, r.status_code

        answers = await asyncio.gather(*(extend_at_due(n, h) for n, h in enumerate(made)))
        await asyncio.sleep(0.3)  # sweeps go on past every first expiry
    finally:
        stop.set()
        await sweeper
    codes = {code for _, code in answers}
    assert codes <= {200, 410}, codes
    for h, code in answers:
        got = (await client.get(f"/v1/reservations/{h['reservation_id']}", params={"user_id": h["user_id"]})).json()
        assert got["status"] == ("held" if code == 200 else "expired"), (code, got)
    extended = sum(code == 200 for _, code in answers)
    view = (await client.get(f"/v1/sales/{sale}")).json()["items"][0]
    assert (view["held"], view["available"]) == (extended, holds - extended)


def phone(stock: int) -> dict[str, Any]:
    return {"sku": "phone", "name": "Phone", "price_cents": 1, "stock": stock, "per_user_limit": 1}


async def test_recover_keeps_a_holds_extensions_and_takes_back_one_redis_lost(
    client: httpx.AsyncClient, redis: Redis, keys: Keys, scripts: Scripts, pg: asyncpg.Connection, worker: Persister
) -> None:
    sale = (await create_sale(client, hold_seconds=60, max_extensions=1, max_extension_seconds=100))["id"]
    lost = (await hold(client, sale, "u"))["reservation_id"]
    told = (await extend(client, lost, "u", 100)).json()["expires_at"]
    await drained(redis, keys, sale)
    await forget_sale(redis, keys, sale)
    assert not (await recover(redis, pg, keys, scripts, sale)).problems
    again = await extend(client, lost, "u", 1)  # the one extension was used before the loss
    assert (again.status_code, again.json()["error"]["code"]) == (409, "extension_limit")
    kept = (await hold(client, sale, "v"))["reservation_id"]
    before = int(await redis.hget(keys.reservation(sale, kept), "expires_ms") or 0)
    longer = (await extend(client, kept, "v", 50)).json()["expires_at"]
    await drained(redis, keys, sale)
    # A failover left Redis with the hold as it was before the extension; Postgres has it after.
    await redis.hset(keys.reservation(sale, kept), mapping={"expires_ms": before, "extensions": 0, "extended_s": 0})
    await redis.zadd(keys.holds(sale, "phone"), {kept: before})
    assert (await recover(redis, pg, keys, scripts, sale)).outcomes["extended"] == 1
    for rid, user, expires in ((lost, "u", told), (kept, "v", longer)):
        got = (await client.get(f"/v1/reservations/{rid}", params={"user_id": user})).json()
        assert got["expires_at"] == expires
