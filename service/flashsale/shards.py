"""A hot item over several hash slots (``items[].shards``), so that on a cluster its reservations
run on several masters.

The design, in the terms of the contract ("Scale"):

- **Routed by user.** A sale with sharded items has extra slots (``SaleDoc.slots``, tags
  ``S~x``); an item with N shards lives in the sale's own slot and the first N-1 extra ones.
  A user's reservations of that item always go to one of them, picked by a hash of the user id,
  with everything reserve.lua checks: the user's units (so the per-user limit is exact), their
  rate counter and their Idempotency-Keys (a retry lands where the first try did). Each extra
  slot has a copy of the sale's state and window (lua/shard_sync.lua), so reserve.lua and
  settle.lua run there unchanged, one slot per call.
- **Stock moves to the user.** A shard that cannot serve a request while the item as a whole
  can takes units from the others (lua/shard_give.lua, then lua/shard_take.lua at the shard that
  asked; the sweeper finishes a move a crash interrupted). So no unit is stranded in a shard its
  users never reach, and ``sold_out`` is answered only when the item as a whole has too few.
- **Read as one.** The item's numbers are its sale document's stock, the sums of held and
  confirmed over its shards, and available = stock - held - confirmed (which is what the units
  add up to while every shard's own counters add up; the audit checks each shard's).
- **Placed on distinct masters.** On a cluster the extra slots' tags are picked from the slot map
  when the sale is created, one master after another, so 3 shards on 3 masters use all three.
"""

from __future__ import annotations

import logging
import secrets
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, cast

import msgspec
from redis.asyncio import RedisCluster

from .connection import Client
from .keys import Keys
from .schemas import ItemIn, SaleDoc
from .scripts import Scripts

log = logging.getLogger("flashsale.shards")
SEP = "~"  # between a sale id and an extra slot's suffix; never in a sale id (SLUG)
NUMBERS = ("available", "held", "confirmed", "cancelled", "expired", "reservations", "attempts", "in_flight")


def sale_of_slot(slot: str) -> str:
    return slot.split(SEP, 1)[0]


def slots_of(doc: SaleDoc, item: ItemIn) -> list[str]:
    """The slots an item's stock lives in: the sale's own first."""
    return [doc.id, *doc.slots[: item.shards - 1]]


def home(slots: Sequence[str], user_id: str) -> str:
    """The one slot a user's reservations of an item go to (crc32: the same in every process)."""
    return slots[zlib.crc32(user_id.encode()) % len(slots)]


def split(stock: int, n: int) -> list[int]:
    """``stock`` over ``n`` shards as evenly as whole units go, the remainder to the first ones."""
    return [stock // n + (1 if k < stock % n else 0) for k in range(n)]


async def choose(redis: Client, sale_id: str, n: int) -> list[str]:
    """Tags for ``n`` extra slots. On a cluster, each on the master after the previous one's
    (starting after the sale's own), read from the slot map now; on one Redis, any will do."""
    if n <= 0:
        return []
    if not isinstance(redis, RedisCluster):
        return [f"{sale_id}{SEP}{k}" for k in range(1, n + 1)]
    masters = sorted(node.name for node in redis.get_primaries())
    owner = _master(redis, sale_id)
    start = masters.index(owner) if owner in masters else 0
    tags: list[str] = []
    candidate = 0
    for k in range(1, n + 1):
        wanted = masters[(start + k) % len(masters)]
        while True:  # each try lands on the wanted master with odds 1/len(masters)
            candidate += 1
            tag = f"{sale_id}{SEP}{candidate:x}"
            if _master(redis, tag) == wanted or candidate > 100_000:
                tags.append(tag)
                break
    return tags


def _master(redis: RedisCluster, tag: str) -> str:
    node = redis.nodes_manager.get_node_from_slot(redis.keyslot(f"{{{tag}}}"))
    return str(node.name)


async def shard_hashes(
    redis: Client, keys: Keys, doc: SaleDoc, fields: Sequence[str] | None = None
) -> dict[str, list[dict[str, str]]]:
    """sku -> the item hash of each of its shards beyond the first (the sale's own slot, which
    the caller reads with the rest of the sale), for every sharded item of the sale. One round
    trip per master; each hash is read atomically, the shards one after another."""
    wanted = [(item.sku, slot) for item in doc.items for slot in slots_of(doc, item)[1:]]
    if not wanted:
        return {}
    pipe = redis.pipeline(transaction=False)
    for sku, slot in wanted:
        if fields is None:
            pipe.hgetall(keys.item(slot, sku))
        else:
            pipe.hmget(keys.item(slot, sku), list(fields))
    out: dict[str, list[dict[str, str]]] = {}
    for (sku, _), got in zip(wanted, await pipe.execute(), strict=True):
        if fields is not None:
            got = {f: v for f, v in zip(fields, got, strict=True) if v is not None}
        out.setdefault(sku, []).append(got)
    return out


async def whole_items(
    redis: Client, keys: Keys, doc: SaleDoc, own: Mapping[str, Mapping[str, Any]]
) -> dict[str, Mapping[str, Any]]:
    """sku -> the item's numbers: ``own`` (its hash in the sale's slot, as the caller read it),
    or for a sharded item all its shards' folded into one (``combine``)."""
    extra = await shard_hashes(redis, keys, doc)
    return {i.sku: combine(i.stock, [own[i.sku], *extra[i.sku]]) if i.sku in extra else own[i.sku] for i in doc.items}


def combine(stock: int, hashes: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """One sharded item's numbers from its shards' item hashes: the counters summed, stock_total
    the document's, available what the units add up to, and ``drift`` the sum of each shard's
    own (available + held + confirmed + in_flight - stock_total: 0 unless a unit was made or lost)."""
    out = {name: sum(int(h.get(name) or 0) for h in hashes) for name in NUMBERS}
    for h in hashes:
        for name, value in h.items():
            if name.startswith("rej:"):
                out[name] = out.get(name, 0) + int(value)
    made = sum(
        sum(int(h.get(f) or 0) for f in ("available", "held", "confirmed", "in_flight"))
        - int(h.get("stock_total") or 0)
        for h in hashes
    )
    # A move counts its units in both shards' stock_total from the take to the done (and as the
    # giver's in_flight meanwhile): the shards' stock may pass the item's by at most that much.
    excess = sum(int(h.get("stock_total") or 0) for h in hashes) - stock
    made += min(excess, 0) + max(excess - out["in_flight"], 0)
    out["drift"] = made
    out["stock_total"] = stock
    out["available"] = stock - out["held"] - out["confirmed"]
    out["per_user_limit"] = int(hashes[0].get("per_user_limit") or 0) if hashes else 0
    return out


class Routes:
    """Per sale, what reserve needs to know before its script and what never changes once the
    sale is created, read once per process: the slots of each sharded item, the extra slots (an
    update cannot change a sharded sale's items, nor shard an item later, and recover loads them
    again from Postgres), which client keys a sharded item counts (its per_ip_limit and
    per_device_limit, the sale's ip_rate_per_s: budgets.py), whether the sale has a waiting room
    and how its holds may be extended (all set at creation only)."""

    def __init__(self, redis: Client, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._sales: dict[str, Route] = {}

    def learn(self, doc: SaleDoc) -> None:
        sharded = {i.sku: slots_of(doc, i) for i in doc.items if i.shards > 1}
        counted = {
            i.sku: (bool(i.per_ip_limit), bool(i.per_device_limit), bool(doc.ip_rate_per_s))
            for i in doc.items
            if i.shards > 1
        }
        extensions = (doc.max_extensions, doc.max_extension_seconds)
        self._sales[doc.id] = Route(sharded, counted, list(doc.slots), doc.waiting_room is not None, extensions)

    async def _of(self, sale_id: str) -> Route:
        known = self._sales.get(sale_id)
        if known is None:
            raw = await self.redis.hget(self.keys.sale(sale_id), "doc")
            if raw is None:
                return NOWHERE  # no such sale (yet): the scripts say not_found; nothing is remembered
            self.learn(msgspec.json.decode(raw, type=SaleDoc))
            known = self._sales[sale_id]
        return known

    def forget(self, sale_id: str) -> None:
        self._sales.pop(sale_id, None)

    async def waiting_room(self, sale_id: str) -> bool:
        return (await self._of(sale_id)).waiting_room

    async def item(self, sale_id: str, sku: str) -> list[str]:
        """The slots of an item, the sale's own first: just that one for an item not sharded."""
        return (await self._of(sale_id)).sharded.get(sku, [sale_id])

    async def counted(self, sale_id: str, sku: str) -> tuple[bool, bool, bool]:
        """Whether a sharded item counts its clients' units by ip, by device, and their attempts
        by ip (the sale's ip_rate_per_s): budgets.py."""
        return (await self._of(sale_id)).counted.get(sku, (False, False, False))

    async def slots(self, sale_id: str) -> list[str]:
        """Every slot of the sale, its own first."""
        return [sale_id, *(await self._of(sale_id)).extra]

    async def extensions(self, sale_id: str) -> tuple[int, int]:
        """The sale's max_extensions and max_extension_seconds (set at creation only)."""
        return (await self._of(sale_id)).extensions


class Route(NamedTuple):
    sharded: dict[str, list[str]]  # sku -> its slots, of each sharded item
    counted: dict[str, tuple[bool, bool, bool]]  # sku -> (ip units, device units, ip attempts counted), if sharded
    extra: list[str]
    waiting_room: bool
    extensions: tuple[int, int]  # max_extensions, max_extension_seconds


NOWHERE = Route({}, {}, [], False, (0, 0))


class Mover:
    """Moves a sharded item's stock to the shard where a user found too little."""

    def __init__(self, redis: Client, keys: Keys, scripts: Scripts) -> None:
        self.redis = redis
        self.keys = keys
        self.scripts = scripts

    async def gather(self, sale_id: str, sku: str, slots: Sequence[str], home: str, quantity: int) -> int:
        """The units the item as a whole has left (stock - held - confirmed). When that is at
        least ``quantity``, units have been moved into ``home`` from the richest shards first
        (half of a shard's, at least what is missing, so that a crowd on a dry shard is served
        by few moves), unless they are on their way already (a move in flight: try again)."""
        k = self.keys
        pipe = self.redis.pipeline(transaction=False)
        pipe.hget(k.sale(sale_id), "doc")
        for slot in slots:
            pipe.hmget(k.item(slot, sku), ["available", "held", "confirmed"])
        raw, *counts = await pipe.execute()
        item = next((i for i in msgspec.json.decode(raw, type=SaleDoc).items if i.sku == sku), None) if raw else None
        if item is None:
            return 0
        numbers = [[int(v or 0) for v in c] for c in counts]
        left = item.stock - sum(n[1] + n[2] for n in numbers)
        if left < quantity:
            return left
        available = {slot: n[0] for slot, n in zip(slots, numbers, strict=True)}
        need = quantity - available[home]
        for slot in sorted((s for s in slots if s != home), key=lambda s: -available[s]):
            if need <= 0 or available[slot] <= 0:
                break
            need -= await self.move(sku, slot, home, min(available[slot], max(need, available[slot] // 2)))
        return left

    async def move(self, sku: str, source: str, dest: str, units: int) -> int:
        """Up to ``units`` from ``source`` to ``dest``; how many moved."""
        k = self.keys
        move_id = secrets.token_hex(8)
        given = int(
            await self.scripts.shard_give(keys=[k.item(source, sku), k.moves(source)], args=[move_id, sku, dest, units])
        )
        if given:
            await self.finish(source, move_id, sku, dest, given)
        return given

    async def finish(self, source: str, move_id: str, sku: str, dest: str, units: int) -> bool:
        """Whether the move is done (False: the taking slot is gone, the move waits for recover)."""
        k = self.keys
        took = await self.scripts.shard_take(
            keys=[k.item(dest, sku), k.received(dest), k.sale(dest)], args=[move_id, units]
        )
        if int(took) < 0:
            log.warning("a move of stock to a slot that is gone waits for flashsale recover", extra={"slot": dest})
            return False
        await self.scripts.shard_done(keys=[k.item(source, sku), k.moves(source)], args=[move_id])
        return True

    async def repair(self, source: str, older_than_ms: int) -> int:
        """Finishes the moves out of ``source`` that a crash left half done; how many."""
        moves = cast(dict[str, str], await self.redis.hgetall(self.keys.moves(source)))
        done = 0
        for move_id, move in moves.items():
            sku, dest, units, at = move.split("|")
            if int(at) < older_than_ms and await self.finish(source, move_id, sku, dest, int(units)):
                done += 1
        return done


async def sync(redis: Client, keys: Keys, scripts: Scripts, sale_id: str, slots: Sequence[str] | None = None) -> int:
    """Copies the sale's state and window into each of its extra slots that is behind; how many
    were. Run after every ops change, before the API answers it, and by the sweeper."""
    state = cast(
        list[str | None],
        await redis.hmget(keys.sale(sale_id), ["rev", "state", "starts_ms", "ends_ms", "hold_ms", "slots"]),
    )
    if state[0] is None:
        return 0
    extra = (state[5] or "").split(",") if slots is None else list(slots)
    changed = 0
    for slot in filter(None, extra):
        args = [*(str(v) for v in state[:5]), keys.changes, sale_id]
        got = int(await scripts.shard_sync(keys=[keys.sale(slot)], args=args))
        if got < 0:
            log.warning("a slot of the sale is gone (its master lost it): run flashsale recover", extra={"slot": slot})
        changed += max(0, got)
    return changed
