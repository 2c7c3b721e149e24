"""A master of the cluster killed mid-sale: 503 with Retry-After while its replica takes over,
then the service goes on by itself; nothing oversold; what reached Postgres is in Redis after
``recover`` (contract, "Scale"; README, "Running on a Redis Cluster")."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import httpx
import pytest
from redis.asyncio import RedisCluster

from flashsale import connection, db
from flashsale.embedded import EmbeddedCluster
from flashsale.keys import Keys
from flashsale.monitor import Monitor
from flashsale.reconcile import reconcile
from flashsale.recover import recover
from flashsale.scripts import Scripts
from flashsale.settings import Settings
from flashsale.tally import Tally

from .conftest import OPS, STORE, create_sale, drained, persisting, serving

pytestmark = [pytest.mark.timeout(120), pytest.mark.xdist_group("cluster")]

STOCK = 100_000
CALLERS = 16
READS = 15


@pytest.fixture
def replicated() -> Iterator[EmbeddedCluster]:
    c = EmbeddedCluster(masters=3, replicas=1, node_timeout_ms=1000).start()
    yield c
    c.stop()


@pytest.fixture
async def cluster_redis(settings: Settings, replicated: EmbeddedCluster) -> AsyncIterator[Any]:
    client = await connection.connect(replicated.url)
    yield client
    await client.aclose()


async def test_a_master_killed_mid_sale_answers_503_until_its_replica_takes_over_and_loses_nothing_persisted(
    settings: Settings, replicated: EmbeddedCluster, cluster_redis: Any, pg: asyncpg.Connection
) -> None:
    on_cluster = dataclasses.replace(settings, redis_url=replicated.url)
    keys = Keys(on_cluster.key_prefix)
    async with (
        persisting(on_cluster, cluster_redis),
        serving(on_cluster) as url,
        httpx.AsyncClient(base_url=url, headers=STORE, timeout=30) as c,
    ):
        item = {"sku": "phone", "name": "Phone", "price_cents": 100, "stock": STOCK, "per_user_limit": 1}
        sale = (await create_sale(c, items=[item]))["id"]
        owner = cluster_redis.get_node_from_key(keys.sale(sale))
        master = next(n for n in replicated.nodes if n.port == owner.port)
        answers: list[tuple[float, int, str | None, str]] = []  # (answered at, status, Retry-After, rid)
        refused = Counter[int]()  # caller -> 503s it was answered
        killed_at = 0.0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30

        async def caller(n: int) -> None:
            i = 0
            while loop.time() < deadline:
                i += 1
                user = f"c{n}-{i}"
                r = await c.post(
                    f"/v1/sales/{sale}/reservations",
                    json={"user_id": user, "sku": "phone", "quantity": 1},
                    headers={"Idempotency-Key": user},
                )
                body = r.json()
                answers.append(
                    (loop.time(), r.status_code, r.headers.get("retry-after"), body.get("reservation_id", ""))
                )
                if killed_at and resumed(answers, killed_at):
                    return
                if r.status_code == 503:
                    refused[n] += 1
                    await asyncio.sleep(0.01)

        def resumed(seen: list[tuple[float, int, str | None, str]], since: float) -> bool:
            """Answers stopped, then came back: 20 holds made after the first 503 that followed the kill."""
            down = [a for a in seen if a[0] > since and a[1] == 503]
            return bool(down) and sum(1 for a in seen if a[0] > down[0][0] and a[1] == 201) >= 20

        async def kill_after(seconds: float) -> None:
            nonlocal killed_at
            await asyncio.sleep(seconds)
            assert master.process is not None
            master.process.kill()
            killed_at = loop.time()

        await asyncio.gather(kill_after(1.0), *(caller(n) for n in range(CALLERS)))

        statuses = {a[1] for a in answers}
        assert statuses <= {201, 503}, f"answers other than holds and 503s: {statuses}"
        outage = [a for a in answers if a[1] == 503]
        assert outage, "killing the sale's master never showed"
        assert all(a[2] for a in outage), "a 503 without Retry-After"
        assert resumed(answers, killed_at), "the service did not come back by itself"
        # Answered, not waited out: a caller that tries again is told 503 again while the replica
        # takes over (a client retrying for seconds inside each call would give each caller one
        # 503, the call in flight at the kill, and then hold its next call until the failover).
        assert max(refused.values()) >= 2, f"no caller was refused twice: {dict(refused)}"

        made = {a[3] for a in answers if a[1] == 201}
        stock = await cluster_redis.hmget(keys.item(sale, "phone"), "available", "held", "confirmed")
        available, held, confirmed = (int(v) for v in stock)
        # A hold can be made and its reply lost in the kill (its caller got a 503): at most one per 503.
        assert available + held + confirmed == STOCK and held <= len(made) + len(outage)
        await drained(cluster_redis, keys, sale, timeout=30)
        scripts = Scripts.load(cluster_redis, on_cluster.lua_dir)
        report = await recover(cluster_redis, pg, keys, scripts, sale)
        await scripts.calls.close()
        assert not report.oversold
        # A hold can be in Postgres without its caller having heard of it (the master ran the
        # script, then died before the reply: a 503, and a retry with the key gets the hold).
        persisted = {r["id"] for r in await pg.fetch("SELECT id FROM reservations WHERE sale_id = $1", sale)}
        pipe = cluster_redis.pipeline(transaction=False)
        for rid in persisted:
            pipe.exists(keys.reservation(sale, rid))
        assert all(await pipe.execute()), "a persisted hold is missing from Redis after recover"
        await drained(cluster_redis, keys, sale, timeout=30)
        assert not (await reconcile(cluster_redis, pg, keys, sale)).differences


async def test_the_changes_channel_is_heard_again_after_its_node_fails_over(
    settings: Settings, replicated: EmbeddedCluster, cluster_redis: Any
) -> None:
    """The listener's node killed: once a replica took over, the process answers from memory again
    (it trusts its memory only while subscribed)."""
    on_cluster = dataclasses.replace(settings, redis_url=replicated.url)
    keys = Keys(on_cluster.key_prefix)
    owner = cluster_redis.get_node_from_key(keys.changes)  # a plain channel: its subscriber sits here
    node = next(n for n in replicated.nodes if n.port == owner.port)
    async with serving(on_cluster) as url, httpx.AsyncClient(base_url=url, headers=STORE, timeout=30) as c:
        item = {"sku": "phone", "name": "Phone", "price_cents": 100, "stock": 1, "per_user_limit": 1}
        sale = (await create_sale(c, items=[item]))["id"]

        async def attempt(user: str) -> int:
            r = await c.post(f"/v1/sales/{sale}/reservations", json={"user_id": user, "sku": "phone", "quantity": 1})
            return r.status_code

        assert await attempt("first") == 201
        assert node.process is not None
        node.process.kill()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while True:  # until memory answers again: the counter of answers from memory moves
            before = await from_memory(c)
            assert await attempt("late") in (409, 503)
            assert await attempt("late") in (409, 503)
            if await from_memory(c) > before:
                break
            assert loop.time() < deadline, "the process never trusted its memory again"
            await asyncio.sleep(0.2)


async def from_memory(c: httpx.AsyncClient) -> float:
    text = (await c.get("/metrics", headers=OPS)).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("flashsale_refusals_from_memory_total{")
    )


# redis-py's slot refresh drops the ClusterNode objects it replaced without closing their
# connections; this test refreshes hundreds of times, and collects them before it ends.
@pytest.mark.filterwarnings("ignore:Exception ignored in. <function ClusterNode.__del__")
@pytest.mark.filterwarnings("ignore:Exception ignored in. <function AbstractConnection.__del__")
async def test_progress_and_its_counts_still_read_after_the_cluster_client_lost_a_master(settings: Settings) -> None:
    """A connection to one master lost makes the cluster client refresh its slots on its next call:
    the reads of a sale on another master (progress, the waiting room's counts, the tally) still
    answer, and go on answering. (redis-py runs a command queued in a cluster MULTI on an event loop
    of its own, where that refresh leaves the client broken for good: none is used.)"""
    lost = EmbeddedCluster(masters=3, node_timeout_ms=60_000).start()  # never marked failed: no CLUSTERDOWN
    try:
        await read_progress_while_a_master_is_lost(dataclasses.replace(settings, redis_url=lost.url), lost)
    finally:
        lost.stop()
        gc.collect()


async def read_progress_while_a_master_is_lost(on_cluster: Settings, lost: EmbeddedCluster) -> None:
    keys = Keys(on_cluster.key_prefix)
    async with serving(on_cluster) as url, httpx.AsyncClient(base_url=url, headers=STORE, timeout=30) as c:
        room = {"admit_per_s": 5, "abandon_after_s": 30, "admission_ttl_s": 60}
        sale = (await create_sale(c, waiting_room=room))["id"]
    client = await connection.connect(lost.url)
    assert isinstance(client, RedisCluster)
    scripts = Scripts.load(client, on_cluster.lua_dir)
    pool = await db.create_pool(on_cluster.database_url, 1)
    tally = Tally(keys, scripts)
    watching = Monitor(client, pool, keys, scripts, tally)

    def port(key: str) -> int:
        node = client.get_node_from_key(key)
        assert node is not None
        return int(node.port)

    used = {port(keys.sale(sale)), port(keys.workers)}  # the masters progress reads from
    other = next(n for n in lost.nodes if n.port not in used)
    elsewhere = next(k for i in range(1000) if port(k := f"x{i}") == other.port)
    assert other.process is not None
    other.process.kill()
    other.process.wait()
    done = asyncio.Event()

    async def knock() -> None:
        """Calls to the lost master: each fails, and the next call of the client refreshes its slots."""
        while not done.is_set():
            with pytest.raises(connection.ERRORS):
                await client.get(elsewhere)

    knocking = asyncio.create_task(knock())
    try:
        for _ in range(READS):
            tally.refused(sale, "phone", "sold_out")
            doc = await watching.progress(sale)
            assert doc.items[0].stock_total == 10 and doc.queue is not None and doc.queue.waiting == 0
        assert doc.items[0].attempts == READS and doc.items[0].rejected == {"sold_out": READS}
    finally:
        done.set()
        await knocking
        await watching.close()
        await pool.close()
        await scripts.calls.close()
        await client.aclose()
