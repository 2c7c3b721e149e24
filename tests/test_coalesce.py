"""One round trip per event-loop tick, against a real Redis: the calls of one tick share a
pipeline, each caller gets its own reply or error, NOSCRIPT is survived, and readers of one sale
share a read only while it has not been sent."""

from __future__ import annotations

import asyncio
import hashlib

import httpx
import pytest
from redis.asyncio import Redis
from redis.exceptions import NoScriptError, ResponseError

from flashsale.coalesce import Coalescer
from flashsale.keys import Keys
from flashsale.sales import Sales
from flashsale.scripts import Scripts
from flashsale.settings import Settings

from .conftest import create_sale


async def test_the_calls_of_one_tick_go_out_as_one_pipeline_each_with_its_own_reply(redis: Redis, keys: Keys) -> None:
    calls = Coalescer(redis)
    replies = await asyncio.gather(*(calls.call("INCRBY", f"{keys.prefix}:n", i) for i in range(1, 51)))
    assert calls.round_trips == 1 and calls.commands == 50
    assert sorted(replies) == sorted({sum(range(1, i + 1)) for i in range(1, 51)}) and max(replies) == 1275


async def test_an_error_fails_its_own_call_only(redis: Redis, keys: Keys) -> None:
    calls = Coalescer(redis)
    await redis.set(f"{keys.prefix}:text", "not a number")
    replies: list[object] = await asyncio.gather(
        calls.call("INCR", f"{keys.prefix}:count"), calls.call("INCR", f"{keys.prefix}:text"), return_exceptions=True
    )
    assert replies[0] == 1 and isinstance(replies[1], ResponseError)


async def test_a_script_the_server_does_not_know_is_loaded_and_its_calls_sent_again(redis: Redis, keys: Keys) -> None:
    # A script no server has seen, as a restarted or failed-over one would have none (no SCRIPT
    # FLUSH: the Redis may be shared).
    source = f"return 'fresh {keys.prefix}' .. ARGV[1]"
    sha = hashlib.sha1(source.encode()).hexdigest()
    calls = Coalescer(redis, {sha: source})
    assert await redis.script_exists(sha) == [False]
    replies = await asyncio.gather(*(calls.evalsha(sha, [], [n]) for n in range(3)))
    assert replies == [f"fresh {keys.prefix}{n}" for n in range(3)]
    assert calls.round_trips == 2  # the calls, NOSCRIPT; then, loaded, the calls again


@pytest.fixture
async def sales(redis: Redis, keys: Keys, settings: Settings) -> Sales:
    return Sales(redis, keys, Scripts.load(redis, settings.lua_dir, Coalescer(redis)))


async def test_readers_of_one_sale_in_one_tick_share_one_read(client: httpx.AsyncClient, sales: Sales) -> None:
    sale = (await create_sale(client))["id"]
    await sales.view(sale)  # learns the sale's skus
    before = sales.scripts.calls.commands
    views = await asyncio.gather(*(sales.view(sale) for _ in range(50)))
    assert sales.scripts.calls.commands == before + 1
    assert {v.items[0].available for v in views} == {10}


async def test_a_reader_that_comes_after_the_read_was_sent_gets_a_read_of_its_own(
    client: httpx.AsyncClient, sales: Sales, redis: Redis, keys: Keys
) -> None:
    sale = (await create_sale(client))["id"]
    await sales.view(sale)
    calls = sales.scripts.calls
    first = asyncio.ensure_future(sales.view(sale))
    sent = calls.ticks
    while calls.ticks == sent:  # until the first read has left
        await asyncio.sleep(0)
    await redis.hincrby(keys.item(sale, "phone"), "available", 5)  # a change after it was sent
    before = calls.commands
    later = await sales.view(sale)
    assert calls.commands == before + 1 and later.items[0].available == 15
    assert (await first).items[0].available in (10, 15)


async def test_a_reload_that_fails_fails_only_the_calls_redis_did_not_run(redis: Redis, keys: Keys) -> None:
    calls = Coalescer(redis)  # knows no source: the reload of an unknown script cannot succeed
    replies: list[object] = await asyncio.gather(
        calls.call("INCR", f"{keys.prefix}:ran"), calls.evalsha("0" * 40, [], []), return_exceptions=True
    )
    assert replies[0] == 1 and isinstance(replies[1], NoScriptError)
    assert await redis.get(f"{keys.prefix}:ran") == "1"  # and it ran once: not sent again
