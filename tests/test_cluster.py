"""The service on a real Redis Cluster: three Valkey masters on loopback, started by the tests.

With ``REDIS_URL`` naming one node, the service finds out it is a cluster and routes every call by
its keys' slot; a sale's keys share one hash tag, so each script touches one slot of one master.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
import signal
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from redis.asyncio import RedisCluster

from flashsale import connection
from flashsale.embedded import EmbeddedCluster
from flashsale.keys import Keys
from flashsale.persister import Persister
from flashsale.reconcile import reconcile
from flashsale.recover import recover
from flashsale.scripts import Scripts
from flashsale.settings import Settings

from . import procs
from .conftest import OPS, STORE, create_sale, drained, persisting, serving
from .test_dev import run_readme_block, start_dev
from .test_faults import crowd, slow_inserts

pytestmark = [pytest.mark.timeout(120), pytest.mark.xdist_group("cluster")]


@pytest.fixture(scope="module")
def cluster() -> Iterator[EmbeddedCluster]:
    c = EmbeddedCluster(masters=3).start()
    yield c
    c.stop()


@pytest.fixture
def on_cluster(settings: Settings, cluster: EmbeddedCluster) -> Settings:
    return dataclasses.replace(settings, redis_url=cluster.url)


@pytest.fixture
async def cluster_redis(on_cluster: Settings) -> AsyncIterator[Any]:
    client = await connection.connect(on_cluster.redis_url)
    yield client
    async for key in client.scan_iter(match=f"{on_cluster.key_prefix}:*", count=1000):
        await client.unlink(key)
    await client.aclose()


@pytest.fixture
async def cluster_client(on_cluster: Settings, cluster_redis: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(on_cluster) as url, httpx.AsyncClient(base_url=url, headers=STORE, timeout=30) as c:
        yield c


@pytest.fixture
async def cluster_worker(on_cluster: Settings, cluster_redis: Any) -> AsyncIterator[Persister]:
    async with persisting(on_cluster, cluster_redis) as persister:
        yield persister


async def reserve(c: httpx.AsyncClient, sale: str, user: str, sku: str = "phone", key: str = "") -> httpx.Response:
    headers = {"Idempotency-Key": key} if key else {}
    return await c.post(
        f"/v1/sales/{sale}/reservations", json={"user_id": user, "sku": sku, "quantity": 1}, headers=headers
    )


async def scripts_run_per_master(redis: Any) -> list[int]:
    counts = []
    for node in redis.get_primaries():
        stats = await redis.info("commandstats", target_nodes=node)
        counts.append(int(stats.get("cmdstat_evalsha", {}).get("calls", 0)))
    return counts


async def test_a_node_of_a_cluster_in_redis_url_gives_a_cluster_client(cluster: EmbeddedCluster) -> None:
    client = await connection.connect(cluster.url)
    try:
        assert isinstance(client, RedisCluster)
        assert len(client.get_primaries()) == 3
    finally:
        await client.aclose()


async def test_a_crowd_on_a_cluster_buys_exactly_the_stock_of_sales_on_every_master_and_postgres_gets_it_all(
    on_cluster: Settings,
    cluster_redis: Any,
    cluster_client: httpx.AsyncClient,
    cluster_worker: Persister,
    pg: asyncpg.Connection,
) -> None:
    keys = Keys(on_cluster.key_prefix)
    before = await scripts_run_per_master(cluster_redis)
    # Enough sales that their hash tags fall on every master.
    sales = [(await create_sale(cluster_client, items=[item(stock=15)]))["id"] for _ in range(6)]
    users = [f"u{n}" for n in range(40)]

    async def attempt(sale: str, user: str, n: int) -> tuple[str, str, int, str]:
        r = await reserve(cluster_client, sale, user, key=f"{user}-{n}")
        return sale, user, r.status_code, r.json().get("reservation_id") or r.json()["error"]["code"]

    answers = await asyncio.gather(*(attempt(s, u, n) for s in sales for u in users for n in range(2)))
    for sale in sales:
        won = [a for a in answers if a[0] == sale and a[2] == 201]
        assert len(won) == 15, f"{sale}: {len(won)} holds for 15 units"
        assert max(Counter(a[1] for a in won).values()) <= 2
        assert {a[3] for a in answers if a[0] == sale and a[2] == 409} == {"sold_out"}
        view = (await cluster_client.get(f"/v1/sales/{sale}")).json()
        assert (view["items"][0]["available"], view["items"][0]["held"]) == (0, 15)
    after = await scripts_run_per_master(cluster_redis)
    assert sum(1 for b, a in zip(before, after, strict=True) if a > b) >= 2, "every script ran on one master"
    for sale in sales:
        await drained(cluster_redis, keys, sale)
        assert await pg.fetchval("SELECT count(*) FROM reservations WHERE sale_id = $1", sale) == 15
        report = await reconcile(cluster_redis, pg, keys, sale)
        assert not report.differences, report.differences


async def test_a_hot_item_with_three_shards_runs_on_three_masters_and_sells_exactly_its_stock(
    on_cluster: Settings,
    cluster_redis: Any,
    cluster_client: httpx.AsyncClient,
    cluster_worker: Persister,
    pg: asyncpg.Connection,
) -> None:
    keys = Keys(on_cluster.key_prefix)
    stock, limit = 90, 2
    hot = {"sku": "phone", "name": "P", "price_cents": 1, "stock": stock, "per_user_limit": limit, "shards": 3}
    sale = (await create_sale(cluster_client, items=[hot]))["id"]
    slots = [sale, *(await cluster_redis.hget(keys.sale(sale), "slots")).split(",")]
    masters = {cluster_redis.get_node_from_key(keys.sale(slot)).name for slot in slots}
    assert len(masters) == 3, "the shards were placed on one master"
    before = await scripts_run_per_master(cluster_redis)

    async def attempt(user: str, n: int) -> tuple[str, int, str]:
        r = await reserve(cluster_client, sale, user, key=f"{user}-{n % 3}")  # every third a retry
        return user, r.status_code, r.json().get("reservation_id") or r.json()["error"]["code"]

    answers = await asyncio.gather(*(attempt(f"u{u}", n) for u in range(120) for n in range(4)))
    won = {a[2]: a[0] for a in answers if a[1] == 201}
    assert len(won) == stock
    assert max(Counter(won.values()).values()) <= limit
    assert {a[2] for a in answers if a[1] == 409} <= {"sold_out", "limit_exceeded"}
    assert {rid.split(".")[0] for rid in won} == set(slots)
    after = await scripts_run_per_master(cluster_redis)
    assert all(a > b for b, a in zip(before, after, strict=True)), (before, after)
    stranded = sum([int(await cluster_redis.hget(keys.item(slot, "phone"), "available")) for slot in slots])
    assert stranded == 0
    view = (await cluster_client.get(f"/v1/sales/{sale}")).json()["items"][0]
    assert (view["available"], view["held"], view["shards"]) == (0, stock, 3)
    await drained(cluster_redis, keys, sale)
    assert await pg.fetchval("SELECT count(*) FROM reservations WHERE sale_id = $1", sale) == stock
    assert not (await reconcile(cluster_redis, pg, keys, sale)).differences


async def test_client_budgets_of_a_hot_item_on_three_masters_are_exact(
    on_cluster: Settings, cluster_redis: Any, cluster_client: httpx.AsyncClient
) -> None:
    keys = Keys(on_cluster.key_prefix)
    hot = {"sku": "phone", "name": "P", "price_cents": 1, "stock": 100, "per_user_limit": 1, "shards": 3}
    sale = (await create_sale(cluster_client, items=[hot | {"per_ip_limit": 5}]))["id"]
    addresses = ["203.0.113.7", "198.51.100.23", "192.0.2.99"]

    async def bot(n: int) -> httpx.Response:
        body = {"user_id": f"bot{n}", "sku": "phone", "client": {"ip": addresses[n % 3]}}
        return await cluster_client.post(f"/v1/sales/{sale}/reservations", json=body)

    answers = await asyncio.gather(*(bot(n) for n in range(150)))
    won = [r.json()["reservation_id"] for r in answers if r.status_code == 201]
    assert len(won) == 15
    assert len({rid.split(".")[0] for rid in won}) > 1  # held on several masters, counted on one per address
    slots = [sale, *(await cluster_redis.hget(keys.sale(sale), "slots")).split(",")]
    for ip in addresses:
        assert sorted([int(await cluster_redis.hget(keys.ips(s, "phone"), ip) or 0) for s in slots]) == [0, 0, 5]


async def test_a_cancel_on_a_cluster_makes_its_unit_reservable_again_after_sold_out_was_answered_from_memory(
    cluster_client: httpx.AsyncClient,
) -> None:
    sale = (await create_sale(cluster_client, items=[item(stock=1)]))["id"]
    first = await reserve(cluster_client, sale, "first")
    assert first.status_code == 201
    for _ in range(3):  # the first refusal from the script, the next ones from memory
        assert (await reserve(cluster_client, sale, "late")).json()["error"]["code"] == "sold_out"
    rid = first.json()["reservation_id"]
    r = await cluster_client.post(f"/v1/reservations/{rid}/cancel", json={"user_id": "first"})
    assert r.status_code == 200, r.text
    deadline = asyncio.get_running_loop().time() + 0.25
    while (r := await reserve(cluster_client, sale, "late")).status_code != 201:
        assert asyncio.get_running_loop().time() < deadline, r.text
        await asyncio.sleep(0.005)


async def test_a_hold_left_to_expire_on_a_cluster_is_swept_and_its_unit_sold_again(
    cluster_client: httpx.AsyncClient,
) -> None:
    sale = (await create_sale(cluster_client, hold_seconds=1, items=[item(stock=1)]))["id"]
    assert (await reserve(cluster_client, sale, "slow")).status_code == 201
    assert (await reserve(cluster_client, sale, "next")).status_code == 409
    deadline = asyncio.get_running_loop().time() + 5
    while (r := await reserve(cluster_client, sale, "next")).status_code != 201:
        assert asyncio.get_running_loop().time() < deadline, r.text
        await asyncio.sleep(0.05)
    r = await cluster_client.get(f"/v1/sales/{sale}/progress", headers=OPS)
    assert r.status_code == 200, r.text
    progress = r.json()
    assert progress["items"][0]["expired"] == 1


def item(stock: int, sku: str = "phone") -> dict[str, Any]:
    return {"sku": sku, "name": sku, "price_cents": 100, "stock": stock, "per_user_limit": 2}


async def test_scripts_a_master_lost_are_loaded_again_and_the_calls_go_through(
    cluster_redis: Any, cluster_client: httpx.AsyncClient
) -> None:
    sales = [(await create_sale(cluster_client, items=[item(stock=5)]))["id"] for _ in range(4)]
    for node in cluster_redis.get_primaries():  # as masters restarted empty, or replicas promoted, would be
        await cluster_redis.execute_command("SCRIPT FLUSH", target_nodes=node)
    answers = await asyncio.gather(*(reserve(cluster_client, s, "after-flush") for s in sales))
    assert [r.status_code for r in answers] == [201] * len(sales), [r.text for r in answers]


async def test_metrics_on_a_cluster_show_the_numbers_of_sales_on_every_master(
    cluster_client: httpx.AsyncClient,
) -> None:
    sales = [(await create_sale(cluster_client, items=[item(stock=5)]))["id"] for _ in range(4)]
    for s in sales:
        assert (await reserve(cluster_client, s, "m")).status_code == 201
    r = await cluster_client.get("/metrics", headers=OPS)
    assert r.status_code == 200, r.text
    for s in sales:
        line = f'flashsale_item_units{{sale_id="{s}",sku="phone",state="held"}} 1.0'
        assert line in r.text, f"no held unit of {s} in /metrics"


async def test_recover_on_a_cluster_brings_back_a_sale_whose_keys_were_deleted_mid_sale(
    on_cluster: Settings,
    cluster_redis: Any,
    cluster_client: httpx.AsyncClient,
    cluster_worker: Persister,
    pg: asyncpg.Connection,
) -> None:
    keys = Keys(on_cluster.key_prefix)
    sale = (await create_sale(cluster_client, items=[item(stock=10)]))["id"]
    held = [await reserve(cluster_client, sale, f"u{n}", key=f"k{n}") for n in range(4)]
    assert [r.status_code for r in held] == [201] * 4
    await drained(cluster_redis, keys, sale)
    async for key in cluster_redis.scan_iter(match=keys.sale_pattern(sale), count=1000):
        await cluster_redis.unlink(key)

    scripts = Scripts.load(cluster_redis, on_cluster.lua_dir)
    report = await recover(cluster_redis, pg, keys, scripts, sale)
    await scripts.calls.close()

    assert report.sale_reloaded and report.outcomes == {"added": 4}
    view = (await cluster_client.get(f"/v1/sales/{sale}")).json()["items"][0]
    assert (view["available"], view["held"]) == (6, 4)
    replay = await reserve(cluster_client, sale, "u0", key="k0")
    assert replay.status_code == 200 and replay.json()["reservation_id"] == held[0].json()["reservation_id"]
    await drained(cluster_redis, keys, sale)
    assert not (await reconcile(cluster_redis, pg, keys, sale)).differences


async def test_the_list_of_sales_on_a_cluster_shows_sales_of_every_master(
    on_cluster: Settings, cluster_redis: Any, cluster_client: httpx.AsyncClient
) -> None:
    keys = Keys(on_cluster.key_prefix)
    by_master: dict[str, list[str]] = {}
    for n in range(200):  # two sale ids on each master
        sale_id = f"list-{secrets.token_hex(3)}-{n}"
        ids = by_master.setdefault(cluster_redis.get_node_from_key(keys.sale(sale_id)).name, [])
        if len(ids) < 2:
            ids.append(sale_id)
    assert len(by_master) == 3
    made = [
        (await create_sale(cluster_client, sale_id=s, items=[item(stock=3)]))["id"]
        for ids in by_master.values()
        for s in ids
    ]
    r = await cluster_client.get("/v1/sales?limit=50", headers=OPS)
    assert r.status_code == 200, r.text
    listed = {s["id"]: s for s in r.json()["sales"]}
    assert set(made) <= set(listed)
    assert all(listed[s]["items"][0]["available"] == 3 for s in made)


async def test_a_persister_killed_mid_batch_on_a_cluster_loses_nothing_and_doubles_nothing(
    on_cluster: Settings, cluster_redis: Any, cluster_client: httpx.AsyncClient, pg: asyncpg.Connection
) -> None:
    keys = Keys(on_cluster.key_prefix)
    n = 250
    sales = [(await create_sale(cluster_client, items=[item(stock=n)]))["id"] for _ in range(3)]
    rids = {s: await crowd(cluster_client, s, n) for s in sales}
    await slow_inserts(pg)
    count = "SELECT count(*) FROM reservations"
    with procs.worker(on_cluster, FLASHSALE_PERSIST_BATCH="100") as first:
        while await pg.fetchval(count) < 100:
            await asyncio.sleep(0.01)
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert 0 < await pg.fetchval(count) < 3 * n, "the kill should land mid-way"
    with procs.worker(on_cluster, FLASHSALE_PERSIST_BATCH="200"):  # claims what the dead one left pending
        for s in sales:
            await drained(cluster_redis, keys, s, timeout=90)
    for s in sales:
        found = await pg.fetch("SELECT id, status FROM reservations WHERE sale_id = $1", s)
        assert sorted(r["id"] for r in found) == sorted(rids[s])
        assert (await reconcile(cluster_redis, pg, keys, s)).differences == []


def test_the_readme_try_it_block_runs_against_flashsale_dev_on_a_cluster(
    cluster: EmbeddedCluster, tmp_path: Path
) -> None:
    env = {**{k: v for k, v in os.environ.items() if k != "DATABASE_URL"}, "REDIS_URL": cluster.url}
    dev = start_dev(tmp_path, env)
    try:
        out = run_readme_block(tmp_path, env)
        assert '"status":"confirmed"' in out and "no differences" in out
    finally:
        os.killpg(dev.pid, signal.SIGINT)
        dev.communicate(timeout=30)
