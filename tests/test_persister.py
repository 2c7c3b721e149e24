"""The persister: every acknowledged reservation reaches Postgres with its final status, once."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis

from flashsale.keys import GROUP, Keys
from flashsale.persister import POISON, Persister, write
from flashsale.reconcile import reconcile
from flashsale.settings import Settings

from .conftest import OPS, create_sale, drained, persisting
from .test_reservations import reserve


async def rows(pg: asyncpg.Connection, sale_id: str) -> dict[str, str]:
    found = await pg.fetch("SELECT id, status FROM reservations WHERE sale_id = $1", sale_id)
    return {r["id"]: r["status"] for r in found}


async def entries(redis: Redis, key: str) -> list[tuple[str, dict[str, str]]]:
    """A stream's entries, typed as this suite's decode_responses client returns them."""
    return cast(list[tuple[str, dict[str, str]]], await redis.xrange(key))


async def events(redis: Redis, keys: Keys, sale_id: str) -> list[tuple[str, dict[str, str]]]:
    return await entries(redis, keys.events(sale_id))


async def test_every_reservation_reaches_postgres_with_its_final_status(
    client: httpx.AsyncClient, worker: Persister, redis: Redis, keys: Keys, pg: asyncpg.Connection
) -> None:
    sale = await create_sale(
        client,
        hold_seconds=1,
        items=[{"sku": "phone", "name": "P", "price_cents": 1, "stock": 10, "per_user_limit": 1}],
    )
    rids = [(await reserve(client, sale["id"], user=f"u{n}")).json()["reservation_id"] for n in range(4)]
    await client.post(f"/v1/reservations/{rids[0]}/confirm", json={"user_id": "u0", "payment_ref": "p0"})
    await client.post(f"/v1/reservations/{rids[1]}/cancel", json={"user_id": "u1"})
    await asyncio.sleep(1.5)  # the other two expire
    await drained(redis, keys, sale["id"])
    assert await rows(pg, sale["id"]) == {
        rids[0]: "confirmed",
        rids[1]: "released",
        rids[2]: "expired",
        rids[3]: "expired",
    }
    saved = await pg.fetchrow("SELECT * FROM reservations WHERE id = $1", rids[0])
    assert saved is not None
    assert saved["payment_ref"] == "p0" and saved["confirmed_at"] is not None and saved["user_id"] == "u0"
    assert await pg.fetchval("SELECT state FROM sales WHERE id = $1", sale["id"]) == "active"
    assert await pg.fetchval("SELECT stock_total FROM items WHERE sale_id = $1", sale["id"]) == 10


async def test_replaying_a_batch_changes_nothing(
    client: httpx.AsyncClient, worker: Persister, redis: Redis, keys: Keys, pg: asyncpg.Connection
) -> None:
    sale = await create_sale(client)
    rid = (await reserve(client, sale["id"])).json()["reservation_id"]
    await client.post(f"/v1/reservations/{rid}/confirm", json={"user_id": "u1", "payment_ref": "p"})
    await drained(redis, keys, sale["id"])
    before = await pg.fetch("SELECT * FROM reservations ORDER BY id")
    await write(pg, sale["id"], await events(redis, keys, sale["id"]))
    assert await pg.fetch("SELECT * FROM reservations ORDER BY id") == before


async def test_events_out_of_order_still_end_in_the_final_status(
    client: httpx.AsyncClient, redis: Redis, keys: Keys, pg: asyncpg.Connection
) -> None:
    sale = await create_sale(client)
    rid = (await reserve(client, sale["id"])).json()["reservation_id"]
    await client.post(f"/v1/reservations/{rid}/cancel", json={"user_id": "u1"})
    created, reserved, cancelled = await events(redis, keys, sale["id"])
    await write(pg, sale["id"], [cancelled])
    await write(pg, sale["id"], [reserved])
    await write(pg, sale["id"], [created])
    assert await rows(pg, sale["id"]) == {rid: "released"}


async def test_a_final_status_never_goes_back_to_held(
    client: httpx.AsyncClient, redis: Redis, keys: Keys, pg: asyncpg.Connection
) -> None:
    sale = await create_sale(client)
    rid = (await reserve(client, sale["id"])).json()["reservation_id"]
    await client.post(f"/v1/reservations/{rid}/confirm", json={"user_id": "u1", "payment_ref": "p"})
    _, reserved, confirmed = await events(redis, keys, sale["id"])
    await write(pg, sale["id"], [reserved, confirmed])  # both in one batch
    await write(pg, sale["id"], [reserved])
    assert await rows(pg, sale["id"]) == {rid: "confirmed"}


async def test_a_batch_reaches_postgres_field_by_field_and_postgres_refuses_bad_values(
    client: httpx.AsyncClient, redis: Redis, keys: Keys, pg: asyncpg.Connection
) -> None:
    """write() sends a batch as one JSON text of its entries, read back by field name: each field
    lands in its column (one a reserve event lacks, payment_ref, is NULL), and a value no column
    holds is refused by Postgres as POISON, so handle() can write the batch one by one."""
    sale = await create_sale(client)
    rid = (await reserve(client, sale["id"], key="k1")).json()["reservation_id"]
    await client.post(f"/v1/reservations/{rid}/confirm", json={"user_id": "u1", "payment_ref": "p"})
    rid2 = (await reserve(client, sale["id"], user="u2", qty=2)).json()["reservation_id"]
    created, reserved, confirmed, reserved2 = await events(redis, keys, sale["id"])
    await write(pg, sale["id"], [confirmed, created, reserved, reserved2])  # held and confirmed in one batch
    found = {r["id"]: r for r in await pg.fetch("SELECT * FROM reservations WHERE sale_id = $1", sale["id"])}

    def at(ms: str) -> datetime:
        return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=int(ms))

    for (_, event), row in ((confirmed, found[rid]), (reserved2, found[rid2])):
        assert (row["sku"], row["user_id"], row["quantity"], row["status"], row["idempotency_key"]) == (
            event["sku"],
            event["user"],
            int(event["qty"]),
            event["status"],
            event["idem"],
        )
        assert (row["created_at"], row["expires_at"]) == (at(event["created_ms"]), at(event["expires_ms"]))
    assert found[rid]["idempotency_key"] == "k1" and found[rid]["payment_ref"] == "p"
    assert found[rid]["confirmed_at"] == at(confirmed[1]["at_ms"]) and found[rid]["released_at"] is None
    assert found[rid2]["quantity"] == 2 and found[rid2]["payment_ref"] is None and found[rid2]["confirmed_at"] is None
    before = await pg.fetch("SELECT * FROM reservations ORDER BY id")
    await write(pg, sale["id"], [reserved])  # the older held event, replayed after the final one
    for bad in ({"user": "a\x00b"}, {"qty": str(2**31)}, {"expires_ms": str(2**63)}):
        entry = (f"{reserved[0]}-bad", {**reserved[1], "rid": f"{sale['id']}.bad", **bad})
        with pytest.raises(POISON):
            await write(pg, sale["id"], [reserved, entry])
    assert await pg.fetch("SELECT * FROM reservations ORDER BY id") == before


async def test_a_malformed_entry_is_dead_lettered_and_the_rest_persisted(
    client: httpx.AsyncClient, worker: Persister, redis: Redis, keys: Keys, pg: asyncpg.Connection
) -> None:
    sale = await create_sale(client)
    await redis.xadd(keys.events(sale["id"]), {"type": "reserve", "rid": "x"})
    rid = (await reserve(client, sale["id"])).json()["reservation_id"]
    await drained(redis, keys, sale["id"])
    assert await rows(pg, sale["id"]) == {rid: "held"}
    dead = await entries(redis, keys.dead(sale["id"]))
    assert len(dead) == 1 and dead[0][1]["reason"].startswith("malformed")


async def test_an_entry_postgres_keeps_refusing_is_dead_lettered_after_max_deliveries(
    client: httpx.AsyncClient, settings: Settings, redis: Redis, keys: Keys, pg: asyncpg.Connection
) -> None:
    sale = await create_sale(client)
    good = (await reserve(client, sale["id"])).json()["reservation_id"]
    _, reserved = await events(redis, keys, sale["id"])
    # Postgres text cannot hold NUL: this entry fails on every delivery.
    await redis.xadd(
        keys.events(sale["id"]), {**cast(dict[Any, Any], reserved[1]), "rid": f"{sale['id']}.bad", "user": "a\x00b"}
    )
    fast = dataclasses.replace(settings, max_deliveries=2, claim_idle_ms=200)
    async with persisting(fast, redis) as persister:
        await drained(redis, keys, sale["id"])
    assert await rows(pg, sale["id"]) == {good: "held"}
    dead = await entries(redis, keys.dead(sale["id"]))
    assert [d[1]["reason"] for d in dead] == ["refused by postgres 2 times"]
    assert persister.dead_lettered == 1
    assert await redis.hlen(keys.refused(sale["id"])) == 0


async def test_an_entry_delivered_many_times_without_a_refusal_is_still_persisted(
    client: httpx.AsyncClient, settings: Settings, redis: Redis, keys: Keys, pg: asyncpg.Connection
) -> None:
    """Workers that crash, or restart during an outage, deliver an entry again and again;
    that alone must never dead-letter an acknowledged reservation."""
    sale = await create_sale(client)
    rid = (await reserve(client, sale["id"])).json()["reservation_id"]
    stream = keys.events(sale["id"])
    await redis.xreadgroup(GROUP, "crashed-0", {stream: ">"})
    for n in range(1, 10):  # each takeover by a worker that then died counts one more delivery
        await redis.xautoclaim(stream, GROUP, f"crashed-{n}", 0, "0-0")
    pending = await redis.xpending_range(stream, GROUP, "-", "+", 10)
    assert min(int(p["times_delivered"]) for p in pending) > settings.max_deliveries
    async with persisting(dataclasses.replace(settings, claim_idle_ms=100), redis):
        await drained(redis, keys, sale["id"])
    assert await rows(pg, sale["id"]) == {rid: "held"}
    assert await redis.xlen(keys.dead(sale["id"])) == 0


async def test_entries_left_pending_by_a_dead_consumer_are_claimed(
    client: httpx.AsyncClient, settings: Settings, redis: Redis, keys: Keys, pg: asyncpg.Connection
) -> None:
    sale = await create_sale(client)
    rids = [(await reserve(client, sale["id"], user=f"u{n}")).json()["reservation_id"] for n in range(2)]
    # A consumer reads everything and dies before its XACK.
    await redis.xreadgroup(GROUP, "ghost", {keys.events(sale["id"]): ">"}, count=100)
    assert (await redis.xpending(keys.events(sale["id"]), GROUP))["pending"] == 3
    async with persisting(settings, redis):
        await drained(redis, keys, sale["id"])
    assert await rows(pg, sale["id"]) == dict.fromkeys(rids, "held")


async def test_reconcile_is_clean_once_drained_and_names_each_difference(
    client: httpx.AsyncClient, worker: Persister, redis: Redis, keys: Keys, pg: asyncpg.Connection
) -> None:
    sale = await create_sale(client)
    rid = (await reserve(client, sale["id"], qty=2)).json()["reservation_id"]
    await reserve(client, sale["id"], user="u2")
    await client.post(f"/v1/reservations/{rid}/confirm", json={"user_id": "u1", "payment_ref": "p"})
    await drained(redis, keys, sale["id"])
    assert (await reconcile(redis, pg, keys, sale["id"])).differences == []
    await pg.execute("UPDATE reservations SET status = 'held', confirmed_at = NULL WHERE id = $1", rid)
    report = await reconcile(redis, pg, keys, sale["id"])
    assert report.differences == ["phone held: redis 1, postgres 3", "phone confirmed: redis 2, postgres 0"]
    assert "DIFFERENCE" in report.table()


async def test_an_item_dropped_from_the_sale_document_leaves_postgres_too(
    client: httpx.AsyncClient, redis: Redis, keys: Keys, pg: asyncpg.Connection
) -> None:
    sale = await create_sale(
        client,
        items=[
            {"sku": "a", "name": "A", "price_cents": 1, "stock": 1},
            {"sku": "b", "name": "B", "price_cents": 1, "stock": 1},
        ],
    )
    ((entry_id, created),) = await events(redis, keys, sale["id"])
    await write(pg, sale["id"], [(entry_id, created)])
    doc = json.loads(created["doc"])
    doc["items"] = doc["items"][:1]
    later = {**created, "doc": json.dumps(doc), "at_ms": str(int(created["at_ms"]) + 1)}
    await write(pg, sale["id"], [("2-0", later)])
    assert [r["sku"] for r in await pg.fetch("SELECT sku FROM items WHERE sale_id = $1", sale["id"])] == ["a"]
    await write(pg, sale["id"], [(entry_id, created)])  # the older event, replayed, changes nothing
    assert await pg.fetchval("SELECT count(*) FROM items WHERE sale_id = $1", sale["id"]) == 1


async def test_postgres_gives_every_sale_the_status_the_api_gives(
    client: httpx.AsyncClient, redis: Redis, keys: Keys, pg: asyncpg.Connection, worker: Persister
) -> None:
    now = datetime.now(UTC)
    one = [{"sku": "phone", "name": "P", "price_cents": 1, "stock": 1, "per_user_limit": 1}]
    sales = {
        "scheduled": await create_sale(client, starts_at=(now + timedelta(hours=1)).isoformat()),
        "live": await create_sale(client, items=one),
        "paused": await create_sale(client),
        "ended": await create_sale(client, ends_at=(now + timedelta(seconds=0.5)).isoformat()),
        "sold_out": await create_sale(client, items=one),
    }
    await client.post(f"/v1/sales/{sales['paused']['id']}/pause", headers=OPS)
    rid = (await reserve(client, sales["sold_out"]["id"])).json()["reservation_id"]
    await client.post(f"/v1/reservations/{rid}/confirm", json={"user_id": "u1", "payment_ref": "p"})
    await asyncio.sleep(0.6)  # the "ended" sale's window closes: nothing is written, the status moves anyway
    for sale in sales.values():
        await drained(redis, keys, sale["id"])
    for expected, sale in sales.items():
        api = (await client.get(f"/v1/sales/{sale['id']}")).json()["status"]
        stored = await pg.fetchval("SELECT status FROM sale_status WHERE id = $1", sale["id"])
        assert (api, stored) == (expected, expected)


async def wait_retired(redis: Redis, keys: Keys, sale_id: str, timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while await redis.zscore(keys.active, sale_id) is not None:
        assert asyncio.get_running_loop().time() < deadline, "the sale was not retired"
        await asyncio.sleep(0.1)


async def test_a_sale_over_with_no_hold_and_nothing_queued_leaves_the_active_set(
    client: httpx.AsyncClient, redis: Redis, keys: Keys, pg: asyncpg.Connection, worker: Persister
) -> None:
    now = datetime.now(UTC)
    sale = await create_sale(client, ends_at=(now + timedelta(seconds=0.5)).isoformat(), hold_seconds=1)
    rid = (await reserve(client, sale["id"])).json()["reservation_id"]
    assert await redis.zscore(keys.active, sale["id"]) is not None
    await wait_retired(redis, keys, sale["id"])
    assert await rows(pg, sale["id"]) == {rid: "expired"}  # its hold was swept and persisted first
    assert await redis.zscore(keys.sales, sale["id"]) is not None  # still listed and readable
    assert (await client.get(f"/v1/sales/{sale['id']}")).json()["status"] == "ended"


async def test_a_sale_is_retired_only_once_its_sale_ended_is_in_the_webhooks_outbox(
    client: httpx.AsyncClient, redis: Redis, keys: Keys, worker: Persister
) -> None:
    now = datetime.now(UTC)
    sale = await create_sale(client, ends_at=(now + timedelta(seconds=0.5)).isoformat(), hold_seconds=1)
    await wait_retired(redis, keys, sale["id"])
    assert await redis.hget(keys.sale(sale["id"]), "ended_told") == "1"  # set by the dispatcher beside it


async def test_an_active_entry_whose_sale_is_gone_is_retired_all_the_same(
    redis: Redis, keys: Keys, worker: Persister
) -> None:
    await redis.zadd(keys.active, {"lost-sale": 1})  # a sale whose keys a lost master took with it
    await wait_retired(redis, keys, "lost-sale")


async def test_ending_a_retired_sale_still_reaches_postgres(
    client: httpx.AsyncClient, redis: Redis, keys: Keys, pg: asyncpg.Connection, worker: Persister
) -> None:
    now = datetime.now(UTC)
    sale = await create_sale(client, ends_at=(now + timedelta(seconds=0.3)).isoformat(), hold_seconds=1)
    await wait_retired(redis, keys, sale["id"])
    assert await pg.fetchval("SELECT state FROM sales WHERE id = $1", sale["id"]) == "active"
    assert (await client.post(f"/v1/sales/{sale['id']}/end", headers=OPS)).status_code == 200
    await drained(redis, keys, sale["id"])
    assert await pg.fetchval("SELECT state FROM sales WHERE id = $1", sale["id"]) == "ended"
