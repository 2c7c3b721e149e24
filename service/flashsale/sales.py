"""Sales in Redis: loading a new sale, reading sales back with their live numbers, and the ops
actions that run one (list, update before start, pause, resume, end, restock)."""

from __future__ import annotations

import asyncio
import base64
import math
import random
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, cast

import msgspec

from . import shards
from .connection import Client
from .errors import ApiError
from .keys import GROUPS, Keys
from .schemas import (
    DIGITS,
    MAX_STOCK,
    SLUG,
    ItemIn,
    ItemOut,
    SaleDoc,
    SaleIn,
    SaleOut,
    SalePage,
    SalePatch,
    SaleStatus,
    encoder,
)
from .scripts import Scripts

ITEM_FIELDS = ("stock_total", "available", "held", "confirmed", "per_user_limit")
VIEW_TRIES = 20  # the first try may only learn the skus; the rest back off
UPDATE_TRIES = 10
UPDATE_REFUSED = {
    "started": "the sale has started: its window and items can no longer change",
    "ended": "the sale has ended: its window and items can no longer change",
    "taken": "an item's new stock is below the units already held or confirmed",
}


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def ms(at: datetime) -> int:
    """Unix ms, exactly (no float in between: 1733000000.123 * 1000 is ...122.99)."""
    return (at - EPOCH) // timedelta(milliseconds=1)


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


ACTIVE_AFTER_OPS_MS = 60_000  # an ops action keeps its sale in the persister's round at least this long
EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
LATEST = datetime(3000, 1, 1, tzinfo=UTC)


def in_range(**times: datetime | object) -> None:
    """Times from 2000 to 3000: wide for any sale, and inside what every layer (Python's
    datetime, Lua's doubles, Postgres) can hold and give back."""
    for name, at in times.items():
        if isinstance(at, datetime) and not EARLIEST <= at < LATEST:
            raise ApiError("invalid_request", f"{name} must be from the year 2000 to 2999", fields=[name])


def validate(sale: SaleIn) -> None:
    in_range(starts_at=sale.starts_at, ends_at=sale.ends_at)
    if sale.ends_at <= sale.starts_at:
        raise ApiError("invalid_request", "ends_at must be after starts_at", fields=["ends_at"])
    unique_skus(sale.items)


def unique_skus(items: Sequence[ItemIn]) -> None:
    skus = [i.sku for i in items]
    if len(set(skus)) != len(skus):
        raise ApiError("invalid_request", "each item needs its own sku", fields=["items"])


def limits(item: ItemIn) -> list[int]:
    """An item's per_user_limit, per_ip_limit and per_device_limit as the scripts take them (0: none)."""
    return [item.per_user_limit, item.per_ip_limit or 0, item.per_device_limit or 0]


@dataclass(frozen=True)
class Sales:
    redis: Client
    keys: Keys
    scripts: Scripts
    # sale id -> its skus field as last read: lets view() name the item keys without a round trip
    # first. Ops create the sales, so it holds a few entries; a stale one costs one retry.
    _skus: dict[str, str] = field(default_factory=dict, repr=False, compare=False)
    # sale id -> (tick, the read of it queued in that tick): reads of one sale that arrive in the
    # same tick share one Redis read (single flight), and only while it has not been sent.
    # The read's result is kept encoded too: a crowd's readers of one sale share the bytes.
    _reading: dict[str, tuple[int, asyncio.Task[tuple[SaleOut, bytes]]]] = field(
        default_factory=dict, repr=False, compare=False
    )

    async def create(self, sale: SaleIn) -> SaleOut:
        validate(sale)
        await self.load(sale)
        return await self.view(sale.id)

    async def load(self, sale: SaleIn, state: Literal["active", "paused"] = "active") -> None:
        """The sale into Redis as new (lua/sale_create.lua): listed, in ``state``, every unit
        available. ``already_exists`` if Redis has any of its keys. A sale with sharded items gets
        its extra slots first (lua/shard_create.lua; tags chosen now unless ``sale`` is a stored
        document that has them), so that no reservation is routed to a slot not made yet."""
        k = self.keys
        doc = sale if isinstance(sale, SaleDoc) else SaleDoc(**msgspec.structs.asdict(sale))
        extra = max(i.shards for i in doc.items) - 1
        if not extra:
            await self._create(doc, state)
            return
        owner = secrets.token_hex(8)
        if not await self.redis.set(k.creating(doc.id), owner, nx=True, px=30_000):
            raise ApiError("already_exists", f"a sale {doc.id!r} is being created")
        try:
            if await self.redis.exists(k.sale(doc.id)):
                raise ApiError("already_exists")
            if len(doc.slots) < extra:
                doc.slots = await shards.choose(self.redis, doc.id, extra)
            await self._create(doc, state)
        finally:
            if await self.redis.get(k.creating(doc.id)) == owner:
                await self.redis.delete(k.creating(doc.id))

    async def _create(self, doc: SaleDoc, state: Literal["active", "paused"]) -> None:
        k = self.keys
        encoded = msgspec.json.encode(doc).decode()
        # Listed first: a crash after the script leaves a listed sale, never an unlisted one
        # whose events nobody drains.
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(k.sales, {doc.id: now_ms()}, nx=True)
        pipe.zadd(k.active, {doc.id: ms(doc.ends_at) + doc.hold_seconds * 1000}, gt=True)
        await pipe.execute()
        window = [ms(doc.starts_at), ms(doc.ends_at), doc.hold_seconds * 1000]
        for n, slot in enumerate(doc.slots, start=1):
            await self._create_slot(doc, n, slot, window, state, encoded)
        room = doc.waiting_room
        args: list[str | int] = [doc.id, *window, encoded, GROUPS, state, ",".join(doc.slots)]
        args += [room.admit_per_s, room.abandon_after_s * 1000, room.admission_ttl_s * 1000] if room else ["", "", ""]
        args.append(doc.ip_rate_per_s or 0)
        for item in doc.items:
            args += [item.sku, shards.split(item.stock, item.shards)[0], *limits(item)]
        result = await self.scripts.sale_create(
            keys=[
                k.sale(doc.id),
                k.events(doc.id),
                k.queue_state(doc.id),
                *(k.item(doc.id, i.sku) for i in doc.items),
            ],
            args=args,
        )
        if result[0] == "err":
            raise ApiError(result[1])

    async def _create_slot(self, doc: SaleDoc, n: int, slot: str, window: list[int], state: str, encoded: str) -> None:
        """Extra slot ``n`` of a new sale (lua/shard_create.lua). One a create that crashed left
        behind for a sale that was never made (its sale hash is not there: nothing routes to it)
        is cleared first."""
        k = self.keys
        here = [i for i in doc.items if i.shards > n]
        args: list[str | int] = [doc.id, *window, state, GROUPS, encoded, doc.ip_rate_per_s or 0]
        for item in here:
            args += [item.sku, shards.split(item.stock, item.shards)[n], *limits(item)]
        for attempt in range(2):
            result = await self.scripts.shard_create(
                keys=[k.sale(slot), k.events(slot), *(k.item(slot, i.sku) for i in here)], args=args
            )
            if result[0] == "ok":
                return
            orphans = [key async for key in self.redis.scan_iter(match=k.sale_pattern(slot), count=1000)]
            if attempt == 0 and orphans:
                await self.redis.delete(*orphans)  # one hash tag: one slot, one call even on a cluster
        raise ApiError("already_exists", f"the sale's slot {slot} is taken")

    async def view(self, sale_id: str) -> SaleOut:
        """One sale in one round trip (``lua/sale_view.lua``): the crowd reads the sale ~10 times
        per reservation, so this is the busiest request there is. Readers of one sale in one tick
        share the read; each answer was read after its request arrived."""
        return (await self._shared_view(sale_id))[0]

    async def view_json(self, sale_id: str) -> bytes:
        """``view``, as the JSON the API sends, encoded once for all the readers of a tick."""
        return (await self._shared_view(sale_id))[1]

    async def _shared_view(self, sale_id: str) -> tuple[SaleOut, bytes]:
        calls = self.scripts.calls
        reading = self._reading.get(sale_id)
        if reading is None or not calls.joinable(reading[0]):
            reading = (calls.ticks, asyncio.ensure_future(self._encoded_view(sale_id)))
            self._reading[sale_id] = reading
            reading[1].add_done_callback(lambda task: self._done_reading(sale_id, task))
        return await asyncio.shield(reading[1])  # shielded: one reader gone must not cancel the others' read

    async def _encoded_view(self, sale_id: str) -> tuple[SaleOut, bytes]:
        sale = await self._view(sale_id)
        return sale, encoder.encode(sale)

    def _done_reading(self, sale_id: str, task: asyncio.Task[tuple[SaleOut, bytes]]) -> None:
        if not task.cancelled():
            task.exception()  # seen here, so a read whose readers all left is not logged as lost
        if self._reading.get(sale_id, (0, None))[1] is task:
            del self._reading[sale_id]

    async def _view(self, sale_id: str) -> SaleOut:
        k = self.keys
        skus = self._skus.get(sale_id, "")
        for attempt in range(VIEW_TRIES):
            if attempt > 1:  # PATCHes racing each other before the start: let them pass
                await asyncio.sleep(random.uniform(0, min(0.05, 0.002 * 2**attempt)))
            names = skus.split(",") if skus else []
            keys = [k.sale(sale_id), *(key for sku in names for key in (k.item(sale_id, sku), k.holds(sale_id, sku)))]
            reply = await self.scripts.sale_view(keys=keys, args=[skus, *ITEM_FIELDS])
            if reply[0] == "missing":
                self._skus.pop(sale_id, None)
                raise ApiError("not_found", f"no sale {sale_id!r}")
            if reply[0] == "skus":
                skus = self._skus[sale_id] = reply[1]
                continue
            _, now, (state, starts, ends, hold, raw), *parts = reply
            doc = msgspec.json.decode(raw, type=SaleDoc)
            if [i.sku for i in doc.items] != names:  # written together by every script; never trust blindly
                skus = self._skus[sale_id] = ",".join(i.sku for i in doc.items)
                continue
            for n in range(1, len(parts), 2):  # ZRANGE WITHSCORES from Lua is flat: [rid, score]
                parts[n] = [(parts[n][0], float(parts[n][1]))] if parts[n] else []
            if doc.slots:
                await self._add_shards(doc, parts)
            return _sale_out(sale_id, doc, state, int(starts), int(ends), int(hold), parts, int(now))
        raise ApiError("unavailable", "the sale kept changing while it was read", retry_after=1)

    async def _add_shards(self, doc: SaleDoc, parts: list[Any]) -> None:
        """Each sharded item's numbers as the whole item's (shards.combine), its first hold the
        earliest of any shard: read after the sale's own slot, one round trip per master."""
        k = self.keys
        wanted = [(n, item, slot) for n, item in enumerate(doc.items) for slot in shards.slots_of(doc, item)[1:]]
        pipe = self.redis.pipeline(transaction=False)
        for _, item, slot in wanted:
            pipe.hmget(k.item(slot, item.sku), list(ITEM_FIELDS))
            pipe.zrange(k.holds(slot, item.sku), 0, 0, withscores=True)
        got = await pipe.execute()
        extra: dict[int, list[tuple[list[Any], list[Any]]]] = {}
        for (n, _, _), values, first in zip(wanted, got[::2], got[1::2], strict=True):
            extra.setdefault(n, []).append((values, first))
        for n, more in extra.items():
            hashes = [dict(zip(ITEM_FIELDS, v, strict=True)) for v in [parts[2 * n], *(v for v, _ in more)]]
            whole = shards.combine(doc.items[n].stock, hashes)
            parts[2 * n] = [whole[f] for f in ITEM_FIELDS]
            parts[2 * n + 1] = min([parts[2 * n + 1], *(f for _, f in more)], key=lambda f: f[0][1] if f else math.inf)

    async def views(self, sale_ids: Sequence[str]) -> list[SaleOut | None]:
        """Each sale as ``view`` reads it (one atomic script call each, all in the tick's
        pipeline: one round trip per master), None for an id without a sale."""

        async def one(sale_id: str) -> SaleOut | None:
            try:
                return await self.view(sale_id)
            except ApiError as exc:
                if exc.code == "not_found":
                    return None
                raise

        return list(await asyncio.gather(*(one(s) for s in sale_ids)))

    async def page(self, limit: int, cursor: str | None = None) -> SalePage:
        """Sales newest first. The cursor is the (created ms, id) of the last sale shown, so a
        page never repeats or skips a sale, however many were created since."""
        k = self.keys
        if cursor is None:
            entries = cast(list[tuple[str, float]], await self.redis.zrevrange(k.sales, 0, limit, withscores=True))
        else:
            score, after = _read_cursor(cursor)
            # Sales created in the same ms as the cursor's come in reverse id order: take those after it.
            ties = cast(list[str], await self.redis.zrevrangebyscore(k.sales, score, score))
            entries = [(s, float(score)) for s in ties if s < after][: limit + 1]
            if len(entries) <= limit:
                entries += cast(
                    list[tuple[str, float]],
                    await self.redis.zrevrangebyscore(
                        k.sales, f"({score}", "-inf", start=0, num=limit + 1 - len(entries), withscores=True
                    ),
                )
        shown = entries[:limit]
        sales = await self.views([s for s, _ in shown])
        return SalePage(
            sales=[s for s in sales if s is not None],  # a sale listed by a create that never finished
            next_cursor=_cursor(int(shown[-1][1]), shown[-1][0]) if len(entries) > limit else None,
        )

    async def pause(self, sale_id: str) -> SaleOut:
        """No new holds until resumed; holds already made can still be confirmed or cancelled."""
        return await self._control(sale_id, "pause")

    async def resume(self, sale_id: str) -> SaleOut:
        return await self._control(sale_id, "resume")

    async def end(self, sale_id: str) -> SaleOut:
        """Ends the sale for good; holds already made can still be confirmed or cancelled."""
        return await self._control(sale_id, "end")

    async def _control(self, sale_id: str, action: Literal["pause", "resume", "end"]) -> SaleOut:
        k = self.keys
        # Active before the script: its event must find the persister still going over the sale.
        await self.redis.zadd(k.active, {sale_id: now_ms() + ACTIVE_AFTER_OPS_MS}, gt=True)
        result = await self.scripts.sale_control(
            keys=[k.sale(sale_id), k.events(sale_id)], args=[sale_id, action, k.changes]
        )
        if result[0] == "err":
            if result[1] == "invalid_state":
                raise ApiError("invalid_state", f"the sale has ended, and ended is final: cannot {action} it")
            raise ApiError(result[1], f"no sale {sale_id!r}" if result[1] == "not_found" else None)
        await shards.sync(self.redis, k, self.scripts, sale_id)  # answered once every shard has the state
        return await self.view(sale_id)

    async def restock(self, sale_id: str, sku: str, quantity: int) -> ItemOut:
        """Adds units to stock_total and available in one atomic step, holds in flight or not."""
        k = self.keys
        result = await self.scripts.restock(
            keys=[k.sale(sale_id), k.item(sale_id, sku), k.events(sale_id)],
            args=[sale_id, sku, quantity, MAX_STOCK, k.changes],
        )
        if result[0] == "err":
            code, detail = result[1], result[2]
            if code == "not_found":
                raise ApiError(code, f"no sale {sale_id!r}" if detail == "sale" else f"no item {sku!r} in {sale_id!r}")
            if code == "invalid_request":
                raise ApiError(code, f"stock_total would pass {detail}", fields=["quantity"])
            raise ApiError(code, "the sale has ended: it cannot be restocked")
        item = next((i for i in (await self.view(sale_id)).items if i.sku == sku), None)
        if item is None:  # an update dropped the item right after the restock
            raise ApiError("not_found", f"no item {sku!r} in {sale_id!r}")
        return item

    async def update(self, sale_id: str, patch: SalePatch) -> SaleOut:
        """Merges the fields given into the sale in one atomic step, refused once it has started.
        Only a change of items can conflict (with another such change); then it reads again."""
        k = self.keys
        items = patch.items if isinstance(patch.items, list) else []
        in_range(starts_at=patch.starts_at, ends_at=patch.ends_at)
        unique_skus(items)
        skus = [i.sku for i in items]
        if any(i.shards > 1 for i in items):
            raise ApiError("invalid_request", "shards are set when the sale is created", fields=["items"])
        if items and await self.redis.hget(k.sale(sale_id), "slots"):
            raise ApiError("invalid_state", "a sale with a sharded item keeps its items: restock adds units")
        times = [ms(t) if isinstance(t, datetime) else "" for t in (patch.starts_at, patch.ends_at)]
        hold = patch.hold_seconds * 1000 if isinstance(patch.hold_seconds, int) else ""
        changes = msgspec.json.encode(patch).decode()  # the fields given, UNSET ones left out
        for attempt in range(UPDATE_TRIES):
            listed = ""
            if items:
                listed = cast(str | None, await self.redis.hget(k.sale(sale_id), "skus")) or ""
            dropped = [s for s in listed.split(",") if s and s not in skus]
            args: list[str | int] = [sale_id, listed, changes, *times, hold, len(items)]
            for item in items:
                args += [item.sku, item.stock, *limits(item)]
            args.append(k.changes)
            result = await self.scripts.sale_update(
                keys=[
                    k.sale(sale_id),
                    k.events(sale_id),
                    *(k.item(sale_id, s) for s in skus),
                    *(f(sale_id, s) for s in dropped for f in (k.item, k.users, k.holds, k.ips, k.devices)),
                ],
                args=args,
            )
            if result[0] == "ok":
                window = cast(list[str], await self.redis.hmget(k.sale(sale_id), "ends_ms", "hold_ms"))
                await self.redis.zadd(k.active, {sale_id: int(window[0]) + int(window[1])}, gt=True)
                await shards.sync(self.redis, k, self.scripts, sale_id)
                return await self.view(sale_id)
            code, detail = result[1], result[2]
            if code == "not_found":
                raise ApiError(code, f"no sale {sale_id!r}")
            if code == "invalid_request":
                raise ApiError(code, "ends_at must be after starts_at", fields=["ends_at"])
            if code != "conflict":
                raise ApiError(code, UPDATE_REFUSED[detail])
            # Another update changed the items first: back off a random while, so that racing
            # updates spread out instead of colliding again, and read the skus again.
            await asyncio.sleep(random.uniform(0, min(0.05, 0.002 * 2**attempt)))
        raise ApiError("unavailable", "the sale's items kept changing while it was updated", retry_after=1)


def _sale_out(
    sale_id: str, doc: SaleIn, state: str, starts: int, ends: int, hold: int, parts: Sequence[Any], now: int
) -> SaleOut:
    items = []
    for n, item in enumerate(doc.items):
        total, available, held, _confirmed, limit = (int(v or 0) for v in parts[2 * n])
        first = parts[2 * n + 1]
        items.append(
            ItemOut(
                sku=item.sku,
                name=item.name,
                price_cents=item.price_cents,
                stock_total=total,
                available=available,
                held=held,
                per_user_limit=limit,
                next_release_at=instant(first[0][1]) if available == 0 and first else None,
                shards=item.shards,
            )
        )
    return SaleOut(
        id=sale_id,
        name=doc.name,
        status=sale_status(state, starts, ends, now, items),
        starts_at=instant(starts),
        ends_at=instant(ends),
        hold_seconds=hold // 1000,
        max_extensions=doc.max_extensions,
        max_extension_seconds=doc.max_extension_seconds,
        items=items,
        waiting_room=doc.waiting_room,
    )


def _cursor(score: int, sale_id: str) -> str:
    return base64.urlsafe_b64encode(f"{score}:{sale_id}".encode()).decode().rstrip("=")


def _read_cursor(cursor: str) -> tuple[int, str]:
    try:
        text = base64.b64decode(cursor + "=" * (-len(cursor) % 4), b"-_", validate=True).decode()
        score, _, sale_id = text.partition(":")
    except ValueError:  # not base64, not ASCII, not UTF-8
        score, sale_id = "", ""
    if not DIGITS.fullmatch(score) or not SLUG.match(sale_id):
        raise ApiError("invalid_request", "cursor is not one this API gave out", fields=["cursor"])
    return int(score), sale_id
