"""Client budgets (contract, "Crowd control"): units per client ip and device, checked in the
reserve script with the per-user limit, exact under concurrency; attempts per ip a second."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis

from flashsale import budgets, shards
from flashsale.keys import Keys
from flashsale.persister import Persister
from flashsale.recover import recover
from flashsale.reservations import fingerprint, new_rid, reserve_keys
from flashsale.sales import now_ms
from flashsale.scripts import Scripts
from flashsale.sweeper import sweep_once

from .conftest import create_sale, drained
from .test_recover import forget_sale


def phone(stock: int = 100, **limits: Any) -> list[dict[str, Any]]:
    return [{"sku": "phone", "name": "Phone", "price_cents": 1, "stock": stock, "per_user_limit": 1, **limits}]


async def reserve(c: httpx.AsyncClient, sale: str, user: str, **client: str) -> httpx.Response:
    body: dict[str, Any] = {"user_id": user, "sku": "phone"}
    if client:
        body["client"] = client
    return await c.post(f"/v1/sales/{sale}/reservations", json=body)


async def test_150_accounts_behind_3_addresses_hold_at_most_3_times_the_per_ip_limit(client: httpx.AsyncClient) -> None:
    sale = (await create_sale(client, items=phone(per_ip_limit=4)))["id"]
    addresses = ["203.0.113.7", "198.51.100.23", "2001:db8:aa:1::5"]
    gate = asyncio.Semaphore(100)  # in flight at once: as many as the client's pool holds

    async def bot(n: int) -> httpx.Response:
        async with gate:
            return await reserve(client, sale, f"bot{n}", ip=addresses[n % 3])

    answers = await asyncio.gather(*(bot(n) for n in range(150)))
    won = [r for r in answers if r.status_code == 201]
    assert len(won) == 12
    refused = {r.json()["error"]["code"] for r in answers if r.status_code != 201}
    assert refused == {"limit_exceeded"}
    assert (await reserve(client, sale, "someone", ip="192.0.2.1")).status_code == 201  # another client is not held up


async def test_addresses_inside_one_ipv6_64_and_an_ipv4_mapped_address_count_as_one_client(
    client: httpx.AsyncClient,
) -> None:
    sale = (await create_sale(client, items=phone(per_ip_limit=2)))["id"]
    assert (await reserve(client, sale, "a", ip="2001:db8:1:2::1")).status_code == 201
    assert (await reserve(client, sale, "b", ip="2001:db8:1:2:ffff:1:2:3")).status_code == 201
    third = await reserve(client, sale, "c", ip="2001:0db8:0001:0002::9")
    assert (third.status_code, third.json()["error"]["code"]) == (409, "limit_exceeded")
    assert (await reserve(client, sale, "d", ip="2001:db8:1:3::1")).status_code == 201  # the next /64
    assert (await reserve(client, sale, "e", ip="198.51.100.9")).status_code == 201
    assert (await reserve(client, sale, "f", ip="::ffff:198.51.100.9")).status_code == 201
    mapped = await reserve(client, sale, "g", ip="::ffff:198.51.100.9")
    assert mapped.json()["error"] == {
        "code": "limit_exceeded",
        "message": "this would take the user past the item's per-user limit",
        "available": 0,
    }


async def test_the_per_device_limit_is_exact_under_concurrency(client: httpx.AsyncClient) -> None:
    sale = (await create_sale(client, items=phone(per_device_limit=3)))["id"]
    answers = await asyncio.gather(*(reserve(client, sale, f"u{n}", device="phone-7f3a") for n in range(60)))
    assert sum(r.status_code == 201 for r in answers) == 3


async def test_units_back_from_a_cancel_or_an_expiry_are_back_in_the_clients_budget(
    client: httpx.AsyncClient, redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    sale = (await create_sale(client, hold_seconds=1, items=phone(per_ip_limit=1)))["id"]
    first = (await reserve(client, sale, "a", ip="192.0.2.4")).json()
    assert (await reserve(client, sale, "b", ip="192.0.2.4")).status_code == 409
    cancel = await client.post(f"/v1/reservations/{first['reservation_id']}/cancel", json={"user_id": "a"})
    assert cancel.status_code == 200
    assert (await reserve(client, sale, "b", ip="192.0.2.4")).status_code == 201
    await asyncio.sleep(1.1)
    await sweep_once(redis, keys, scripts, 100)
    assert (await reserve(client, sale, "c", ip="192.0.2.4")).status_code == 201
    assert await redis.hget(keys.ips(sale, "phone"), "192.0.2.4") == "1"


async def test_attempts_per_client_ip_a_second_past_ip_rate_per_s_are_429(client: httpx.AsyncClient) -> None:
    sale = (await create_sale(client, ip_rate_per_s=5, items=phone()))["id"]
    answers = [await reserve(client, sale, f"u{n}", ip="192.0.2.8") for n in range(8)]
    assert [r.status_code for r in answers].count(201) == 5
    limited = answers[-1]
    assert (limited.status_code, limited.json()["error"]["code"]) == (429, "rate_limited")
    assert limited.headers["retry-after"] == "1"
    assert (await reserve(client, sale, "other", ip="192.0.2.9")).status_code == 201


async def test_a_malformed_client_is_a_clear_422_that_changes_nothing(client: httpx.AsyncClient) -> None:
    sale = (await create_sale(client, items=phone(per_ip_limit=1)))["id"]
    for bad in ({"ip": "300.1.1.1"}, {"ip": "not an ip"}, {"ip": "1.2.3.4", "extra": "x"}, {"device": ""}):
        r = await client.post(f"/v1/sales/{sale}/reservations", json={"user_id": "a", "sku": "phone", "client": bad})
        assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_request"), bad
    got = (await client.get(f"/v1/sales/{sale}")).json()["items"][0]
    assert got["held"] == 0


async def test_150_accounts_behind_3_addresses_hold_at_most_3_times_the_per_ip_limit_across_a_sharded_item(
    client: httpx.AsyncClient, redis: Redis, keys: Keys
) -> None:
    sale = (await create_sale(client, items=phone(shards=3, per_ip_limit=4)))["id"]
    addresses = ["203.0.113.7", "198.51.100.23", "2001:db8:aa:1::5"]
    gate = asyncio.Semaphore(100)

    async def bot(n: int) -> httpx.Response:
        async with gate:
            return await reserve(client, sale, f"bot{n}", ip=addresses[n % 3])

    answers = await asyncio.gather(*(bot(n) for n in range(150)))
    won = [r.json() for r in answers if r.status_code == 201]
    assert len(won) == 12
    assert {r.json()["error"]["code"] for r in answers if r.status_code != 201} == {"limit_exceeded"}
    assert len({r["reservation_id"].split(".")[0] for r in won}) > 1  # the holds are in several shards
    slots = await shard_slots(redis, keys, sale)
    for ip in ("203.0.113.7", "198.51.100.23", "2001:db8:aa:1::/64"):  # each counted in one shard, exactly
        assert [int(await redis.hget(keys.ips(s, "phone"), ip) or 0) for s in slots].count(4) == 1


async def test_the_per_device_limit_of_a_sharded_item_is_exact_under_concurrency(client: httpx.AsyncClient) -> None:
    sale = (await create_sale(client, items=phone(shards=3, per_device_limit=3)))["id"]
    answers = await asyncio.gather(*(reserve(client, sale, f"u{n}", device="phone-7f3a") for n in range(60)))
    assert sum(r.status_code == 201 for r in answers) == 3


async def test_ip_rate_per_s_counts_an_address_once_over_the_shards_of_an_item(client: httpx.AsyncClient) -> None:
    sale = (await create_sale(client, ip_rate_per_s=5, items=phone(shards=3)))["id"]
    answers = [await reserve(client, sale, f"u{n}", ip="192.0.2.8") for n in range(8)]
    assert [r.status_code for r in answers] == [201] * 5 + [429] * 3


async def test_a_refused_hold_on_a_shard_gives_the_clients_charge_back(
    client: httpx.AsyncClient, redis: Redis, keys: Keys
) -> None:
    sale = (await create_sale(client, items=phone(shards=3, per_ip_limit=2)))["id"]
    slots = await shard_slots(redis, keys, sale)
    counted = budgets.places(slots, "192.0.2.4", "")
    user = next(u for u in (f"u{n}" for n in range(100)) if shards.home(slots, u) not in counted)
    assert (await reserve(client, sale, user, ip="192.0.2.4")).status_code == 201
    again = await reserve(client, sale, user, ip="192.0.2.4")  # past the per-user limit, in the user's shard
    assert (again.status_code, again.json()["error"]["code"]) == (409, "limit_exceeded")
    assert await redis.hget(keys.ips(next(iter(counted)), "phone"), "192.0.2.4") == "1"
    assert (await reserve(client, sale, "another", ip="192.0.2.4")).status_code == 201


async def test_a_cancel_or_an_expiry_on_a_shard_gives_the_clients_budget_back(
    client: httpx.AsyncClient, redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    sale = (await create_sale(client, hold_seconds=1, items=phone(shards=3, per_ip_limit=1)))["id"]
    slots = await shard_slots(redis, keys, sale)
    counted = next(iter(budgets.places(slots, "192.0.2.4", "")))
    users = (u for u in (f"u{n}" for n in range(1000)) if shards.home(slots, u) != counted)
    first = (await reserve(client, sale, next(users), ip="192.0.2.4")).json()
    assert (await reserve(client, sale, next(users), ip="192.0.2.4")).status_code == 409
    cancel = await client.post(f"/v1/reservations/{first['reservation_id']}/cancel", json={"user_id": first["user_id"]})
    assert cancel.status_code == 200
    assert (await reserve(client, sale, next(users), ip="192.0.2.4")).status_code == 201  # at once
    await asyncio.sleep(1.1)
    await sweep_once(redis, keys, scripts, 100)
    assert (await reserve(client, sale, next(users), ip="192.0.2.4")).status_code == 201
    assert await redis.hget(keys.ips(counted, "phone"), "192.0.2.4") == "1"


async def test_a_charge_whose_hold_never_came_is_given_back_and_its_hold_can_never_be_made(
    client: httpx.AsyncClient, redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    sale, slots, counted, user, rid, owed = await charged(client, redis, keys, scripts)  # ... and the API dies
    assert (await reserve(client, sale, "other", ip="192.0.2.4")).status_code == 409
    assert await owed.repair(counted, "phone", now_ms() - budgets.PENDING_MS) == 0  # not yet overdue
    assert await owed.repair(counted, "phone", now_ms() + 1) == 1
    late = await hold(scripts, keys, shards.home(slots, user), rid, user)
    assert late[0] == "replay"
    got = (await client.get(f"/v1/sales/{sale}")).json()["items"][0]
    assert got["held"] == 0
    assert (await reserve(client, sale, "other", ip="192.0.2.4")).status_code == 201


async def test_a_charge_whose_hold_was_made_but_not_reported_is_kept(
    client: httpx.AsyncClient, redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    sale, slots, counted, user, rid, owed = await charged(client, redis, keys, scripts)
    assert (await hold(scripts, keys, shards.home(slots, user), rid, user))[0] == "ok"  # ... and then it dies
    assert await owed.repair(counted, "phone", now_ms() + 1) == 0
    assert await redis.zcard(keys.pending(counted, "phone")) == 0
    assert (await reserve(client, sale, "other", ip="192.0.2.4")).status_code == 409
    cancel = await client.post(f"/v1/reservations/{rid}/cancel", json={"user_id": user})
    assert cancel.status_code == 200
    assert (await reserve(client, sale, "other", ip="192.0.2.4")).status_code == 201


@pytest.mark.parametrize("home", ["an extra slot", "the sale's own slot"])
async def test_a_retry_of_a_charged_reserve_with_its_key_replays_it_once_the_budget_is_used_up(
    client: httpx.AsyncClient, redis: Redis, keys: Keys, home: str
) -> None:
    sale = (await create_sale(client, items=phone(shards=3, per_ip_limit=1)))["id"]
    slots = await shard_slots(redis, keys, sale)
    ip = next(f"192.0.2.{n}" for n in range(1, 250) if next(iter(budgets.places(slots, f"192.0.2.{n}", ""))) != sale)
    counted = next(iter(budgets.places(slots, ip, "")))  # an extra slot: the user's may be the other, or the sale's
    wanted = [s for s in slots if s != counted and (s == sale) == (home == "the sale's own slot")]
    user = next(u for u in (f"u{n}" for n in range(1000)) if shards.home(slots, u) in wanted)
    first = await reserve_with_key(client, sale, user, "k1", ip=ip)
    retry = await reserve_with_key(client, sale, user, "k1", ip=ip)
    assert (first.status_code, retry.status_code) == (201, 200), retry.text
    assert retry.json()["reservation_id"] == first.json()["reservation_id"]


async def test_concurrent_requests_with_one_key_on_a_charged_item_all_get_the_one_hold(
    client: httpx.AsyncClient, redis: Redis, keys: Keys
) -> None:
    sale = (await create_sale(client, items=phone(shards=3, per_ip_limit=1)))["id"]
    slots = await shard_slots(redis, keys, sale)
    counted = next(iter(budgets.places(slots, "192.0.2.4", "")))
    user = next(u for u in (f"u{n}" for n in range(1000)) if shards.home(slots, u) not in (counted, sale))
    answers = await asyncio.gather(*(reserve_with_key(client, sale, user, "same", ip="192.0.2.4") for _ in range(10)))
    assert sorted(r.status_code for r in answers) == [200] * 9 + [201]
    assert len({r.json()["reservation_id"] for r in answers}) == 1


async def test_a_budget_refusal_on_a_sharded_item_counts_one_attempt_and_one_rejection(
    client: httpx.AsyncClient, redis: Redis, keys: Keys
) -> None:
    sale = (await create_sale(client, items=phone(shards=3, per_ip_limit=1)))["id"]
    slots = await shard_slots(redis, keys, sale)
    counted = next(iter(budgets.places(slots, "192.0.2.4", "")))
    a, b = [u for u in (f"u{n}" for n in range(1000)) if shards.home(slots, u) != counted][:2]
    assert (await reserve(client, sale, a, ip="192.0.2.4")).status_code == 201
    assert (await reserve(client, sale, b, ip="192.0.2.4")).status_code == 409
    await asyncio.sleep(1.2)  # counts answered from memory reach Redis within a second (tally.py)
    counts = [await redis.hmget(keys.item(s, "phone"), ["attempts", "rej:limit_exceeded"]) for s in slots]
    assert [sum(int(c[i] or 0) for c in counts) for i in (0, 1)] == [2, 1]


async def test_ip_rate_per_s_is_the_sales_whichever_items_an_address_asks_for(
    client: httpx.AsyncClient, redis: Redis, keys: Keys
) -> None:
    items = [*phone(shards=3), {**phone()[0], "sku": "case", "name": "Case"}]
    sale = (await create_sale(client, ip_rate_per_s=5, items=items))["id"]
    slots = await shard_slots(redis, keys, sale)
    ip = next(f"192.0.2.{n}" for n in range(1, 250) if next(iter(budgets.places(slots, f"192.0.2.{n}", ""))) != sale)
    codes = [(await reserve(client, sale, f"p{n}", ip=ip)).status_code for n in range(3)]
    for n in range(4):
        body = {"user_id": f"c{n}", "sku": "case", "client": {"ip": ip}}
        codes.append((await client.post(f"/v1/sales/{sale}/reservations", json=body)).status_code)
    assert codes == [201] * 5 + [429] * 2


async def reserve_with_key(c: httpx.AsyncClient, sale: str, user: str, key: str, **client: str) -> httpx.Response:
    body = {"user_id": user, "sku": "phone", "client": client}
    return await c.post(f"/v1/sales/{sale}/reservations", json=body, headers={"Idempotency-Key": key})


async def charged(
    client: httpx.AsyncClient, redis: Redis, keys: Keys, scripts: Scripts
) -> tuple[str, list[str], str, str, str, budgets.Budgets]:
    """A sharded item with per_ip_limit 1, and a charge for one unit of 192.0.2.4 taken for a hold
    of a user in another shard, as the API takes it before the hold: (sale, slots, the slot that
    counts the address, user, the hold's id, the Budgets)."""
    sale = (await create_sale(client, items=phone(shards=3, per_ip_limit=1)))["id"]
    slots = await shard_slots(redis, keys, sale)
    where = budgets.places(slots, "192.0.2.4", "")
    counted = next(iter(where))
    user = next(u for u in (f"u{n}" for n in range(100)) if shards.home(slots, u) != counted)
    rid = new_rid(shards.home(slots, user))
    owed = budgets.Budgets(redis, keys, scripts)
    assert await owed.charge(where, "phone", rid, 1) is None
    return sale, slots, counted, user, rid, owed


async def shard_slots(redis: Redis, keys: Keys, sale_id: str) -> list[str]:
    return [sale_id, *cast(str, await redis.hget(keys.sale(sale_id), "slots")).split(",")]


async def hold(scripts: Scripts, keys: Keys, slot: str, rid: str, user: str) -> Any:
    """lua/reserve.lua for ``rid`` in ``slot``, its client charged elsewhere: what the API's next step is."""
    return await scripts.reserve(
        keys=reserve_keys(keys, slot, rid, user, "phone", "", "192.0.2.4"),
        args=[rid, user, "phone", 1, fingerprint("phone", 1), "", 0, "shard", "192.0.2.4", "", "1"],
    )


async def test_recover_of_a_lost_sale_counts_each_clients_units_again(
    client: httpx.AsyncClient, redis: Redis, keys: Keys, scripts: Scripts, pg: asyncpg.Connection, worker: Persister
) -> None:
    sale = (await create_sale(client, items=phone(per_ip_limit=2, per_device_limit=5)))["id"]
    for user in ("a", "b"):
        assert (await reserve(client, sale, user, ip="192.0.2.4", device="d1")).status_code == 201
    await drained(redis, keys, sale)
    await forget_sale(redis, keys, sale)
    report = await recover(redis, pg, keys, scripts, sale)
    assert report.outcomes["added"] == 2 and not report.problems
    assert (await reserve(client, sale, "c", ip="192.0.2.4")).status_code == 409  # both units still counted
    assert await redis.hget(keys.devices(sale, "phone"), "d1") == "2"


async def test_recover_of_a_lost_shard_gives_back_the_budget_of_its_holds_charged_elsewhere(
    client: httpx.AsyncClient, redis: Redis, keys: Keys, scripts: Scripts, pg: asyncpg.Connection, worker: Persister
) -> None:
    sale = (await create_sale(client, items=phone(shards=3, per_ip_limit=1)))["id"]
    slots = await shard_slots(redis, keys, sale)
    counted = next(iter(budgets.places(slots, "192.0.2.4", "")))
    lost = next(s for s in slots[1:] if s != counted)
    user = next(u for u in (f"u{n}" for n in range(1000)) if shards.home(slots, u) == lost)
    made = (await reserve(client, sale, user, ip="192.0.2.4")).json()
    await drained(redis, keys, sale)
    await forget_sale(redis, keys, lost)
    report = await recover(redis, pg, keys, scripts, sale)
    assert report.slots_remade == [lost] and not report.problems
    cancel = await client.post(f"/v1/reservations/{made['reservation_id']}/cancel", json={"user_id": user})
    assert cancel.status_code == 200
    other = next(u for u in (f"v{n}" for n in range(1000)) if shards.home(slots, u) != counted)
    assert (await reserve(client, sale, other, ip="192.0.2.4")).status_code == 201  # its charge came back


async def test_recover_of_the_shard_that_counts_a_client_counts_its_holds_in_the_others_again(
    client: httpx.AsyncClient, redis: Redis, keys: Keys, scripts: Scripts, pg: asyncpg.Connection, worker: Persister
) -> None:
    sale = (await create_sale(client, items=phone(shards=3, per_ip_limit=1)))["id"]
    slots = await shard_slots(redis, keys, sale)
    ip = next(f"192.0.2.{n}" for n in range(1, 250) if next(iter(budgets.places(slots, f"192.0.2.{n}", ""))) != sale)
    counted = next(iter(budgets.places(slots, ip, "")))
    user = next(u for u in (f"u{n}" for n in range(1000)) if shards.home(slots, u) not in (counted,))
    assert (await reserve(client, sale, user, ip=ip)).status_code == 201
    await drained(redis, keys, sale)
    await forget_sale(redis, keys, counted)  # the shard that counted the address: its charge is gone
    report = await recover(redis, pg, keys, scripts, sale)
    assert report.slots_remade == [counted] and not report.problems
    again = next(u for u in (f"v{n}" for n in range(1000)) if shards.home(slots, u) != counted)
    assert (await reserve(client, sale, again, ip=ip)).status_code == 409  # the address has its one unit
