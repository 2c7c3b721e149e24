"""Carts (contract, "Storefront integration"): every line held or none, in one atomic script;
idempotent by key; confirm and cancel of a whole cart in one step."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import asyncpg
import httpx
from redis.asyncio import Redis

from flashsale.keys import Keys
from flashsale.persister import Persister

from .conftest import create_sale, drained


def item(sku: str, stock: int, limit: int = 5, **more: Any) -> dict[str, Any]:
    return {"sku": sku, "name": sku, "price_cents": 100, "stock": stock, "per_user_limit": limit, **more}


async def cart(c: httpx.AsyncClient, sale: str, user: str, *lines: tuple[str, int], key: str = "") -> httpx.Response:
    body = {"user_id": user, "lines": [{"sku": s, "quantity": q} for s, q in lines]}
    return await c.post(f"/v1/sales/{sale}/carts", json=body, headers={"Idempotency-Key": key} if key else {})


async def numbers(c: httpx.AsyncClient, sale: str) -> dict[str, tuple[int, int]]:
    items = (await c.get(f"/v1/sales/{sale}")).json()["items"]
    return {i["sku"]: (i["available"], i["held"]) for i in items}


async def test_300_carts_at_once_for_a_and_b_with_50_of_b_hold_exactly_50_carts_and_no_partial_one(
    client: httpx.AsyncClient, redis: Redis, keys: Keys
) -> None:
    sale = (await create_sale(client, items=[item("a", 10_000), item("b", 50)]))["id"]
    gate = asyncio.Semaphore(100)

    async def buy(n: int) -> tuple[int, dict[str, Any]]:
        async with gate:
            r = await cart(client, sale, f"u{n}", ("a", 1 + n % 3), ("b", 1))
            return n, r.json()

    answers = await asyncio.gather(*(buy(n) for n in range(300)))
    held = [(n, body) for n, body in answers if "cart_id" in body]
    assert len(held) == 50
    assert {body["error"]["code"] for _, body in answers if "error" in body} == {"sold_out"}
    assert {tuple(body["error"]["fields"]) for _, body in answers if "error" in body} == {("lines[1]",)}
    assert all(len(body["reservations"]) == 2 for _, body in held)
    units_of_a = sum(1 + n % 3 for n, _ in held)
    assert await numbers(client, sale) == {"a": (10_000 - units_of_a, units_of_a), "b": (0, 50)}
    # No hold outside a cart that was answered: every user with a hold got a cart.
    winners = {f"u{n}" for n, _ in held}
    holders: Counter[str] = Counter()
    for sku in ("a", "b"):
        holders.update(str(u) for u in await redis.hkeys(keys.users(sale, sku)))
    assert set(holders) == winners and set(holders.values()) == {2}


async def test_a_retried_cart_key_returns_the_same_cart_and_another_body_with_it_is_refused(
    client: httpx.AsyncClient,
) -> None:
    sale = (await create_sale(client, items=[item("a", 10), item("b", 10)]))["id"]
    first = await cart(client, sale, "u", ("a", 1), ("b", 2), key="k1")
    again = await cart(client, sale, "u", ("a", 1), ("b", 2), key="k1")
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json() == first.json()
    other = await cart(client, sale, "u", ("a", 2), key="k1")
    assert (other.status_code, other.json()["error"]["code"]) == (422, "idempotency_conflict")
    assert await numbers(client, sale) == {"a": (9, 1), "b": (8, 2)}


async def test_a_line_past_the_per_user_limit_refuses_the_whole_cart_and_names_the_line(
    client: httpx.AsyncClient,
) -> None:
    sale = (await create_sale(client, items=[item("a", 10), item("b", 10, limit=1)]))["id"]
    r = await cart(client, sale, "u", ("a", 2), ("b", 2))
    assert (r.status_code, r.json()["error"]["code"], r.json()["error"]["fields"]) == (
        409,
        "limit_exceeded",
        ["lines[1]"],
    )
    assert await numbers(client, sale) == {"a": (10, 0), "b": (10, 0)}


async def test_confirming_a_cart_confirms_every_line_and_postgres_gets_them(
    client: httpx.AsyncClient, redis: Redis, keys: Keys, pg: asyncpg.Connection, worker: Persister
) -> None:
    sale = (await create_sale(client, items=[item("a", 10), item("b", 10)]))["id"]
    made = (await cart(client, sale, "u", ("a", 1), ("b", 3))).json()
    pay = {"user_id": "u", "payment_ref": "psp-9"}
    done = await client.post(f"/v1/carts/{made['cart_id']}/confirm", json=pay)
    assert done.status_code == 200, done.text
    assert {line["status"] for line in done.json()["reservations"]} == {"confirmed"}
    assert (await client.post(f"/v1/carts/{made['cart_id']}/confirm", json=pay)).status_code == 200  # a retry
    await drained(redis, keys, sale)
    rows = await pg.fetch("SELECT sku, quantity, status FROM reservations WHERE sale_id = $1 ORDER BY sku", sale)
    assert [tuple(r) for r in rows] == [("a", 1, "confirmed"), ("b", 3, "confirmed")]


async def test_cancelling_a_cart_releases_every_line_and_a_confirmed_one_refuses_it(client: httpx.AsyncClient) -> None:
    sale = (await create_sale(client, items=[item("a", 10), item("b", 10)]))["id"]
    made = (await cart(client, sale, "u", ("a", 1), ("b", 3))).json()
    gone = await client.post(f"/v1/carts/{made['cart_id']}/cancel", json={"user_id": "u"})
    assert {line["status"] for line in gone.json()["reservations"]} == {"released"}
    assert await numbers(client, sale) == {"a": (10, 0), "b": (10, 0)}
    paid = (await cart(client, sale, "v", ("a", 1), ("b", 1))).json()
    line = paid["reservations"][0]["reservation_id"]
    confirm = await client.post(f"/v1/reservations/{line}/confirm", json={"user_id": "v", "payment_ref": "p"})
    assert confirm.status_code == 200  # one line paid on its own
    refused = await client.post(f"/v1/carts/{paid['cart_id']}/cancel", json={"user_id": "v"})
    assert (refused.status_code, refused.json()["error"]["code"]) == (409, "invalid_state")
    assert await numbers(client, sale) == {"a": (9, 0), "b": (9, 1)}


async def test_a_cart_whose_hold_ran_out_cannot_be_confirmed_in_part(client: httpx.AsyncClient) -> None:
    sale = (await create_sale(client, hold_seconds=1, items=[item("a", 10), item("b", 10)]))["id"]
    made = (await cart(client, sale, "u", ("a", 1), ("b", 1))).json()
    rid = made["reservations"][1]["reservation_id"]
    extended = await client.post(f"/v1/reservations/{rid}/extend", json={"user_id": "u", "seconds": 60})
    assert extended.status_code == 200  # line b lives on, line a runs out
    await asyncio.sleep(1.1)
    r = await client.post(f"/v1/carts/{made['cart_id']}/confirm", json={"user_id": "u", "payment_ref": "p"})
    assert (r.status_code, r.json()["error"]["code"], r.json()["error"]["fields"]) == (
        410,
        "hold_expired",
        ["lines[0]"],
    )
    got = (await client.get(f"/v1/carts/{made['cart_id']}", params={"user_id": "u"})).json()
    assert [line["status"] for line in got["reservations"]] == ["expired", "held"]  # nothing was confirmed


async def test_bad_carts_are_a_clear_422_that_changes_nothing(client: httpx.AsyncClient) -> None:
    sale = (await create_sale(client, items=[item("a", 10), item("hot", 30, shards=3)]))["id"]
    bad_bodies = [
        {"user_id": "u", "lines": []},
        {"user_id": "u", "lines": [{"sku": "a", "quantity": 0}]},
        {"user_id": "u", "lines": [{"sku": "a"}, {"sku": "a"}]},
        {"user_id": "u", "lines": [{"sku": "a"}], "extra": 1},
        {"lines": [{"sku": "a"}]},
    ]
    for bad in bad_bodies:
        r = await client.post(f"/v1/sales/{sale}/carts", json=bad)
        assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_request"), bad
    sharded = await cart(client, sale, "u", ("a", 1), ("hot", 1))
    assert (sharded.status_code, sharded.json()["error"]["fields"]) == (422, ["lines[1].sku"])
    unknown = await cart(client, sale, "u", ("a", 1), ("nope", 1))
    assert (unknown.status_code, unknown.json()["error"]["fields"]) == (404, ["lines[1]"])
    other = await client.get("/v1/carts/not-a-cart", params={"user_id": "u"})
    assert other.status_code == 404
    assert (await numbers(client, sale))["a"] == (10, 0)


async def test_one_key_used_for_a_reservation_and_then_a_cart_is_an_idempotency_conflict(
    client: httpx.AsyncClient,
) -> None:
    sale = (await create_sale(client, items=[item("a", 10)]))["id"]
    body = {"user_id": "u", "sku": "a", "quantity": 1}
    assert (
        await client.post(f"/v1/sales/{sale}/reservations", json=body, headers={"Idempotency-Key": "k"})
    ).status_code == 201
    again = await cart(client, sale, "u", ("a", 1), key="k")
    assert (again.status_code, again.json()["error"]["code"]) == (422, "idempotency_conflict")
    made = await cart(client, sale, "u", ("a", 1), key="k2")
    assert made.status_code == 201
    reserved = await client.post(f"/v1/sales/{sale}/reservations", json=body, headers={"Idempotency-Key": "k2"})
    assert (reserved.status_code, reserved.json()["error"]["code"]) == (422, "idempotency_conflict")
