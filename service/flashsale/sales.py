"""Sales in Redis: loading a new sale and reading one back with its live numbers."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import msgspec
from redis.asyncio import Redis

from .errors import ApiError
from .keys import GROUP, Keys
from .schemas import ItemOut, SaleIn, SaleOut, SaleStatus
from .scripts import Scripts

ITEM_FIELDS = ("stock_total", "available", "held", "confirmed", "per_user_limit")


def ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


def instant(at_ms: int | str) -> datetime:
    return datetime.fromtimestamp(int(at_ms) / 1000, tz=UTC)


def now_ms() -> int:
    return int(time.time() * 1000)


def sale_status(state: str, starts: int, ends: int, now: int, items: Sequence[ItemOut]) -> SaleStatus:
    """The status a storefront sees; the window moves a sale along by itself, no cron."""
    if state == "ended" or now >= ends:
        return "ended"
    if items and all(i.available == 0 and i.held == 0 for i in items):
        return "sold_out"
    if now < starts:
        return "scheduled"
    if state == "paused":
        return "paused"
    return "live"


def validate(sale: SaleIn) -> None:
    if sale.ends_at <= sale.starts_at:
        raise ApiError("invalid_request", "ends_at must be after starts_at", fields=["ends_at"])
    skus = [i.sku for i in sale.items]
    if len(set(skus)) != len(skus):
        raise ApiError("invalid_request", "each item needs its own sku", fields=["items"])


@dataclass(frozen=True)
class Sales:
    redis: Redis
    keys: Keys
    scripts: Scripts

    async def create(self, sale: SaleIn) -> SaleOut:
        validate(sale)
        k = self.keys
        # Listed first: a crash after the script leaves a listed sale, never an unlisted one
        # whose events nobody drains.
        await self.redis.zadd(k.sales, {sale.id: now_ms()}, nx=True)
        args: list[str | int] = [sale.id, ms(sale.starts_at), ms(sale.ends_at), sale.hold_seconds * 1000,
                                 msgspec.json.encode(sale).decode(), GROUP]
        for item in sale.items:
            args += [item.sku, item.stock, item.per_user_limit]
        result = await self.scripts.sale_create(
            keys=[k.sale(sale.id), k.events(sale.id), *(k.item(sale.id, i.sku) for i in sale.items)],
            args=args,
        )
        if result[0] == "err":
            raise ApiError(result[1])
        return await self.view(sale.id)

    async def view(self, sale_id: str) -> SaleOut:
        """One atomic snapshot (MULTI) of the sale and all its items: the numbers agree."""
        k = self.keys
        raw = await self.redis.hget(k.sale(sale_id), "doc")
        if raw is None:
            raise ApiError("not_found", f"no sale {sale_id!r}")
        doc = msgspec.json.decode(raw, type=SaleIn)
        pipe = self.redis.pipeline(transaction=True)
        pipe.time()
        pipe.hmget(k.sale(sale_id), "state", "starts_ms", "ends_ms", "hold_ms")
        for item in doc.items:
            pipe.hmget(k.item(sale_id, item.sku), *ITEM_FIELDS)
            pipe.zrange(k.holds(sale_id, item.sku), 0, 0, withscores=True)
        replies = await pipe.execute()
        seconds, micros = replies[0]
        now = int(seconds) * 1000 + int(micros) // 1000
        state, starts, ends, hold = replies[1]
        items = []
        for n, item in enumerate(doc.items):
            total, available, held, _confirmed, limit = (int(v or 0) for v in replies[2 + 2 * n])
            first = replies[3 + 2 * n]
            items.append(ItemOut(
                sku=item.sku, name=item.name, price_cents=item.price_cents, stock_total=total,
                available=available, held=held, per_user_limit=limit,
                next_release_at=instant(first[0][1]) if available == 0 and first else None,
            ))
        return SaleOut(
            id=sale_id, name=doc.name,
            status=sale_status(state, int(starts), int(ends), now, items),
            starts_at=instant(starts), ends_at=instant(ends), hold_seconds=int(hold) // 1000, items=items,
        )
