"""Refusals answered from memory reach the progress counters once each (contract invariant 8)."""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from flashsale.keys import Keys
from flashsale.scripts import Scripts
from flashsale.settings import Settings
from flashsale.tally import Tally


async def test_counts_are_added_once_even_when_redis_refuses_another_items_counter(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    tally = Tally(keys, scripts)
    await redis.hset(keys.item("s", "broken"), "attempts", "not a number")
    for sku, n in (("good", 2), ("broken", 3)):
        for _ in range(n):
            tally.refused("s", sku, "sold_out")
    await tally.flush()
    await tally.flush()  # nothing left to add: the refused increments are not queued again
    assert await redis.hmget(keys.item("s", "good"), "attempts", "rej:sold_out") == ["2", "2"]


async def test_counts_a_flush_could_not_send_are_sent_by_the_next(
    redis: Redis, keys: Keys, scripts: Scripts, settings: Settings
) -> None:
    from flashsale.embedded import free_port

    # Nothing listens there; no retries, so that the flush fails at once.
    down = Redis(host="127.0.0.1", port=free_port(), decode_responses=True, retry=Retry(NoBackoff(), 0))
    unreachable = Scripts.load(down, settings.lua_dir)
    tally = Tally(keys, unreachable)
    tally.refused("s", "a", "sale_paused")
    await tally.flush()
    tally.scripts = scripts
    await tally.flush()
    assert await redis.hmget(keys.item("s", "a"), "attempts", "rej:sale_paused") == ["1", "1"]
    await unreachable.calls.close()
    await down.aclose()
