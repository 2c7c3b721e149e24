"""The reservation path through the HTTP API: reserve, read, confirm, cancel, expire."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime, timedelta

import httpx
from redis.asyncio import Redis

from flashsale.keys import Keys
from flashsale.scripts import Scripts
from flashsale.settings import Settings
from flashsale.sweeper import sweep_once

from .conftest import OPS, STORE, create_sale, sale_body, serving


async def reserve(
    client: httpx.AsyncClient, sale_id: str, user: str = "u1", sku: str = "phone", qty: int = 1, key: str | None = None
) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key else {}
    return await client.post(
        f"/v1/sales/{sale_id}/reservations", json={"user_id": user, "sku": sku, "quantity": qty}, headers=headers
    )


async def item(client: httpx.AsyncClient, sale_id: str, sku: str = "phone") -> dict[str, int]:
    sale = (await client.get(f"/v1/sales/{sale_id}")).json()
    found: dict[str, int] = next(i for i in sale["items"] if i["sku"] == sku)
    return found


async def test_reserve_returns_a_hold_that_expires_after_hold_seconds(client: httpx.AsyncClient) -> None:
    sale = await create_sale(client, hold_seconds=300)
    r = await reserve(client, sale["id"], qty=2)
    assert r.status_code == 201
    body = r.json()
    assert body["status"] == "held" and body["quantity"] == 2 and body["sale_id"] == sale["id"]
    held_for = datetime.fromisoformat(body["expires_at"]) - datetime.fromisoformat(body["created_at"])
    assert held_for == timedelta(seconds=300)


async def test_a_hold_takes_units_out_of_available(client: httpx.AsyncClient) -> None:
    sale = await create_sale(client)
    await reserve(client, sale["id"], qty=2)
    phone = await item(client, sale["id"])
    assert (phone["available"], phone["held"], phone["stock_total"]) == (8, 2, 10)


async def test_reservation_ids_are_unguessable_and_distinct(client: httpx.AsyncClient) -> None:
    sale = await create_sale(
        client, items=[{"sku": "phone", "name": "P", "price_cents": 1, "stock": 50, "per_user_limit": 1}]
    )
    ids = [(await reserve(client, sale["id"], user=f"u{n}")).json()["reservation_id"] for n in range(20)]
    assert len(set(ids)) == 20
    assert all(len(i.split(".")[1]) == 22 for i in ids)  # 16 random bytes, base64url


async def test_retry_with_same_idempotency_key_returns_the_same_reservation(client: httpx.AsyncClient) -> None:
    sale = await create_sale(client)
    first = await reserve(client, sale["id"], key="k-1")
    again = await reserve(client, sale["id"], key="k-1")
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json() == first.json()
    assert (await item(client, sale["id"]))["held"] == 1


async def test_a_retry_of_a_reservation_is_answered_with_it_even_while_sold_out_is_answered_from_memory(
    client: httpx.AsyncClient,
) -> None:
    sale = await create_sale(
        client, items=[{"sku": "phone", "name": "P", "price_cents": 1, "stock": 1, "per_user_limit": 1}]
    )
    first = await reserve(client, sale["id"], user="winner", key="order-1")
    for n in range(3):  # the script says sold out, then memory does
        assert (await reserve(client, sale["id"], user=f"late{n}", key=f"k{n}")).json()["error"]["code"] == "sold_out"
    retries = await asyncio.gather(*(reserve(client, sale["id"], user="winner", key="order-1") for _ in range(5)))
    assert {(r.status_code, r.json()["reservation_id"]) for r in retries} == {(200, first.json()["reservation_id"])}
    other = await reserve(client, sale["id"], user="winner", qty=2, key="order-1")
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_conflict"


async def test_idempotency_key_reused_with_another_body_is_a_conflict(client: httpx.AsyncClient) -> None:
    sale = await create_sale(client)
    await reserve(client, sale["id"], key="k-1", qty=1)
    r = await reserve(client, sale["id"], key="k-1", qty=2)
    assert r.status_code == 422 and r.json()["error"]["code"] == "idempotency_conflict"
    assert (await item(client, sale["id"]))["held"] == 1


async def test_idempotency_keys_are_scoped_to_the_user(client: httpx.AsyncClient) -> None:
    sale = await create_sale(client)
    a = await reserve(client, sale["id"], user="alice", key="same")
    b = await reserve(client, sale["id"], user="bob", key="same")
    assert (a.status_code, b.status_code) == (201, 201)
    assert a.json()["reservation_id"] != b.json()["reservation_id"]


async def test_per_user_limit_refuses_the_unit_past_it(client: httpx.AsyncClient) -> None:
    sale = await create_sale(client)  # per_user_limit 2
    assert (await reserve(client, sale["id"], qty=1)).status_code == 201
    r = await reserve(client, sale["id"], qty=2)
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "limit_exceeded" and r.json()["error"]["available"] == 1
    assert (await reserve(client, sale["id"], qty=1)).status_code == 201


async def test_sold_out_when_not_enough_stock_is_left(client: httpx.AsyncClient) -> None:
    sale = await create_sale(
        client, items=[{"sku": "phone", "name": "P", "price_cents": 1, "stock": 3, "per_user_limit": 5}]
    )
    assert (await reserve(client, sale["id"], user="a", qty=2)).status_code == 201
    r = await reserve(client, sale["id"], user="b", qty=2)
    assert r.status_code == 409 and r.json()["error"] == {
        "code": "sold_out",
        "message": "not enough stock left for the quantity asked",
        "available": 1,
    }


async def test_confirm_makes_it_confirmed_and_again_returns_the_same(client: httpx.AsyncClient) -> None:
    sale = await create_sale(client)
    rid = (await reserve(client, sale["id"])).json()["reservation_id"]
    first = await client.post(f"/v1/reservations/{rid}/confirm", json={"user_id": "u1", "payment_ref": "pay-1"})
    again = await client.post(f"/v1/reservations/{rid}/confirm", json={"user_id": "u1", "payment_ref": "pay-1"})
    assert first.status_code == again.status_code == 200
    assert first.json()["status"] == "confirmed" and first.json()["payment_ref"] == "pay-1"
    assert again.json() == first.json()
    phone = await item(client, sale["id"])
    assert (phone["available"], phone["held"]) == (9, 0)


async def test_cancel_gives_the_units_back_at_once(client: httpx.AsyncClient) -> None:
    sale = await create_sale(client)
    rid = (await reserve(client, sale["id"], qty=2)).json()["reservation_id"]
    r = await client.post(f"/v1/reservations/{rid}/cancel", json={"user_id": "u1"})
    assert r.status_code == 200 and r.json()["status"] == "released"
    phone = await item(client, sale["id"])
    assert (phone["available"], phone["held"]) == (10, 0)
    again = await client.post(f"/v1/reservations/{rid}/cancel", json={"user_id": "u1"})
    assert again.status_code == 200 and again.json() == r.json()
    assert (await item(client, sale["id"]))["available"] == 10


async def test_cancel_frees_the_users_limit(client: httpx.AsyncClient) -> None:
    sale = await create_sale(client)
    rid = (await reserve(client, sale["id"], qty=2)).json()["reservation_id"]
    await client.post(f"/v1/reservations/{rid}/cancel", json={"user_id": "u1"})
    assert (await reserve(client, sale["id"], qty=2)).status_code == 201


async def test_cancelling_a_confirmed_reservation_is_invalid_state(client: httpx.AsyncClient) -> None:
    sale = await create_sale(client)
    rid = (await reserve(client, sale["id"])).json()["reservation_id"]
    await client.post(f"/v1/reservations/{rid}/confirm", json={"user_id": "u1", "payment_ref": "p"})
    r = await client.post(f"/v1/reservations/{rid}/cancel", json={"user_id": "u1"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "invalid_state"


async def test_confirming_a_released_reservation_is_invalid_state(client: httpx.AsyncClient) -> None:
    sale = await create_sale(client)
    rid = (await reserve(client, sale["id"])).json()["reservation_id"]
    await client.post(f"/v1/reservations/{rid}/cancel", json={"user_id": "u1"})
    r = await client.post(f"/v1/reservations/{rid}/confirm", json={"user_id": "u1", "payment_ref": "p"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "invalid_state"


async def test_a_hold_expires_and_its_units_return_within_two_seconds(client: httpx.AsyncClient) -> None:
    sale = await create_sale(client, hold_seconds=1)
    body = (await reserve(client, sale["id"], qty=2)).json()
    expires = datetime.fromisoformat(body["expires_at"])
    while (await item(client, sale["id"]))["held"]:
        assert datetime.now(UTC) < expires + timedelta(seconds=2), "hold not released within 2 s of expires_at"
        await asyncio.sleep(0.05)
    assert (await item(client, sale["id"]))["available"] == 10
    r = await client.get(f"/v1/reservations/{body['reservation_id']}", params={"user_id": "u1"})
    assert r.json()["status"] == "expired"


async def test_one_sweep_expires_every_due_hold_however_many_fell_due_together(
    settings: Settings, redis: Redis, keys: Keys
) -> None:
    lazy = dataclasses.replace(settings, sweep_interval_ms=60_000)
    async with serving(lazy) as url, httpx.AsyncClient(base_url=url, headers=STORE) as c:
        await asyncio.sleep(0.1)  # let the sweeper's first tick pass
        sale = await create_sale(
            c, hold_seconds=1, items=[{"sku": "phone", "name": "P", "price_cents": 1, "stock": 50, "per_user_limit": 1}]
        )
        await asyncio.gather(*(reserve(c, sale["id"], user=f"u{n}") for n in range(35)))
        holds = keys.holds(sale["id"], "phone")
        await redis.zadd(holds, {f"{sale['id']}.settled-but-still-indexed": 1})  # must not stall the sweep
        await asyncio.sleep(1.1)
        scripts = Scripts.load(redis, lazy.lua_dir)
        assert await sweep_once(redis, keys, scripts, batch=10) == 35
        assert await redis.zcard(holds) == 0
        phone = await item(c, sale["id"])
        assert (phone["available"], phone["held"]) == (50, 0)


async def test_confirm_after_expiry_is_refused_before_the_sweeper_runs(settings: Settings, redis: Redis) -> None:
    lazy = dataclasses.replace(settings, sweep_interval_ms=60_000)
    async with serving(lazy) as url, httpx.AsyncClient(base_url=url, headers=STORE) as c:
        await asyncio.sleep(0.1)  # let the sweeper's first tick pass
        sale = await create_sale(c, hold_seconds=1)
        rid = (await reserve(c, sale["id"])).json()["reservation_id"]
        await asyncio.sleep(1.1)
        r = await c.post(f"/v1/reservations/{rid}/confirm", json={"user_id": "u1", "payment_ref": "p"})
        assert r.status_code == 410 and r.json()["error"]["code"] == "hold_expired"
        phone = await item(c, sale["id"])
        assert (phone["available"], phone["held"]) == (10, 0)


async def test_reading_a_reservation_shows_its_status(client: httpx.AsyncClient) -> None:
    sale = await create_sale(client)
    rid = (await reserve(client, sale["id"])).json()["reservation_id"]
    r = await client.get(f"/v1/reservations/{rid}", params={"user_id": "u1"})
    assert r.status_code == 200 and r.json()["status"] == "held"


async def test_another_users_reservation_is_not_found(client: httpx.AsyncClient) -> None:
    sale = await create_sale(client)
    rid = (await reserve(client, sale["id"], user="alice")).json()["reservation_id"]
    assert (await client.get(f"/v1/reservations/{rid}", params={"user_id": "mallory"})).status_code == 404
    r = await client.post(f"/v1/reservations/{rid}/cancel", json={"user_id": "mallory"})
    assert r.status_code == 404
    assert (await item(client, sale["id"]))["held"] == 1


async def test_reserving_before_the_window_opens_says_when_it_does(client: httpx.AsyncClient) -> None:
    starts = datetime.now(UTC) + timedelta(minutes=5)
    sale = await create_sale(client, starts_at=starts.isoformat(), ends_at=(starts + timedelta(hours=1)).isoformat())
    assert sale["status"] == "scheduled"
    r = await reserve(client, sale["id"])
    assert r.status_code == 409 and r.json()["error"]["code"] == "sale_not_started"
    assert abs(datetime.fromisoformat(r.json()["error"]["starts_at"]) - starts) < timedelta(milliseconds=2)
    assert (await item(client, sale["id"]))["available"] == 10


async def test_a_sale_moves_from_scheduled_to_live_to_ended_by_its_window(client: httpx.AsyncClient) -> None:
    now = datetime.now(UTC)
    sale = await create_sale(
        client, starts_at=(now + timedelta(seconds=0.5)).isoformat(), ends_at=(now + timedelta(seconds=1.2)).isoformat()
    )
    assert sale["status"] == "scheduled"
    await asyncio.sleep(0.6)
    assert (await client.get(f"/v1/sales/{sale['id']}")).json()["status"] == "live"
    assert (await reserve(client, sale["id"])).status_code == 201
    await asyncio.sleep(0.7)
    assert (await client.get(f"/v1/sales/{sale['id']}")).json()["status"] == "ended"
    r = await reserve(client, sale["id"], user="late")
    assert r.status_code == 409 and r.json()["error"]["code"] == "sale_ended"


async def test_all_held_shows_next_release_not_sold_out(client: httpx.AsyncClient) -> None:
    sale = await create_sale(
        client, items=[{"sku": "phone", "name": "P", "price_cents": 1, "stock": 2, "per_user_limit": 2}]
    )
    held = (await reserve(client, sale["id"], qty=2)).json()
    view = (await client.get(f"/v1/sales/{sale['id']}")).json()
    assert view["status"] == "live"
    assert view["items"][0]["available"] == 0 and view["items"][0]["next_release_at"] == held["expires_at"]


async def test_sale_is_sold_out_only_when_nothing_is_available_or_held(client: httpx.AsyncClient) -> None:
    sale = await create_sale(
        client, items=[{"sku": "phone", "name": "P", "price_cents": 1, "stock": 1, "per_user_limit": 1}]
    )
    rid = (await reserve(client, sale["id"])).json()["reservation_id"]
    await client.post(f"/v1/reservations/{rid}/confirm", json={"user_id": "u1", "payment_ref": "p"})
    view = (await client.get(f"/v1/sales/{sale['id']}")).json()
    assert view["status"] == "sold_out" and "next_release_at" not in view["items"][0]


async def test_user_over_the_rate_gets_429_with_retry_after(settings: Settings, redis: Redis) -> None:
    async with (
        serving(dataclasses.replace(settings, user_rate_per_s=3)) as url,
        httpx.AsyncClient(base_url=url, headers=STORE) as c,
    ):
        sale = await create_sale(
            c, items=[{"sku": "phone", "name": "P", "price_cents": 1, "stock": 10, "per_user_limit": 10}]
        )
        codes = [(await reserve(c, sale["id"], user="greedy")).status_code for _ in range(5)]
        assert codes == [201, 201, 201, 429, 429]
        r = await reserve(c, sale["id"], user="greedy")
        assert r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "rate_limited"
        assert (await reserve(c, sale["id"], user="polite")).status_code == 201
        assert (await item(c, sale["id"]))["held"] == 4


async def test_unknown_sale_or_item_is_not_found(client: httpx.AsyncClient) -> None:
    sale = await create_sale(client)
    assert (await client.get("/v1/sales/nope")).status_code == 404
    assert (await reserve(client, "nope")).json()["error"]["code"] == "not_found"
    assert (await reserve(client, sale["id"], sku="nope")).status_code == 404


async def test_creating_a_sale_twice_is_already_exists(client: httpx.AsyncClient) -> None:
    sale = await create_sale(client)
    again = sale_body(sale["id"], items=[{"sku": "phone", "name": "P", "price_cents": 1, "stock": 99}])
    r = await client.post("/v1/sales", json=again, headers=OPS)
    assert r.status_code == 409 and r.json()["error"]["code"] == "already_exists"
    assert (await item(client, sale["id"]))["stock_total"] == 10


async def test_stock_is_in_redis_before_the_201(client: httpx.AsyncClient, redis: Redis, keys: Keys) -> None:
    sale = await create_sale(client)
    assert await redis.hget(keys.item(sale["id"], "phone"), "available") == "10"
