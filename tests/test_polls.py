"""Waiting-room polls answered from memory (polls.py): the same answers a read of Redis would give,
within 250 ms, through every process; and the place kept by the polls memory answered."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis

from flashsale import connection, metrics
from flashsale.embedded import free_port
from flashsale.keys import Keys
from flashsale.persister import Persister
from flashsale.polls import Polls
from flashsale.recover import recover
from flashsale.sales import now_ms
from flashsale.scripts import Scripts
from flashsale.settings import Settings
from flashsale.waiting import Room, Tokens

from . import procs
from .conftest import OPS, STORE, create_sale, drained
from .test_recover import forget_sale
from .test_waiting import join, phone, poll

FRESH_MS = 250  # contract invariant 7: what memory answers is this fresh


def later() -> str:
    """A start 30 minutes off: nobody is admitted meanwhile (the sale ends in an hour)."""
    return (datetime.now(UTC) + timedelta(minutes=30)).isoformat()


def polls_answered(metrics_text: str) -> dict[str, float]:
    found = re.findall(r'^flashsale_waiting_room_polls_total\{answered="(\w+)"\} ([0-9.e+]+)$', metrics_text, re.M)
    return {k: float(v) for k, v in found}


async def test_polls_answered_from_memory_keep_the_place_past_abandon_after_s(
    client: httpx.AsyncClient, redis: Redis, keys: Keys
) -> None:
    room = {"admit_per_s": 10, "abandon_after_s": 5}
    sale = (await create_sale(client, starts_at=later(), waiting_room=room, items=phone(5)))["id"]
    ticket = (await join(client, sale, "patient")).json()["ticket"]
    before = polls_answered((await client.get("/metrics", headers=OPS)).text)
    started = asyncio.get_running_loop().time()
    while asyncio.get_running_loop().time() - started < 7:  # longer than abandon_after_s
        assert (await poll(client, sale, ticket, "patient"))["status"] == "waiting"
        await asyncio.sleep(0.25)
    after = polls_answered((await client.get("/metrics", headers=OPS)).text)
    assert after.get("memory", 0) - before.get("memory", 0) >= 20
    assert after.get("redis", 0) - before.get("redis", 0) <= 3
    last = await redis.zscore(keys.queue_polls(sale), ticket)  # written back, though no script ran
    assert last is not None and now_ms() - last < 1000


async def test_an_admission_shows_through_every_process_within_250_ms(settings: Settings, redis: Redis) -> None:
    keys = Keys(settings.key_prefix)
    with procs.api(settings, workers=1) as a, procs.api(settings, workers=1) as b:
        async with clients(a, b) as (ca, cb):
            sale = (await create_sale(ca, waiting_room={"admit_per_s": 1}, items=phone(50)))["id"]
            for n in range(3):  # ahead in line
                assert (await join(ca, sale, f"u{n}")).status_code == 201
            ticket = (await join(ca, sale, "me")).json()["ticket"]
            seen: dict[int, int] = {}
            deadline = asyncio.get_running_loop().time() + 10
            while len(seen) < 2:
                assert asyncio.get_running_loop().time() < deadline, "never admitted"
                for n, c in enumerate((ca, cb)):
                    if n not in seen and (await poll(c, sale, ticket, "me"))["status"] == "admitted":
                        seen[n] = now_ms()
                await asyncio.sleep(0.01)
            admitted_ms = int(await redis.hget(keys.ticket(sale, ticket), "admitted_ms") or 0)
            assert all(at - admitted_ms <= FRESH_MS for at in seen.values()), (admitted_ms, seen)


async def test_a_close_by_ops_shows_through_every_process_within_250_ms(settings: Settings, redis: Redis) -> None:
    with procs.api(settings, workers=1) as a, procs.api(settings, workers=1) as b:
        async with clients(a, b) as (ca, cb):
            sale = (await create_sale(ca, starts_at=later(), waiting_room={"admit_per_s": 1}, items=phone(5)))["id"]
            ticket = (await join(ca, sale, "u")).json()["ticket"]
            for c in (ca, cb, ca, cb):  # known to both, then answered from memory
                assert (await poll(c, sale, ticket, "u"))["status"] == "waiting"
            assert (await ca.delete(f"/v1/sales/{sale}/queue", headers=OPS)).status_code == 200
            closed_at = asyncio.get_running_loop().time()
            for c in (ca, cb):
                while (t := await poll(c, sale, ticket, "u"))["status"] == "waiting":
                    assert asyncio.get_running_loop().time() - closed_at < FRESH_MS / 1000
                    await asyncio.sleep(0.01)
                assert (t["status"], t["reason"]) == ("closed", "closed_by_ops")


async def test_a_ticket_left_unpolled_expires_even_in_a_process_that_answered_it_from_memory(
    client: httpx.AsyncClient,
) -> None:
    room = {"admit_per_s": 10, "abandon_after_s": 5}
    sale = (await create_sale(client, starts_at=later(), waiting_room=room, items=phone(5)))["id"]
    ticket = (await join(client, sale, "gone")).json()["ticket"]
    for _ in range(3):
        assert (await poll(client, sale, ticket, "gone"))["status"] == "waiting"
    await asyncio.sleep(5.6)
    assert (await poll(client, sale, ticket, "gone"))["status"] == "expired"


async def test_a_write_back_that_fails_forgets_its_tickets_so_redis_answers_them_next(
    client: httpx.AsyncClient, redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    sale = (await create_sale(client, starts_at=later(), waiting_room={"admit_per_s": 1}, items=phone(5)))["id"]
    ticket = (await join(client, sale, "u")).json()["ticket"]
    polls = Polls(Room(redis, keys, scripts, Tokens("t")), redis, keys)
    assert (await polls.poll(sale, ticket, "u")).status == "waiting"  # read from Redis
    before = answered_by_redis()
    assert (await polls.poll(sale, ticket, "u")).status == "waiting"
    assert answered_by_redis() == before  # from memory
    dead = Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.2)
    polls.redis = dead
    try:
        with pytest.raises(connection.ERRORS):
            await polls.write_back()
    finally:
        polls.redis = redis
        await dead.aclose()
    assert (await polls.poll(sale, ticket, "u")).status == "waiting"
    assert answered_by_redis() == before + 1  # forgotten: asked of Redis again


def answered_by_redis() -> float:
    metrics.flush()
    return float(metrics.POLLS.labels("redis")._value.get())


@contextlib.asynccontextmanager
async def clients(*urls: str) -> AsyncIterator[list[httpx.AsyncClient]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(httpx.AsyncClient(base_url=u, headers=STORE, timeout=10)) for u in urls]


async def test_a_ticket_of_a_room_made_again_by_recover_is_asked_of_redis_not_answered_from_memory(
    client: httpx.AsyncClient, redis: Redis, keys: Keys, scripts: Scripts, pg: asyncpg.Connection, worker: Persister
) -> None:
    sale = (await create_sale(client, starts_at=later(), waiting_room={"admit_per_s": 10}, items=phone(5)))["id"]
    ticket = (await join(client, sale, "me")).json()["ticket"]
    for _ in range(2):  # known to the process, then answered from memory
        assert (await poll(client, sale, ticket, "me"))["status"] == "waiting"
    await drained(redis, keys, sale)
    await forget_sale(redis, keys, sale)
    assert not (await recover(redis, pg, keys, scripts, sale)).problems  # the room comes back empty
    await asyncio.sleep(0.15)  # one snapshot's age
    gone = await client.get(f"/v1/sales/{sale}/queue/{ticket}", params={"user_id": "me"})
    assert gone.status_code == 404  # join again
