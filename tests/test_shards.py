"""A sharded item (``items[].shards``) on one Redis: the same contract as an item in one slot.

Routing, moves between shards, the copies of the sale's state and the sums do not need a
cluster to be right or wrong; test_cluster.py runs a sharded item on three masters."""

from __future__ import annotations

import asyncio
import random
from collections import Counter, defaultdict
from typing import Any, cast

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis

from flashsale import shards
from flashsale.audit import Auditor
from flashsale.keys import Keys
from flashsale.persister import Persister
from flashsale.reconcile import reconcile
from flashsale.recover import recover
from flashsale.scripts import Scripts
from flashsale.settings import Settings
from flashsale.sweeper import MOVE_REPAIR_MS, sweep_once

from . import procs
from .conftest import OPS, STORE, create_sale, drained
from .test_recover import forget_sale


def item(stock: int, shards: int = 3, limit: int = 2, sku: str = "phone") -> dict[str, Any]:
    return {"sku": sku, "name": sku, "price_cents": 100, "stock": stock, "per_user_limit": limit, "shards": shards}


def users_of(slot: str, slots: list[str], n: int) -> list[str]:
    """``n`` user ids whose reservations of an item on ``slots`` go to ``slot``."""
    found = (f"u{i}" for i in range(100_000))
    return [u for u in found if shards.home(slots, u) == slot][:n]


async def slots_of(redis: Redis, keys: Keys, sale_id: str) -> list[str]:
    return [sale_id, *cast(str, await redis.hget(keys.sale(sale_id), "slots")).split(",")]


async def reserve(c: httpx.AsyncClient, sale: str, user: str, qty: int = 1, key: str = "") -> httpx.Response:
    headers = {"Idempotency-Key": key} if key else {}
    return await c.post(
        f"/v1/sales/{sale}/reservations", json={"user_id": user, "sku": "phone", "quantity": qty}, headers=headers
    )


async def shard_numbers(redis: Redis, keys: Keys, slots: list[str]) -> list[dict[str, int]]:
    out = []
    for slot in slots:
        h = await redis.hgetall(keys.item(slot, "phone"))
        out.append({f: int(h.get(f) or 0) for f in ("stock_total", "available", "held", "confirmed", "in_flight")})
    return out


async def test_a_sharded_item_is_split_over_its_shards_and_read_as_one(
    client: httpx.AsyncClient, redis: Redis, keys: Keys
) -> None:
    sale = await create_sale(client, items=[item(10)])
    assert sale["items"][0] | {"next_release_at": None} == sale["items"][0] | {
        "stock_total": 10,
        "available": 10,
        "held": 0,
        "shards": 3,
        "next_release_at": None,
    }
    slots = await slots_of(redis, keys, sale["id"])
    assert len(set(slots)) == 3
    assert [n["stock_total"] for n in await shard_numbers(redis, keys, slots)] == [4, 3, 3]
    for user in (users_of(s, slots, 1)[0] for s in slots):
        assert (await reserve(client, sale["id"], user)).status_code == 201
    got = (await client.get(f"/v1/sales/{sale['id']}")).json()["items"][0]
    assert (got["stock_total"], got["available"], got["held"]) == (10, 7, 3)
    assert [n["held"] for n in await shard_numbers(redis, keys, slots)] == [1, 1, 1]


async def test_units_move_to_the_shard_of_the_user_so_no_unit_is_stranded_and_sold_out_is_never_false(
    client: httpx.AsyncClient, redis: Redis, keys: Keys
) -> None:
    """Every user of the crowd lands on one shard, which starts with a third of the stock."""
    sale = await create_sale(client, items=[item(9, limit=1)])
    slots = await slots_of(redis, keys, sale["id"])
    crowd = users_of(slots[1], slots, 10)
    answers = [(await reserve(client, sale["id"], u)).status_code for u in crowd]
    assert answers == [201] * 9 + [409]
    numbers = await shard_numbers(redis, keys, slots)
    assert [n["available"] for n in numbers] == [0, 0, 0]
    assert sum(n["held"] for n in numbers) == numbers[1]["held"] == 9
    assert all(n["in_flight"] == 0 for n in numbers)
    assert all(n["available"] + n["held"] + n["confirmed"] == n["stock_total"] for n in numbers)
    last = (await reserve(client, sale["id"], crowd[9])).json()["error"]
    assert (last["code"], last["available"]) == ("sold_out", 0)


async def test_the_per_user_limit_is_exact_across_shards_and_a_retry_lands_where_the_first_try_did(
    client: httpx.AsyncClient, redis: Redis, keys: Keys
) -> None:
    sale = await create_sale(client, items=[item(30, limit=2)])
    first = await reserve(client, sale["id"], "alice", 1, key="k1")
    again = await reserve(client, sale["id"], "alice", 1, key="k1")
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["reservation_id"] == first.json()["reservation_id"]
    assert (await reserve(client, sale["id"], "alice", 1)).status_code == 201
    refused = await reserve(client, sale["id"], "alice", 1)
    assert (refused.status_code, refused.json()["error"]["code"]) == (409, "limit_exceeded")


@pytest.mark.xdist_group("heavy")
@pytest.mark.timeout(240)
async def test_a_crowd_on_a_sharded_item_buys_exactly_its_stock_within_the_limit_and_postgres_gets_it_all(
    settings: Settings, redis: Redis, keys: Keys, pg: asyncpg.Connection, worker: Persister
) -> None:
    rng = random.Random(11)
    stock, limit = 120, 2
    with procs.api(settings, workers=2) as url:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(base_url=url, headers=STORE, limits=limits, timeout=60) as c:
            sale = await create_sale(c, items=[item(stock, shards=3, limit=limit)])
            sid = sale["id"]
            gate = asyncio.Semaphore(100)
            answers: list[tuple[str, str, int, dict[str, Any]]] = []

            async def attempt(n: int) -> None:
                user, key = f"user-{rng.randrange(300)}", f"k-{n}"
                qty = rng.choice((1, 1, 2))
                async with gate:
                    sends = await asyncio.gather(
                        *(reserve(c, sid, user, qty, key) for _ in range(2 if n % 4 == 0 else 1))
                    )
                answers.extend((key, user, r.status_code, r.json()) for r in sends)

            await asyncio.gather(*(attempt(n) for n in range(400)))
            statuses = Counter(s for _, _, s, _ in answers)
            assert set(statuses) <= {200, 201, 409}, statuses
            by_key: dict[str, set[str]] = defaultdict(set)
            for key, _, status, body in answers:
                if status in (200, 201):
                    by_key[key].add(body["reservation_id"])
            assert all(len(rids) == 1 for rids in by_key.values())
            made = {body["reservation_id"]: body for _, _, s, body in answers if s == 201}
            assert sum(b["quantity"] for b in made.values()) == stock  # every unit, not one more
            per_user: Counter[str] = Counter()
            for b in made.values():
                per_user[b["user_id"]] += b["quantity"]
            assert max(per_user.values()) <= limit
            slots_used = {rid.split(".")[0] for rid in made}
            assert len(slots_used) == 3, slots_used
            got = (await c.get(f"/v1/sales/{sid}")).json()["items"][0]
            assert (got["available"], got["held"]) == (0, stock)
            numbers = await shard_numbers(redis, keys, await slots_of(redis, keys, sid))
            assert sum(n["available"] for n in numbers) == 0  # stranded: none
            assert all(
                n["available"] + n["held"] + n["confirmed"] + n["in_flight"] == n["stock_total"] for n in numbers
            )
            await drained(redis, keys, sid)
            rows = await pg.fetch("SELECT id, user_id, quantity FROM reservations WHERE sale_id = $1", sid)
            assert {r["id"] for r in rows} == set(made)
            report = await reconcile(redis, pg, keys, sid)
            assert report.differences == []


async def test_pause_and_resume_reach_every_shard_before_they_are_answered(
    client: httpx.AsyncClient, redis: Redis, keys: Keys
) -> None:
    sale = await create_sale(client, items=[item(30)])
    slots = await slots_of(redis, keys, sale["id"])
    one_each = [users_of(s, slots, 1)[0] for s in slots]
    assert (await client.post(f"/v1/sales/{sale['id']}/pause", headers=OPS)).status_code == 200
    refused = [(await reserve(client, sale["id"], u)).json()["error"]["code"] for u in one_each]
    assert refused == ["sale_paused"] * 3
    assert (await client.post(f"/v1/sales/{sale['id']}/resume", headers=OPS)).status_code == 200
    assert [(await reserve(client, sale["id"], u)).status_code for u in one_each] == [201] * 3


async def test_a_shard_whose_copy_of_the_state_fell_behind_is_brought_up_by_the_sweeper(
    client: httpx.AsyncClient, redis: Redis, keys: Keys, settings: Settings, scripts: Scripts
) -> None:
    sale = await create_sale(client, items=[item(30)])
    slots = await slots_of(redis, keys, sale["id"])
    await redis.hset(keys.sale(slots[2]), mapping={"state": "paused", "rev": 0})  # a sync a crash cut short
    user = users_of(slots[2], slots, 1)[0]
    assert (await reserve(client, sale["id"], user)).json()["error"]["code"] == "sale_paused"
    await sweep_once(redis, keys, scripts, 100)
    assert (await reserve(client, sale["id"], user)).status_code == 201


async def test_a_move_a_crash_cut_in_half_is_finished_by_the_sweeper_and_no_unit_is_made_or_lost(
    client: httpx.AsyncClient, redis: Redis, keys: Keys, settings: Settings, scripts: Scripts
) -> None:
    sale = await create_sale(client, items=[item(9)])
    slots = await slots_of(redis, keys, sale["id"])
    k = keys
    given = await scripts.shard_give(
        keys=[k.item(slots[0], "phone"), k.moves(slots[0])], args=["m1", "phone", slots[1], 2]
    )
    assert given == 2  # ... and the process died before the taking shard heard of it
    await redis.hset(k.moves(slots[0]), "m1", f"phone|{slots[1]}|2|{0}")  # long ago
    got = (await client.get(f"/v1/sales/{sale['id']}")).json()["items"][0]
    assert got["available"] == 9  # the units in flight are still the item's
    await sweep_once(redis, keys, scripts, 100)
    numbers = await shard_numbers(redis, keys, slots)
    assert [n["stock_total"] for n in numbers] == [1, 5, 3]
    assert [n["available"] for n in numbers] == [1, 5, 3]
    assert all(n["in_flight"] == 0 for n in numbers)
    assert await redis.hlen(k.moves(slots[0])) == 0
    await sweep_once(redis, keys, scripts, 100)  # finishing it again changes nothing
    assert [n["stock_total"] for n in await shard_numbers(redis, keys, slots)] == [1, 5, 3]
    assert MOVE_REPAIR_MS > 0


async def test_holds_in_every_shard_expire_and_their_units_sell_again(
    client: httpx.AsyncClient, redis: Redis, keys: Keys, settings: Settings, scripts: Scripts
) -> None:
    # Two seconds: on a busy machine the four calls below can take more than one.
    sale = await create_sale(client, hold_seconds=2, items=[item(3, limit=1)])
    slots = await slots_of(redis, keys, sale["id"])
    for s in slots:
        assert (await reserve(client, sale["id"], users_of(s, slots, 1)[0])).status_code == 201
    assert (await reserve(client, sale["id"], users_of(slots[0], slots, 2)[1])).json()["error"]["code"] == "sold_out"
    await asyncio.sleep(2.1)
    await sweep_once(redis, keys, scripts, 100)
    got = (await client.get(f"/v1/sales/{sale['id']}")).json()["items"][0]
    assert (got["available"], got["held"]) == (3, 0)
    assert (await reserve(client, sale["id"], users_of(slots[0], slots, 2)[1])).status_code == 201


async def test_a_reservation_in_an_extra_shard_is_read_confirmed_cancelled_and_listed_as_any_other(
    client: httpx.AsyncClient, redis: Redis, keys: Keys
) -> None:
    sale = await create_sale(
        client, items=[item(30, limit=3), {"sku": "case", "name": "Case", "price_cents": 5, "stock": 5}]
    )
    slots = await slots_of(redis, keys, sale["id"])
    user = users_of(slots[2], slots, 1)[0]
    a = (await reserve(client, sale["id"], user)).json()
    b = (await reserve(client, sale["id"], user)).json()
    case = await client.post(f"/v1/sales/{sale['id']}/reservations", json={"user_id": user, "sku": "case"})
    assert a["reservation_id"].startswith(slots[2] + ".")
    rid = a["reservation_id"]
    assert (await client.get(f"/v1/reservations/{rid}", params={"user_id": user})).json()["status"] == "held"
    done = await client.post(f"/v1/reservations/{rid}/confirm", json={"user_id": user, "payment_ref": "p1"})
    assert done.json()["status"] == "confirmed"
    gone = await client.post(f"/v1/reservations/{b['reservation_id']}/cancel", json={"user_id": user})
    assert gone.json()["status"] == "released"
    mine = await client.get(f"/v1/sales/{sale['id']}/reservations", params={"user_id": user})
    assert [r["reservation_id"] for r in mine.json()["reservations"]] == [
        case.json()["reservation_id"],
        b["reservation_id"],
        rid,
    ]
    got = (await client.get(f"/v1/sales/{sale['id']}")).json()["items"][0]
    assert (got["available"], got["held"]) == (29, 0)


async def test_a_sharded_sale_keeps_its_items_and_shards_are_set_only_at_creation(client: httpx.AsyncClient) -> None:
    sharded = await create_sale(
        client, starts_at="2999-01-01T00:00:00Z", ends_at="2999-01-02T00:00:00Z", items=[item(30)]
    )
    r = await client.patch(f"/v1/sales/{sharded['id']}", json={"items": [item(40, shards=1)]}, headers=OPS)
    assert (r.status_code, r.json()["error"]["code"]) == (409, "invalid_state")
    plain = await create_sale(client, starts_at="2999-01-01T00:00:00Z", ends_at="2999-01-02T00:00:00Z")
    r = await client.patch(f"/v1/sales/{plain['id']}", json={"items": [item(40)]}, headers=OPS)
    assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_request")
    moved = await client.patch(f"/v1/sales/{sharded['id']}", json={"name": "Renamed"}, headers=OPS)
    assert moved.status_code == 200


async def test_restock_of_a_sharded_item_reaches_users_of_every_shard(
    client: httpx.AsyncClient, redis: Redis, keys: Keys
) -> None:
    sale = await create_sale(client, items=[item(3, limit=5)])
    slots = await slots_of(redis, keys, sale["id"])
    user = users_of(slots[2], slots, 1)[0]
    assert (await reserve(client, sale["id"], user, 3)).status_code == 201
    assert (await reserve(client, sale["id"], user)).json()["error"]["code"] == "sold_out"
    r = await client.post(f"/v1/sales/{sale['id']}/items/phone/restock", json={"quantity": 2}, headers=OPS)
    assert r.json()["stock_total"] == 5
    assert (await reserve(client, sale["id"], user, 2)).status_code == 201


async def test_the_audit_finds_a_unit_made_in_one_shard(
    client: httpx.AsyncClient, redis: Redis, keys: Keys, worker: Persister
) -> None:
    sale = await create_sale(client, items=[item(9)])
    slots = await slots_of(redis, keys, sale["id"])
    auditor = Auditor(redis, worker.pool, keys)
    assert await auditor.audit(sale["id"]) == []
    await redis.hincrby(keys.item(slots[1], "phone"), "available", 1)
    found = await auditor.audit(sale["id"])
    assert len(found) == 1 and "phone" in found[0] and "+1" in found[0]
    progress = (await client.get(f"/v1/sales/{sale['id']}/progress", headers=OPS)).json()
    assert progress["items"][0]["drift"] == 1


async def test_recover_puts_a_lost_sharded_sale_back_with_holds_limits_and_keys_in_their_shards(
    client: httpx.AsyncClient,
    redis: Redis,
    keys: Keys,
    settings: Settings,
    scripts: Scripts,
    pg: asyncpg.Connection,
    worker: Persister,
) -> None:
    sale = await create_sale(client, items=[item(12, limit=2)])
    sid = sale["id"]
    slots = await slots_of(redis, keys, sid)
    users = [users_of(s, slots, 2) for s in slots]
    made = {}
    for group in users:
        for u in group:
            made[u] = (await reserve(client, sid, u, 2, key=f"key-{u}")).json()
    await drained(redis, keys, sid)
    for slot in slots:
        await forget_sale(redis, keys, slot)
    report = await recover(redis, pg, keys, scripts, sid)
    assert report.sale_reloaded and report.outcomes["added"] == 6 and not report.problems and not report.oversold
    got = (await client.get(f"/v1/sales/{sid}")).json()
    assert (got["status"], got["items"][0]["available"], got["items"][0]["held"]) == ("live", 0, 12)
    for u, first in made.items():
        again = await reserve(client, sid, u, 2, key=f"key-{u}")
        assert (again.status_code, again.json()["reservation_id"]) == (200, first["reservation_id"])
        assert (await reserve(client, sid, u, 1)).json()["error"]["code"] in ("limit_exceeded", "sold_out")
    cancelled = await client.post(
        f"/v1/reservations/{made[users[2][0]]['reservation_id']}/cancel", json={"user_id": users[2][0]}
    )
    assert cancelled.status_code == 200
    assert (await reserve(client, sid, users[0][0], 1)).json()["error"]["code"] == "limit_exceeded"
    numbers = await shard_numbers(redis, keys, slots)
    assert all(n["available"] + n["held"] + n["confirmed"] + n["in_flight"] == n["stock_total"] for n in numbers)
    await drained(redis, keys, sid)
    assert (await reconcile(redis, pg, keys, sid)).differences == []


async def test_recover_makes_a_lost_shard_again_with_its_holds_while_the_other_shards_keep_theirs(
    client: httpx.AsyncClient,
    redis: Redis,
    keys: Keys,
    settings: Settings,
    scripts: Scripts,
    pg: asyncpg.Connection,
    worker: Persister,
) -> None:
    sale = await create_sale(client, items=[item(12, limit=2)])
    sid = sale["id"]
    slots = await slots_of(redis, keys, sid)
    lost_users = users_of(slots[2], slots, 3)
    made = {
        u: (await reserve(client, sid, u, 2, key=f"key-{u}")).json()
        for u in [*lost_users, *users_of(slots[1], slots, 1)]
    }
    await drained(redis, keys, sid)
    await forget_sale(redis, keys, slots[2])  # its master came back empty
    report = await recover(redis, pg, keys, scripts, sid)
    assert report.slots_remade == [slots[2]] and not report.sale_reloaded and not report.problems
    assert report.outcomes["added"] == 3 and report.outcomes["kept"] == 1 and not report.oversold
    got = (await client.get(f"/v1/sales/{sid}")).json()
    assert (got["status"], got["items"][0]["available"], got["items"][0]["held"]) == ("live", 4, 8)
    again = await reserve(client, sid, lost_users[0], 2, key=f"key-{lost_users[0]}")
    assert again.json()["reservation_id"] == made[lost_users[0]]["reservation_id"]
    assert (await reserve(client, sid, lost_users[1], 1)).json()["error"]["code"] == "limit_exceeded"
    numbers = await shard_numbers(redis, keys, slots)
    assert all(n["available"] + n["held"] + n["confirmed"] + n["in_flight"] == n["stock_total"] for n in numbers)
    assert sum(n["stock_total"] for n in numbers) == 12
    await drained(redis, keys, sid)
    assert (await reconcile(redis, pg, keys, sid)).differences == []


async def test_recover_evens_out_the_shards_before_it_lets_the_sale_sell_so_nothing_is_sold_twice(
    client: httpx.AsyncClient,
    redis: Redis,
    keys: Keys,
    settings: Settings,
    scripts: Scripts,
    pg: asyncpg.Connection,
    worker: Persister,
) -> None:
    sale = await create_sale(client, items=[item(10, shards=2, limit=1)])
    sid = sale["id"]
    slots = await slots_of(redis, keys, sid)
    for u in users_of(slots[0], slots, 8):  # most holds in one shard: units moved there first
        assert (await reserve(client, sid, u)).status_code == 201
    await drained(redis, keys, sid)
    for slot in slots:
        await forget_sale(redis, keys, slot)
    report = await recover(redis, pg, keys, scripts, sid)
    assert not report.oversold and not report.problems
    numbers = await shard_numbers(redis, keys, slots)
    assert all(n["available"] >= 0 for n in numbers), numbers
    late = [(await reserve(client, sid, u)).status_code for u in users_of(slots[1], slots, 5)]
    assert late.count(201) == 2  # 10 units, 8 held
    got = (await client.get(f"/v1/sales/{sid}")).json()["items"][0]
    assert (got["available"], got["held"]) == (0, 10)


async def test_one_idempotency_key_for_two_items_of_a_sharded_sale_is_a_conflict_whichever_comes_first(
    client: httpx.AsyncClient, redis: Redis, keys: Keys, pg: asyncpg.Connection, worker: Persister
) -> None:
    case = {"sku": "case", "name": "Case", "price_cents": 5, "stock": 5, "per_user_limit": 5}
    sale = await create_sale(client, items=[item(30, limit=3), case])
    sid = sale["id"]
    slots = await slots_of(redis, keys, sid)
    for n, user in enumerate(users_of(slots[1], slots, 2)):
        first, second = ("phone", "case") if n == 0 else ("case", "phone")
        body = {"user_id": user, "quantity": 1}
        a = await client.post(
            f"/v1/sales/{sid}/reservations", json=body | {"sku": first}, headers={"Idempotency-Key": "k"}
        )
        b = await client.post(
            f"/v1/sales/{sid}/reservations", json=body | {"sku": second}, headers={"Idempotency-Key": "k"}
        )
        assert a.status_code == 201 and (b.status_code, b.json()["error"]["code"]) == (422, "idempotency_conflict")
        again = await client.post(
            f"/v1/sales/{sid}/reservations", json=body | {"sku": first}, headers={"Idempotency-Key": "k"}
        )
        assert (again.status_code, again.json()["reservation_id"]) == (200, a.json()["reservation_id"])
    await drained(redis, keys, sid)
    assert (await reconcile(redis, pg, keys, sid)).differences == []


async def test_a_refused_attempt_on_a_sharded_item_leaves_its_key_free_for_another_body(
    client: httpx.AsyncClient, redis: Redis, keys: Keys
) -> None:
    sale = await create_sale(client, items=[item(2, limit=5)])
    refused = await reserve(client, sale["id"], "alice", 3, key="k")
    assert refused.json()["error"]["code"] == "sold_out"
    assert (await reserve(client, sale["id"], "alice", 2, key="k")).status_code == 201


async def test_a_lost_extra_slot_does_not_stop_the_persister_for_any_other_sale(
    client: httpx.AsyncClient, redis: Redis, keys: Keys, pg: asyncpg.Connection, worker: Persister
) -> None:
    sharded = await create_sale(client, items=[item(9)])
    slots = await slots_of(redis, keys, sharded["id"])
    await asyncio.sleep(1.2)  # the persister has listed the sharded sale's streams
    await forget_sale(redis, keys, slots[2])
    other = await create_sale(client)
    made = (await reserve(client, other["id"], "alice")).json()
    await drained(redis, keys, other["id"])
    assert await pg.fetchval("SELECT count(*) FROM reservations WHERE id = $1", made["reservation_id"]) == 1


async def test_a_move_into_a_lost_slot_waits_for_recover_which_makes_the_slot_again_and_counts_it(
    client: httpx.AsyncClient,
    redis: Redis,
    keys: Keys,
    settings: Settings,
    scripts: Scripts,
    pg: asyncpg.Connection,
    worker: Persister,
) -> None:
    sale = await create_sale(client, items=[item(9)])
    sid = sale["id"]
    slots = await slots_of(redis, keys, sid)
    await scripts.shard_give(
        keys=[keys.item(slots[0], "phone"), keys.moves(slots[0])], args=["m1", "phone", slots[2], 2]
    )
    await redis.hset(keys.moves(slots[0]), "m1", f"phone|{slots[2]}|2|0")
    await forget_sale(redis, keys, slots[2])
    await sweep_once(redis, keys, scripts, 100)  # the repair cannot finish it: the slot is gone
    assert [k async for k in redis.scan_iter(match=keys.sale_pattern(slots[2]))] == []
    await drained(redis, keys, sid)
    report = await recover(redis, pg, keys, scripts, sid)
    assert report.slots_remade == [slots[2]] and not report.problems, report.table()
    await sweep_once(redis, keys, scripts, 100)  # now it can
    numbers = await shard_numbers(redis, keys, slots)
    assert sum(n["stock_total"] for n in numbers) == 9 and all(n["in_flight"] == 0 for n in numbers)
    assert (await client.get(f"/v1/sales/{sid}")).json()["status"] == "live"


async def test_each_attempt_on_a_sharded_item_is_counted_once(
    client: httpx.AsyncClient, redis: Redis, keys: Keys
) -> None:
    sale = await create_sale(client, items=[item(3, limit=5)])
    slots = await slots_of(redis, keys, sale["id"])
    user = users_of(slots[1], slots, 1)[0]
    assert (await reserve(client, sale["id"], user, 2)).status_code == 201  # units moved in: still one attempt
    assert (await reserve(client, sale["id"], user, 2)).json()["error"]["code"] == "sold_out"
    progress = (await client.get(f"/v1/sales/{sale['id']}/progress", headers=OPS)).json()
    phone = progress["items"][0]
    assert (phone["attempts"], phone["reservations"], phone["rejected"]) == (2, 1, {"sold_out": 1})


async def test_a_sharded_create_that_crashed_half_way_leaves_the_id_free_for_another_body(
    client: httpx.AsyncClient, redis: Redis, keys: Keys, settings: Settings, scripts: Scripts
) -> None:
    sid = "half-made"
    await scripts.shard_create(  # the first slot of a create that died before the sale's own keys
        keys=[keys.sale(f"{sid}~1"), keys.events(f"{sid}~1"), keys.item(f"{sid}~1", "phone")],
        args=[sid, 0, 1, 1000, "active", "persister", "{}", 0, "phone", 5, 1, 0, 0],
    )
    sale = await create_sale(client, sale_id=sid, items=[item(30)])
    assert sale["items"][0]["stock_total"] == 30
    slots = await slots_of(redis, keys, sid)
    assert sum(n["stock_total"] for n in await shard_numbers(redis, keys, slots)) == 30
