"""GET /v1/sales/{id}/reservations?user_id=: a user's reservations in a sale, newest first."""

from __future__ import annotations

import httpx

from .conftest import create_sale
from .test_reservations import reserve


async def mine(client: httpx.AsyncClient, sale: str, user: str, **params: str) -> httpx.Response:
    return await client.get(f"/v1/sales/{sale}/reservations", params={"user_id": user, **params})


async def test_a_users_reservations_come_newest_first_with_their_status(client: httpx.AsyncClient) -> None:
    sale = (
        await create_sale(
            client, items=[{"sku": "phone", "name": "P", "price_cents": 1, "stock": 10, "per_user_limit": 5}]
        )
    )["id"]
    made = [(await reserve(client, sale, "ann")).json()["reservation_id"] for _ in range(3)]
    await reserve(client, sale, "bob")
    cancel = await client.post(f"/v1/reservations/{made[0]}/cancel", json={"user_id": "ann"})
    assert cancel.status_code == 200

    r = await mine(client, sale, "ann")

    assert r.status_code == 200
    listed = r.json()["reservations"]
    assert [x["reservation_id"] for x in listed] == made[::-1]
    assert [x["status"] for x in listed] == ["held", "held", "released"]
    assert {x["user_id"] for x in listed} == {"ann"}


async def test_the_list_stops_at_limit_and_a_user_without_reservations_gets_none(client: httpx.AsyncClient) -> None:
    sale = (
        await create_sale(
            client, items=[{"sku": "phone", "name": "P", "price_cents": 1, "stock": 10, "per_user_limit": 5}]
        )
    )["id"]
    made = [(await reserve(client, sale, "ann")).json()["reservation_id"] for _ in range(3)]
    assert [x["reservation_id"] for x in (await mine(client, sale, "ann", limit="2")).json()["reservations"]] == made[
        :0:-1
    ]
    assert (await mine(client, sale, "nobody")).json() == {"reservations": []}


async def test_a_missing_user_id_or_a_bad_limit_is_a_clear_422(client: httpx.AsyncClient) -> None:
    sale = (await create_sale(client))["id"]
    no_user = await client.get(f"/v1/sales/{sale}/reservations")
    assert no_user.status_code == 422 and no_user.json()["error"]["fields"] == ["user_id"]
    for bad in ("0", "101", "x", "1.5"):
        r = await mine(client, sale, "ann", limit=bad)
        assert r.status_code == 422 and r.json()["error"]["fields"] == ["limit"], bad
