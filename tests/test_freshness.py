"""Contract invariants 7 and 8 with two API processes that answer refusals from memory: a unit
that comes back, a resume or a window change reaches every process within 250 ms, and every
attempt answered from memory is counted. The processes keep verdicts for a minute
(FLASHSALE_VERDICT_TTL_MS), so only the changes channel can make them fresh in time."""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis

from flashsale.keys import Keys
from flashsale.settings import Settings

from . import procs
from .conftest import OPS, OPS_KEY, RUN, STORE, STORE_KEY, Servers, with_database

FRESH_S = 0.25
TTL = {"FLASHSALE_VERDICT_TTL_MS": "60000", "FLASHSALE_SWEEP_MS": "50"}
MEMORY = re.compile(r'^flashsale_refusals_from_memory_total\{code="([a-z_]+)"\} ([0-9.e+]+)$', re.M)


# One pair of processes for the whole module (each test makes sales of its own), on one xdist
# worker in file order: starting two API processes per test cost more than the tests.
pytestmark = [pytest.mark.timeout(120), pytest.mark.xdist_group("freshness")]
Shared = tuple[Settings, list[str]]


@pytest.fixture(scope="module")
def shared(servers: Servers) -> Iterator[Shared]:
    name = f"flashsale_test_{RUN}_{secrets.token_hex(4)}"

    async def create() -> None:
        admin = await asyncpg.connect(servers.admin_url)
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{servers.template}"')
        await admin.close()

    asyncio.run(create())
    settings = Settings(
        redis_url=servers.redis_url,
        database_url=with_database(servers.admin_url, name),
        ops_keys=(OPS_KEY,),
        storefront_keys=(STORE_KEY,),
        key_prefix=f"fst{RUN}{secrets.token_hex(3)}",
        user_rate_per_s=0,
        sweep_interval_ms=50,
        log_level="WARNING",
    )
    try:
        with procs.api(settings, workers=1, **TTL) as a, procs.api(settings, workers=1, **TTL) as b:
            yield settings, [a, b]
    finally:
        asyncio.run(_drop_keys(settings))  # the database goes with the session's


async def _drop_keys(settings: Settings) -> None:
    redis = Redis.from_url(settings.redis_url, decode_responses=True)
    async for key in redis.scan_iter(match=f"{settings.key_prefix}:*", count=1000):
        await redis.unlink(key)
    await redis.aclose()


@contextlib.asynccontextmanager
async def two_processes(shared: Shared) -> AsyncIterator[list[httpx.AsyncClient]]:
    a, b = shared[1]
    async with httpx.AsyncClient(base_url=a, headers=STORE) as ca, httpx.AsyncClient(base_url=b, headers=STORE) as cb:
        yield [ca, cb]


async def new_sale(c: httpx.AsyncClient, stock: int = 1, hold_seconds: int = 600, **extra: Any) -> str:
    now = datetime.now(UTC)
    body = {
        "id": f"fresh-{time.monotonic_ns()}",
        "name": "Freshness",
        "starts_at": (now - timedelta(seconds=1)).isoformat(),
        "ends_at": (now + timedelta(hours=1)).isoformat(),
        "hold_seconds": hold_seconds,
        "items": [{"sku": s, "name": s, "price_cents": 1, "stock": stock, "per_user_limit": 5} for s in ("a", "b")],
        **extra,
    }
    r = await c.post("/v1/sales", json=body, headers=OPS)
    assert r.status_code == 201, r.text
    return str(body["id"])


async def reserve(c: httpx.AsyncClient, sale: str, sku: str, user: str) -> httpx.Response:
    return await c.post(f"/v1/sales/{sale}/reservations", json={"user_id": user, "sku": sku, "quantity": 1})


async def from_memory(c: httpx.AsyncClient, code: str) -> float:
    text = (await c.get("/metrics", headers=OPS)).text
    return sum(float(n) for found, n in MEMORY.findall(text) if found == code)


async def refused_from_memory(clients: list[httpx.AsyncClient], sale: str, code: str) -> None:
    """Each process refuses both items, and the second time from memory."""
    for c in clients:
        before = await from_memory(c, code)
        for _ in range(2):
            for sku in ("a", "b"):
                r = await reserve(c, sale, sku, "crowd")
                assert r.status_code == 409 and r.json()["error"]["code"] == code, r.text
        assert await from_memory(c, code) >= before + 2, "the process never answered from memory"


async def reservable_within(c: httpx.AsyncClient, sale: str, sku: str, since: float, limit: float = FRESH_S) -> float:
    """Seconds from ``since`` until a reserve through ``c`` succeeds; fails past ``limit``."""
    while True:
        r = await reserve(c, sale, sku, f"late-{sku}")
        waited = time.monotonic() - since
        if r.status_code == 201:
            return waited
        assert waited < limit, f"still {r.json()['error']['code']} {waited:.3f} s after the change"
        await asyncio.sleep(0.005)


async def restock_both(c: httpx.AsyncClient, sale: str) -> None:
    for sku in "ab":
        r = await c.post(f"/v1/sales/{sale}/items/{sku}/restock", json={"quantity": 1}, headers=OPS)
        assert r.status_code == 200


async def each_process_sells(clients: list[httpx.AsyncClient], sale: str, since: float) -> None:
    """Process one reserves item a, process two item b: each sees its unit within 250 ms."""
    waits = await asyncio.gather(
        *(reservable_within(c, sale, sku, since) for c, sku in zip(clients, "ab", strict=True))
    )
    assert max(waits) < FRESH_S, waits


async def test_a_cancel_makes_its_unit_reservable_through_every_process_within_250_ms(
    shared: Shared,
) -> None:
    async with two_processes(shared) as clients:
        sale = await new_sale(clients[0])
        rids = [(await reserve(clients[0], sale, sku, f"w{sku}")).json()["reservation_id"] for sku in "ab"]
        await refused_from_memory(clients, sale, "sold_out")
        for rid, sku in zip(rids, "ab", strict=True):
            r = await clients[1].post(f"/v1/reservations/{rid}/cancel", json={"user_id": f"w{sku}"})
            assert r.status_code == 200
        await each_process_sells(clients, sale, time.monotonic())


async def test_an_expiry_makes_its_unit_reservable_through_every_process_within_250_ms(
    shared: Shared, redis: Redis
) -> None:
    settings = shared[0]
    async with two_processes(shared) as clients:
        sale = await new_sale(clients[0], hold_seconds=1)
        for sku in "ab":
            assert (await reserve(clients[0], sale, sku, f"w{sku}")).status_code == 201
        await refused_from_memory(clients, sale, "sold_out")
        keys = Keys(settings.key_prefix)
        while not all([int(await redis.hget(keys.item(sale, sku), "available") or 0) for sku in "ab"]):
            await asyncio.sleep(0.002)  # the sweeper released both holds: from now on, 250 ms
        await each_process_sells(clients, sale, time.monotonic())


async def test_a_restock_makes_its_units_reservable_through_every_process_within_250_ms(
    shared: Shared,
) -> None:
    async with two_processes(shared) as clients:
        sale = await new_sale(clients[0], stock=0)
        await refused_from_memory(clients, sale, "sold_out")
        await restock_both(clients[0], sale)
        await each_process_sells(clients, sale, time.monotonic())


async def test_a_pause_is_refused_and_a_resume_is_served_by_every_process_within_250_ms(
    shared: Shared,
) -> None:
    async with two_processes(shared) as clients:
        sale = await new_sale(clients[0], stock=10)
        assert (await clients[0].post(f"/v1/sales/{sale}/pause", headers=OPS)).status_code == 200
        paused = time.monotonic()
        for c in clients:
            r = await reserve(c, sale, "a", "early")
            assert r.json()["error"]["code"] == "sale_paused" and time.monotonic() - paused < FRESH_S
        await refused_from_memory(clients, sale, "sale_paused")
        assert (await clients[1].post(f"/v1/sales/{sale}/resume", headers=OPS)).status_code == 200
        await each_process_sells(clients, sale, time.monotonic())


async def test_a_window_moved_earlier_is_served_by_every_process_within_250_ms(
    shared: Shared,
) -> None:
    async with two_processes(shared) as clients:
        later = datetime.now(UTC) + timedelta(minutes=10)
        sale = await new_sale(
            clients[0], stock=5, starts_at=later.isoformat(), ends_at=(later + timedelta(hours=1)).isoformat()
        )
        await refused_from_memory(clients, sale, "sale_not_started")
        r = await clients[0].patch(f"/v1/sales/{sale}", json={"starts_at": datetime.now(UTC).isoformat()}, headers=OPS)
        assert r.status_code == 200, r.text
        await each_process_sells(clients, sale, time.monotonic())


async def test_every_attempt_answered_from_memory_is_counted_in_progress_within_a_second(
    shared: Shared,
) -> None:
    async with two_processes(shared) as clients:
        sale = await new_sale(clients[0], stock=0)
        sent = 0
        for c in clients:
            results = [await reserve(c, sale, "a", f"first-{n}") for n in range(5)]  # the script answers first
            results += await asyncio.gather(*(reserve(c, sale, "a", f"u{n}") for n in range(145)))
            assert {r.json()["error"]["code"] for r in results} == {"sold_out"}
            sent += len(results)
        assert sum([await from_memory(c, "sold_out") for c in clients]) > sent / 2, "mostly answered from memory"
        await asyncio.sleep(1.0)
        r = await clients[0].get(f"/v1/sales/{sale}/progress", headers=OPS)
        [a, _] = r.json()["items"]
        assert a["attempts"] == sent and a["rejected"] == {"sold_out": sent}


async def killed_listeners(redis: Redis, settings: Settings) -> int:
    """Kills the changes-channel connection of every API process of this test."""
    name = f"flashsale-changes:{settings.key_prefix}"
    ids = [c["id"] for c in await redis.client_list() if c.get("name") == name]
    for client_id in ids:
        await redis.client_kill_filter(_id=client_id)
    return len(ids)


async def test_a_lost_changes_channel_gives_no_stale_answer_and_recovers(shared: Shared, redis: Redis) -> None:
    settings = shared[0]
    async with two_processes(shared) as clients:
        sale = await new_sale(clients[0], stock=0)
        await refused_from_memory(clients, sale, "sold_out")
        assert await killed_listeners(redis, settings) == 2
        await restock_both(clients[0], sale)  # published while nobody listens: must not be needed
        await each_process_sells(clients, sale, time.monotonic())
        # Back on the channel, each process answers from memory again, and still freshly.
        deadline = time.monotonic() + 5
        while True:
            try:
                await refused_from_memory(clients, sale, "sold_out")
                break
            except AssertionError:
                assert time.monotonic() < deadline, "the process never trusted its memory again"
                await asyncio.sleep(0.1)
        await restock_both(clients[1], sale)
        await each_process_sells(clients, sale, time.monotonic())
