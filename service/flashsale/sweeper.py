"""Releases holds whose time is up, within a sweep interval of ``expires_at``.

It reads each item's due-time index (a ZSET by expiry), never scans keys. Any number of API
processes may run it: a short lock keeps them from doing the same work twice in one tick, and
the settle script re-checks every hold, so a hold is never released twice even without the lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import cast

from . import connection
from .connection import Client
from .keys import Keys
from .reservations import settle
from .sales import now_ms
from .scripts import Scripts
from .settings import Settings

log = logging.getLogger("flashsale.sweeper")


async def sweep_once(redis: Client, keys: Keys, scripts: Scripts, batch: int) -> int:
    """Expires every due hold of every sale, ``batch`` per script call, until none is due (a
    crowd's holds all fall due together: one batch a tick would fall behind); returns how many."""
    sale_ids = cast(list[str], await redis.zrange(keys.active, 0, -1))
    if not sale_ids:
        return 0
    pipe = redis.pipeline(transaction=False)
    for sale_id in sale_ids:
        pipe.hget(keys.sale(sale_id), "skus")
    pairs = [
        (s, sku) for s, skus in zip(sale_ids, await pipe.execute(), strict=True) if skus for sku in skus.split(",")
    ]
    now = now_ms()
    pipe = redis.pipeline(transaction=False)
    for sale_id, sku in pairs:
        pipe.zrangebyscore(keys.holds(sale_id, sku), "-inf", now, start=0, num=batch)
    expired = 0
    for (sale_id, sku), rids in zip(pairs, await pipe.execute(), strict=True):
        while rids:
            expired += await _expire(scripts, keys, sale_id, sku, rids)
            if len(rids) < batch:
                break
            rids = await redis.zrangebyscore(keys.holds(sale_id, sku), "-inf", now, start=0, num=batch)
    return expired


async def _expire(scripts: Scripts, keys: Keys, sale_id: str, sku: str, rids: list[str]) -> int:
    n: int = await settle(scripts, keys, sale_id, sku, "expire", rids)
    return n


async def run(redis: Client, keys: Keys, scripts: Scripts, settings: Settings, stop: asyncio.Event) -> None:
    """Sweeps until ``stop`` is set (an event, not task cancellation: a cancel that lands inside
    a Redis call can be swallowed there, and the loop would never end)."""
    interval = settings.sweep_interval_ms
    while not stop.is_set():
        try:
            if await redis.set(keys.sweeper_lock, "1", nx=True, px=interval):
                n = await sweep_once(redis, keys, scripts, settings.sweep_batch)
                if n:
                    log.info("expired holds", extra={"expired": n})
        except connection.ERRORS as exc:
            log.warning("sweep failed, retrying next tick: %s", exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval / 1000)
