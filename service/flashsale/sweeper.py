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

import msgspec

from . import budgets, connection, shards
from .budgets import Budgets
from .connection import Client
from .keys import Keys
from .reservations import settle
from .sales import now_ms
from .schemas import SaleDoc
from .scripts import Scripts
from .settings import Settings

log = logging.getLogger("flashsale.sweeper")
MOVE_REPAIR_MS = 2000  # a move of stock still unfinished after this long was cut short by a crash


async def sweep_once(redis: Client, keys: Keys, scripts: Scripts, batch: int) -> int:
    """Expires every due hold of every sale, ``batch`` per script call, until none is due (a
    crowd's holds all fall due together: one batch a tick would fall behind); returns how many.
    In a sale's extra slots (shards.py) it also brings a copy of the state left behind up to
    date, finishes a move of stock a crash cut in half, and settles client budget charges."""
    sale_ids = cast(list[str], await redis.zrange(keys.active, 0, -1))
    if not sale_ids:
        return 0
    pipe = redis.pipeline(transaction=False)
    for sale_id in sale_ids:
        pipe.hmget(keys.sale(sale_id), ["skus", "slots", "rev"])
    read = list(zip(sale_ids, await pipe.execute(), strict=True))
    places = [(s, skus) for s, (skus, _, _) in read]
    extra = [(s, slot, rev) for s, (_, slots, rev) in read for slot in (slots or "").split(",") if slot]
    own = {s: skus for s, (skus, slots, _) in read if slots}  # the sales with extra slots: their own
    if extra:
        places += await _upkeep(redis, keys, scripts, extra, own)
    pairs = [(slot, sku) for slot, skus in places if skus for sku in skus.split(",")]
    now = now_ms()
    pipe = redis.pipeline(transaction=False)
    for slot, sku in pairs:
        pipe.zrangebyscore(keys.holds(slot, sku), "-inf", now, start=0, num=batch)
    expired = 0
    for (slot, sku), rids in zip(pairs, await pipe.execute(), strict=True):
        while rids:
            expired += await _expire(scripts, keys, slot, sku, rids)
            if len(rids) < batch:
                break
            rids = await redis.zrangebyscore(keys.holds(slot, sku), "-inf", now, start=0, num=batch)
    if extra:
        await _refund(redis, keys, scripts, sorted({*own, *(slot for _, slot, _ in extra)}))
    return expired


async def _refund(redis: Client, keys: Keys, scripts: Scripts, slots: list[str]) -> None:
    """Gives back the client budgets of the holds released in these slots of sharded sales that
    an API process did not give back itself (expired ones; a cancel whose process died)."""
    pipe = redis.pipeline(transaction=False)
    for slot in slots:
        pipe.hlen(keys.refunds(slot))
    owed = Budgets(redis, keys, scripts)
    for slot, n in zip(slots, await pipe.execute(), strict=True):
        if n:
            await owed.refund(slot, await _item_slots(redis, keys, shards.sale_of_slot(slot)))


async def _upkeep(
    redis: Client, keys: Keys, scripts: Scripts, extra: list[tuple[str, str, str | None]], own: dict[str, str | None]
) -> list[tuple[str, str | None]]:
    """The extra slots (sale id, slot, the sale's rev) brought up to date, and in every slot of
    those sales (``own``: sale id -> its skus) moves of stock finished and client budget charges
    whose hold was never reported settled (budgets.py); the extra slots' (slot, skus)."""
    pipe = redis.pipeline(transaction=False)
    for _, slot, _ in extra:
        pipe.hmget(keys.sale(slot), ["skus", "rev"])
    places = []
    for (sale_id, slot, sale_rev), (skus, rev) in zip(extra, await pipe.execute(), strict=True):
        places.append((slot, skus))
        if rev is not None and sale_rev is not None and int(rev) < int(sale_rev):
            await shards.sync(redis, keys, scripts, sale_id, [slot])
    every = sorted({(slot, skus) for slot, skus in [*own.items(), *places]})
    now = now_ms()
    pipe = redis.pipeline(transaction=False)
    for slot, skus in every:
        pipe.hlen(keys.moves(slot))
        for sku in (skus or "").split(","):
            pipe.zcount(keys.pending(slot, sku), "-inf", now - budgets.PENDING_MS)
    counts = iter(await pipe.execute())
    owed = Budgets(redis, keys, scripts)
    for slot, skus in every:
        if next(counts):
            await shards.Mover(redis, keys, scripts).repair(slot, now - MOVE_REPAIR_MS)
        for sku in (skus or "").split(","):
            if next(counts):
                await owed.repair(slot, sku, now - budgets.PENDING_MS)
    return places


async def _item_slots(redis: Client, keys: Keys, sale_id: str) -> dict[str, list[str]]:
    raw = await redis.hget(keys.sale(sale_id), "doc")
    if raw is None:
        return {}
    doc = msgspec.json.decode(raw, type=SaleDoc)
    return {item.sku: shards.slots_of(doc, item) for item in doc.items}


async def _expire(scripts: Scripts, keys: Keys, slot: str, sku: str, rids: list[str]) -> int:
    n: int = await settle(scripts, keys, slot, sku, "expire", rids)
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
