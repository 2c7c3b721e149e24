"""The ops endpoints that run a sale: list, update before start, pause, resume, end, restock."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
from redis.asyncio import Redis

from flashsale.keys import Keys
from flashsale.persister import Persister
from flashsale.schemas import SaleIn

from .conftest import OPS, STORE, create_sale, drained

ITEM = {"sku": "phone", "name": "Phone", "price_cents": 49900, "stock": 10, "per_user_limit": 2}

# (method, path, body) of every admin endpoint; SALE is replaced by a real sale's id.
ENDPOINTS: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", "/v1/sales", None),
    ("PATCH", "/v1/sales/SALE", {"name": "Renamed"}),
    ("POST", "/v1/sales/SALE/pause", None),
    ("POST", "/v1/sales/SALE/resume", None),
    ("POST", "/v1/sales/SALE/end", None),
    ("POST", "/v1/sales/SALE/items/phone/restock", {"quantity": 5}),
]
ENDPOINT_IDS = [f"{m} {p}" for m, p, _ in ENDPOINTS]


def later(minutes: float = 10) -> dict[str, str]:
    """A window that opens in the future, so the sale has not started."""
    starts = datetime.now(UTC) + timedelta(minutes=minutes)
    return {"starts_at": starts.isoformat(), "ends_at": (starts + timedelta(hours=1)).isoformat()}


async def ops(client: httpx.AsyncClient, method: str, path: str, body: Any = None) -> httpx.Response:
    return await client.request(method, path, json=body, headers=OPS)


async def reserve(client: httpx.AsyncClient, sale_id: str, user: str = "u1", qty: int = 1) -> httpx.Response:
    return await client.post(
        f"/v1/sales/{sale_id}/reservations", json={"user_id": user, "sku": "phone", "quantity": qty}
    )


async def numbers(redis: Redis, keys: Keys, sale_id: str, sku: str = "phone") -> dict[str, int]:
    values = await redis.hmget(keys.item(sale_id, sku), "stock_total", "available", "held", "confirmed")
    return dict(zip(("stock_total", "available", "held", "confirmed"), (int(v or 0) for v in values), strict=True))


async def document(redis: Redis, keys: Keys, sale_id: str) -> SaleIn:
    raw = await redis.hget(keys.sale(sale_id), "doc")
    assert isinstance(raw, str)
    return msgspec.json.decode(raw, type=SaleIn)


def error(r: httpx.Response) -> str:
    code: str = r.json()["error"]["code"]
    return code


# --- who may call them


@pytest.mark.parametrize(("method", "path", "body"), ENDPOINTS, ids=ENDPOINT_IDS)
async def test_a_storefront_key_is_forbidden_on_every_admin_endpoint(
    client: httpx.AsyncClient, method: str, path: str, body: dict[str, Any] | None
) -> None:
    sale = await create_sale(client, **later())
    r = await client.request(method, path.replace("SALE", sale["id"]), json=body, headers=STORE)
    assert r.status_code == 403 and error(r) == "forbidden"
    assert (await client.get(f"/v1/sales/{sale['id']}")).json() == sale


@pytest.mark.parametrize(("method", "path", "body"), ENDPOINTS, ids=ENDPOINT_IDS)
async def test_no_key_is_unauthorized_on_every_admin_endpoint(
    client: httpx.AsyncClient, app_url: str, method: str, path: str, body: dict[str, Any] | None
) -> None:
    sale = await create_sale(client, **later())
    async with httpx.AsyncClient(base_url=app_url) as anonymous:
        r = await anonymous.request(method, path.replace("SALE", sale["id"]), json=body)
    assert r.status_code == 401 and error(r) == "unauthorized"
    assert (await client.get(f"/v1/sales/{sale['id']}")).json() == sale


@pytest.mark.parametrize(("method", "path", "body"), ENDPOINTS[1:], ids=ENDPOINT_IDS[1:])
async def test_an_unknown_sale_is_not_found_on_every_admin_endpoint(
    client: httpx.AsyncClient, method: str, path: str, body: dict[str, Any] | None
) -> None:
    r = await ops(client, method, path.replace("SALE", "nope"), body)
    assert r.status_code == 404 and error(r) == "not_found"


# --- pause, resume, end


async def test_pause_makes_the_sale_paused_and_refuses_holds_with_sale_paused(client: httpx.AsyncClient) -> None:
    sale = await create_sale(client)
    r = await ops(client, "POST", f"/v1/sales/{sale['id']}/pause")
    assert r.status_code == 200 and r.json() == {**sale, "status": "paused"}
    refused = await reserve(client, sale["id"])
    assert refused.status_code == 409 and error(refused) == "sale_paused"


async def test_resume_lets_holds_in_again(client: httpx.AsyncClient) -> None:
    sale = await create_sale(client)
    await ops(client, "POST", f"/v1/sales/{sale['id']}/pause")
    r = await ops(client, "POST", f"/v1/sales/{sale['id']}/resume")
    assert r.status_code == 200 and r.json()["status"] == "live"
    assert (await reserve(client, sale["id"])).status_code == 201


async def test_holds_made_before_a_pause_can_still_be_confirmed(client: httpx.AsyncClient) -> None:
    sale = await create_sale(client)
    rid = (await reserve(client, sale["id"])).json()["reservation_id"]
    await ops(client, "POST", f"/v1/sales/{sale['id']}/pause")
    r = await client.post(f"/v1/reservations/{rid}/confirm", json={"user_id": "u1", "payment_ref": "p"})
    assert r.status_code == 200 and r.json()["status"] == "confirmed"


async def test_end_makes_the_sale_ended_and_refuses_holds_with_sale_ended(client: httpx.AsyncClient) -> None:
    sale = await create_sale(client)
    r = await ops(client, "POST", f"/v1/sales/{sale['id']}/end")
    assert r.status_code == 200 and r.json()["status"] == "ended"
    refused = await reserve(client, sale["id"])
    assert refused.status_code == 409 and error(refused) == "sale_ended"


async def test_a_paused_sale_can_be_ended(client: httpx.AsyncClient) -> None:
    sale = await create_sale(client)
    await ops(client, "POST", f"/v1/sales/{sale['id']}/pause")
    r = await ops(client, "POST", f"/v1/sales/{sale['id']}/end")
    assert r.status_code == 200 and r.json()["status"] == "ended"


@pytest.mark.parametrize("action", ["pause", "resume"])
async def test_ended_is_final_pause_and_resume_are_invalid_state(
    client: httpx.AsyncClient, redis: Redis, keys: Keys, action: str
) -> None:
    sale = await create_sale(client)
    await ops(client, "POST", f"/v1/sales/{sale['id']}/end")
    r = await ops(client, "POST", f"/v1/sales/{sale['id']}/{action}")
    assert r.status_code == 409 and error(r) == "invalid_state"
    assert await redis.hget(keys.sale(sale["id"]), "state") == "ended"
    assert (await reserve(client, sale["id"])).json()["error"]["code"] == "sale_ended"


async def test_a_sale_ended_by_its_window_cannot_be_resumed(client: httpx.AsyncClient) -> None:
    now = datetime.now(UTC)
    sale = await create_sale(
        client, starts_at=(now - timedelta(hours=1)).isoformat(), ends_at=(now - timedelta(seconds=1)).isoformat()
    )
    r = await ops(client, "POST", f"/v1/sales/{sale['id']}/resume")
    assert r.status_code == 409 and error(r) == "invalid_state"


async def test_asking_for_the_state_a_sale_is_in_changes_nothing(
    client: httpx.AsyncClient, redis: Redis, keys: Keys
) -> None:
    sale = await create_sale(client)
    events = await redis.xlen(keys.events(sale["id"]))
    resumed = await ops(client, "POST", f"/v1/sales/{sale['id']}/resume")
    await ops(client, "POST", f"/v1/sales/{sale['id']}/end")
    again = await ops(client, "POST", f"/v1/sales/{sale['id']}/end")
    assert (resumed.status_code, resumed.json()["status"]) == (200, "live")
    assert (again.status_code, again.json()["status"]) == (200, "ended")
    assert await redis.xlen(keys.events(sale["id"])) == events + 1  # only the one real change


# --- restock


async def test_restock_adds_to_stock_total_and_available_and_returns_the_item(
    client: httpx.AsyncClient, redis: Redis, keys: Keys
) -> None:
    sale = await create_sale(client)
    await reserve(client, sale["id"], qty=2)
    r = await ops(client, "POST", f"/v1/sales/{sale['id']}/items/phone/restock", {"quantity": 5})
    assert r.status_code == 200
    assert r.json() == {
        "sku": "phone",
        "name": "Phone",
        "price_cents": 49900,
        "stock_total": 15,
        "available": 13,
        "held": 2,
        "per_user_limit": 2,
    }
    assert await numbers(redis, keys, sale["id"]) == {"stock_total": 15, "available": 13, "held": 2, "confirmed": 0}


async def test_restock_of_a_sold_out_item_lets_holds_in_again(client: httpx.AsyncClient) -> None:
    sale = await create_sale(client, items=[{**ITEM, "stock": 1, "per_user_limit": 1}])
    rid = (await reserve(client, sale["id"], user="a")).json()["reservation_id"]
    await client.post(f"/v1/reservations/{rid}/confirm", json={"user_id": "a", "payment_ref": "p"})
    assert (await reserve(client, sale["id"], user="b")).json()["error"]["code"] == "sold_out"
    await ops(client, "POST", f"/v1/sales/{sale['id']}/items/phone/restock", {"quantity": 1})
    assert (await reserve(client, sale["id"], user="b")).status_code == 201


async def test_restock_of_an_ended_sale_is_invalid_state(client: httpx.AsyncClient, redis: Redis, keys: Keys) -> None:
    sale = await create_sale(client)
    await ops(client, "POST", f"/v1/sales/{sale['id']}/end")
    r = await ops(client, "POST", f"/v1/sales/{sale['id']}/items/phone/restock", {"quantity": 5})
    assert r.status_code == 409 and error(r) == "invalid_state"
    assert (await numbers(redis, keys, sale["id"]))["stock_total"] == 10


async def test_restock_of_a_paused_sale_is_allowed(client: httpx.AsyncClient) -> None:
    sale = await create_sale(client)
    await ops(client, "POST", f"/v1/sales/{sale['id']}/pause")
    r = await ops(client, "POST", f"/v1/sales/{sale['id']}/items/phone/restock", {"quantity": 5})
    assert r.status_code == 200 and r.json()["stock_total"] == 15


@pytest.mark.parametrize(
    "body",
    [{"quantity": 0}, {"quantity": -1}, {"quantity": "5"}, {}, {"quantity": 1, "x": 1}],
    ids=["zero", "negative", "string", "missing", "unknown field"],
)
async def test_restock_with_a_bad_quantity_is_invalid_request(
    client: httpx.AsyncClient, redis: Redis, keys: Keys, body: dict[str, Any]
) -> None:
    sale = await create_sale(client)
    r = await ops(client, "POST", f"/v1/sales/{sale['id']}/items/phone/restock", body)
    assert r.status_code == 422 and error(r) == "invalid_request"
    assert (await numbers(redis, keys, sale["id"]))["stock_total"] == 10


async def test_restock_past_the_largest_stock_is_invalid_request(
    client: httpx.AsyncClient, redis: Redis, keys: Keys
) -> None:
    sale = await create_sale(client, items=[{**ITEM, "stock": 10**9 - 3}])
    r = await ops(client, "POST", f"/v1/sales/{sale['id']}/items/phone/restock", {"quantity": 4})
    assert r.status_code == 422 and r.json()["error"]["fields"] == ["quantity"]
    ok = await ops(client, "POST", f"/v1/sales/{sale['id']}/items/phone/restock", {"quantity": 3})
    assert ok.status_code == 200 and ok.json()["stock_total"] == 10**9


async def test_restock_of_an_unknown_item_is_not_found(client: httpx.AsyncClient) -> None:
    sale = await create_sale(client)
    r = await ops(client, "POST", f"/v1/sales/{sale['id']}/items/tablet/restock", {"quantity": 1})
    assert r.status_code == 404 and error(r) == "not_found"


async def test_restock_during_300_concurrent_holds_never_oversells(
    client: httpx.AsyncClient, redis: Redis, keys: Keys
) -> None:
    sale = await create_sale(client, items=[{**ITEM, "stock": 20, "per_user_limit": 1}])
    restocks, each = 6, 15
    done = asyncio.Event()
    samples: list[dict[str, int]] = []

    async def watch() -> None:
        while not done.is_set():
            samples.append(await numbers(redis, keys, sale["id"]))
            await asyncio.sleep(0)

    async def buy(n: int) -> str:
        """Reserves; every third buyer who gets a hold also pays for it at once."""
        r = await reserve(client, sale["id"], user=f"user-{n}")
        if r.status_code != 201:
            return error(r)
        if n % 3:
            return "held"
        paid = await client.post(
            f"/v1/reservations/{r.json()['reservation_id']}/confirm",
            json={"user_id": f"user-{n}", "payment_ref": f"pay-{n}"},
        )
        assert paid.status_code == 200
        return "confirmed"

    async def restock() -> str:
        r = await ops(client, "POST", f"/v1/sales/{sale['id']}/items/phone/restock", {"quantity": each})
        return "restocked" if r.status_code == 200 else r.text

    watcher = asyncio.create_task(watch())
    attempts = [buy(n) for n in range(300)]
    for n in range(restocks):  # spread the restocks through the crowd
        attempts.insert(n * 50 + 25, restock())
    outcomes = await asyncio.gather(*attempts)
    done.set()
    await watcher

    assert set(outcomes) <= {"held", "confirmed", "sold_out", "restocked"}
    assert outcomes.count("restocked") == restocks
    final = await numbers(redis, keys, sale["id"])
    assert final["stock_total"] == 20 + restocks * each
    assert (final["held"], final["confirmed"]) == (outcomes.count("held"), outcomes.count("confirmed"))
    assert final["available"] + final["held"] + final["confirmed"] == final["stock_total"]
    assert len(samples) > 10
    for s in samples:
        assert s["held"] + s["confirmed"] <= s["stock_total"] and s["available"] >= 0, s
        assert s["available"] + s["held"] + s["confirmed"] == s["stock_total"], s


# --- update before start


async def test_patch_before_start_changes_the_window_name_and_hold(client: httpx.AsyncClient) -> None:
    sale = await create_sale(client, **later())
    starts = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=2)
    change = {
        "name": "Moved",
        "starts_at": starts.isoformat(),
        "ends_at": (starts + timedelta(hours=3)).isoformat(),
        "hold_seconds": 120,
    }
    r = await ops(client, "PATCH", f"/v1/sales/{sale['id']}", change)
    assert r.status_code == 200
    body = r.json()
    assert (body["name"], body["hold_seconds"], body["status"]) == ("Moved", 120, "scheduled")
    assert datetime.fromisoformat(body["starts_at"]) == starts
    assert datetime.fromisoformat(body["ends_at"]) == starts + timedelta(hours=3)
    assert (await client.get(f"/v1/sales/{sale['id']}")).json() == body


async def test_patch_leaves_fields_it_does_not_name(client: httpx.AsyncClient) -> None:
    sale = await create_sale(client, **later())
    r = await ops(client, "PATCH", f"/v1/sales/{sale['id']}", {"name": "Renamed"})
    assert r.status_code == 200 and r.json() == {**sale, "name": "Renamed"}


async def test_patch_after_start_is_invalid_state(client: httpx.AsyncClient, redis: Redis, keys: Keys) -> None:
    sale = await create_sale(client)  # started a second ago
    rev = await redis.hget(keys.sale(sale["id"]), "rev")
    r = await ops(client, "PATCH", f"/v1/sales/{sale['id']}", {"name": "Too late", **later()})
    assert r.status_code == 409 and error(r) == "invalid_state"
    assert (await client.get(f"/v1/sales/{sale['id']}")).json() == sale
    assert await redis.hget(keys.sale(sale["id"]), "rev") == rev


async def test_patch_of_a_sale_ended_before_it_started_is_invalid_state(client: httpx.AsyncClient) -> None:
    sale = await create_sale(client, **later())
    await ops(client, "POST", f"/v1/sales/{sale['id']}/end")
    r = await ops(client, "PATCH", f"/v1/sales/{sale['id']}", {"name": "Revived"})
    assert r.status_code == 409 and error(r) == "invalid_state"


async def test_patch_of_items_adds_new_skus_and_drops_removed_ones(
    client: httpx.AsyncClient, redis: Redis, keys: Keys
) -> None:
    sale = await create_sale(client, **later(), items=[ITEM, {**ITEM, "sku": "case", "name": "Case"}])
    items = [
        {**ITEM, "stock": 7, "per_user_limit": 3},
        {"sku": "tablet", "name": "Tablet", "price_cents": 99900, "stock": 4},
    ]
    r = await ops(client, "PATCH", f"/v1/sales/{sale['id']}", {"items": items})
    assert r.status_code == 200
    assert [(i["sku"], i["stock_total"], i["available"], i["per_user_limit"]) for i in r.json()["items"]] == [
        ("phone", 7, 7, 3),
        ("tablet", 4, 4, 1),
    ]
    assert not await redis.exists(keys.item(sale["id"], "case"))
    assert await redis.hget(keys.item(sale["id"], "tablet"), "stock_total") == "4"
    fields = await redis.hmget(keys.sale(sale["id"]), "skus", "rev")
    assert fields == ["phone,tablet", "2"]


async def test_patched_items_take_holds_once_the_sale_starts(client: httpx.AsyncClient) -> None:
    sale = await create_sale(client, **later())
    soon = datetime.now(UTC) + timedelta(seconds=0.3)
    change = {"starts_at": soon.isoformat(), "items": [{**ITEM, "sku": "tablet", "name": "Tablet"}]}
    assert (await ops(client, "PATCH", f"/v1/sales/{sale['id']}", change)).status_code == 200
    await asyncio.sleep(0.4)
    gone = await reserve(client, sale["id"])
    assert gone.status_code == 404
    r = await client.post(f"/v1/sales/{sale['id']}/reservations", json={"user_id": "u1", "sku": "tablet"})
    assert r.status_code == 201


@pytest.mark.parametrize(
    "change",
    [
        {"id": "other"},
        {"name": None},
        {"hold_seconds": 0},
        {"items": []},
        {"starts_at": "2030-01-02T00:00:00+00:00", "ends_at": "2030-01-01T00:00:00+00:00"},
        {"items": [ITEM, ITEM]},
    ],
    ids=["id", "null name", "zero hold", "no items", "ends before starts", "duplicate sku"],
)
async def test_patch_with_bad_fields_is_invalid_request(
    client: httpx.AsyncClient, redis: Redis, keys: Keys, change: dict[str, Any]
) -> None:
    sale = await create_sale(client, **later())
    r = await ops(client, "PATCH", f"/v1/sales/{sale['id']}", change)
    assert r.status_code == 422 and error(r) == "invalid_request"
    assert await redis.hget(keys.sale(sale["id"]), "rev") == "1"


async def test_patch_after_a_restock_keeps_the_restocked_stock(client: httpx.AsyncClient) -> None:
    sale = await create_sale(client, **later())
    await ops(client, "POST", f"/v1/sales/{sale['id']}/items/phone/restock", {"quantity": 5})
    r = await ops(client, "PATCH", f"/v1/sales/{sale['id']}", {"name": "Renamed"})
    assert r.json()["items"][0]["stock_total"] == 15


async def test_concurrent_updates_and_restocks_lose_nothing(
    client: httpx.AsyncClient, redis: Redis, keys: Keys
) -> None:
    sale = await create_sale(client, **later())
    path = f"/v1/sales/{sale['id']}"
    replies = await asyncio.gather(
        *(ops(client, "POST", f"{path}/items/phone/restock", {"quantity": 1}) for _ in range(10)),
        *(ops(client, "PATCH", path, {"name": f"Name {n}"}) for n in range(10)),
    )
    assert {r.status_code for r in replies} == {200}
    doc = await document(redis, keys, sale["id"])
    assert doc.items[0].stock == 20 and doc.name.startswith("Name ")
    assert (await numbers(redis, keys, sale["id"]))["stock_total"] == 20


async def test_concurrent_item_replacements_leave_exactly_one_of_them(
    client: httpx.AsyncClient, redis: Redis, keys: Keys
) -> None:
    sale = await create_sale(client, **later())
    path = f"/v1/sales/{sale['id']}"
    lists = [[{**ITEM, "stock": n}, {**ITEM, "sku": f"extra{n}", "name": "Extra"}] for n in range(8)]
    replies = await asyncio.gather(*(ops(client, "PATCH", path, {"items": items}) for items in lists))
    assert {r.status_code for r in replies} == {200}
    doc = await document(redis, keys, sale["id"])
    skus = [i.sku for i in doc.items]
    assert (await redis.hget(keys.sale(sale["id"]), "skus")) == ",".join(skus)
    winner = int(skus[1].removeprefix("extra"))
    assert (await numbers(redis, keys, sale["id"]))["stock_total"] == doc.items[0].stock == winner
    left = sorted([k async for k in redis.scan_iter(match=keys.item(sale["id"], "*"))])
    assert left == sorted(keys.item(sale["id"], s) for s in skus)


# --- list


async def test_list_is_newest_first(client: httpx.AsyncClient) -> None:
    ids = []
    for n in range(3):
        ids.append((await create_sale(client, sale_id=f"s{n}"))["id"])
        await asyncio.sleep(0.002)  # distinct creation ms
    r = await ops(client, "GET", "/v1/sales")
    assert r.status_code == 200
    assert [s["id"] for s in r.json()["sales"]] == ids[::-1] and r.json()["next_cursor"] is None
    assert r.json()["sales"][0] == (await client.get(f"/v1/sales/{ids[-1]}")).json()


async def test_list_paginates_with_the_cursor_until_it_is_null(client: httpx.AsyncClient) -> None:
    ids = []
    for n in range(5):
        ids.append((await create_sale(client, sale_id=f"s{n}"))["id"])
        await asyncio.sleep(0.002)
    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        page = (await client.get("/v1/sales", params=params, headers=OPS)).json()
        assert len(page["sales"]) <= 2
        seen += [s["id"] for s in page["sales"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
        await create_sale(client)  # a sale created meanwhile goes on top, not into later pages
    assert seen == ids[::-1] and pages == 3


async def test_sales_created_in_the_same_millisecond_are_neither_skipped_nor_repeated(
    client: httpx.AsyncClient, redis: Redis, keys: Keys
) -> None:
    ids = [(await create_sale(client, sale_id=f"s{n}"))["id"] for n in range(5)]
    await redis.zadd(keys.sales, dict.fromkeys(ids, 1_700_000_000_000), xx=True)
    seen, cursor = [], None
    while True:
        page = (
            await client.get("/v1/sales", params={"limit": "2", **({"cursor": cursor} if cursor else {})}, headers=OPS)
        ).json()
        seen += [s["id"] for s in page["sales"]]
        if (cursor := page["next_cursor"]) is None:
            break
    assert seen == sorted(ids, reverse=True)


async def test_list_pages_hold_50_sales_unless_asked(client: httpx.AsyncClient) -> None:
    ids = {s["id"] for s in await asyncio.gather(*(create_sale(client) for _ in range(51)))}
    first = (await ops(client, "GET", "/v1/sales")).json()
    rest = (await client.get("/v1/sales", params={"cursor": first["next_cursor"]}, headers=OPS)).json()
    assert len(first["sales"]) == 50 and len(rest["sales"]) == 1 and rest["next_cursor"] is None
    assert {s["id"] for s in first["sales"] + rest["sales"]} == ids


async def test_list_skips_a_sale_whose_create_never_finished(
    client: httpx.AsyncClient, redis: Redis, keys: Keys
) -> None:
    sale = await create_sale(client)
    await redis.zadd(keys.sales, {"half-made": 1})  # listed, then the create failed before the script ran
    page = (await ops(client, "GET", "/v1/sales")).json()
    assert [s["id"] for s in page["sales"]] == [sale["id"]] and page["next_cursor"] is None


@pytest.mark.parametrize(
    "params",
    [{"limit": "0"}, {"limit": "201"}, {"limit": "ten"}, {"limit": "-1"}, {"cursor": "not-a-cursor"}, {"cursor": "é"}],
    ids=["limit 0", "limit 201", "limit ten", "limit -1", "bad cursor", "non-ascii cursor"],
)
async def test_list_with_a_bad_limit_or_cursor_is_invalid_request(
    client: httpx.AsyncClient, params: dict[str, str]
) -> None:
    r = await client.get("/v1/sales", params=params, headers=OPS)
    assert r.status_code == 422 and error(r) == "invalid_request"
    assert r.json()["error"]["fields"] == list(params)


async def test_list_takes_the_largest_page(client: httpx.AsyncClient) -> None:
    await create_sale(client)
    r = await client.get("/v1/sales", params={"limit": "200"}, headers=OPS)
    assert r.status_code == 200 and len(r.json()["sales"]) == 1


# --- Postgres follows


async def test_the_persister_writes_state_changes_to_postgres(
    client: httpx.AsyncClient, redis: Redis, keys: Keys, pg: asyncpg.Connection, worker: Persister
) -> None:
    sale = await create_sale(client)
    for action, state in (("pause", "paused"), ("resume", "active"), ("end", "ended")):
        await ops(client, "POST", f"/v1/sales/{sale['id']}/{action}")
        await drained(redis, keys, sale["id"])
        assert await pg.fetchval("SELECT state FROM sales WHERE id = $1", sale["id"]) == state


async def test_the_persister_writes_restocked_stock_total_to_postgres(
    client: httpx.AsyncClient, redis: Redis, keys: Keys, pg: asyncpg.Connection, worker: Persister
) -> None:
    sale = await create_sale(client, items=[ITEM, {**ITEM, "sku": "case", "name": "Case", "stock": 3}])
    await asyncio.gather(
        *(ops(client, "POST", f"/v1/sales/{sale['id']}/items/phone/restock", {"quantity": 5}) for _ in range(4))
    )
    await drained(redis, keys, sale["id"])
    rows = await pg.fetch("SELECT sku, stock_total FROM items WHERE sale_id = $1 ORDER BY sku", sale["id"])
    assert [(r["sku"], r["stock_total"]) for r in rows] == [("case", 3), ("phone", 30)]


async def test_the_persister_writes_a_patched_window_and_items_to_postgres(
    client: httpx.AsyncClient, redis: Redis, keys: Keys, pg: asyncpg.Connection, worker: Persister
) -> None:
    sale = await create_sale(client, **later())
    starts = datetime.now(UTC).replace(microsecond=0) + timedelta(days=1)
    change = {
        "name": "Moved",
        "starts_at": starts.isoformat(),
        "ends_at": (starts + timedelta(hours=1)).isoformat(),
        "items": [{**ITEM, "stock": 4}, {**ITEM, "sku": "tablet", "name": "Tablet", "stock": 6}],
    }
    assert (await ops(client, "PATCH", f"/v1/sales/{sale['id']}", change)).status_code == 200
    await drained(redis, keys, sale["id"])
    row = await pg.fetchrow("SELECT name, starts_at, state FROM sales WHERE id = $1", sale["id"])
    assert row is not None
    assert (row["name"], row["starts_at"], row["state"]) == ("Moved", starts, "active")
    items = await pg.fetch("SELECT sku, stock_total FROM items WHERE sale_id = $1 ORDER BY sku", sale["id"])
    assert [(r["sku"], r["stock_total"]) for r in items] == [("phone", 4), ("tablet", 6)]


# --- documented


async def test_openapi_documents_every_admin_endpoint(client: httpx.AsyncClient) -> None:
    paths = (await client.get("/openapi.json")).json()["paths"]
    for method, path, _ in ENDPOINTS:
        documented = paths[path.replace("SALE", "{sale_id}").replace("phone", "{sku}")]
        assert method.lower() in documented, f"{method} {path}"
    assert "post" in paths["/v1/sales"] and "get" in paths["/v1/sales/{sale_id}"]


@pytest.mark.parametrize(("path", "methods"), [("/v1/sales", "GET, HEAD, POST"), ("/v1/sales/any", "GET, HEAD, PATCH")])
async def test_a_405_lists_the_methods_of_both_modules_sharing_a_path(
    client: httpx.AsyncClient, path: str, methods: str
) -> None:
    r = await client.request("DELETE", path, headers=OPS)
    assert r.status_code == 405 and r.headers["allow"] == methods
