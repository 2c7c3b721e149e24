"""``flashsale recover SALE_ID``: a sale's Redis state rebuilt from Postgres, after Redis lost it.

Redis is where a sale is decided, and Postgres trails it by the persister's lag. Redis can lose
what it had acknowledged: a restart without AOF loses everything since the last save, and a
failover loses what the master acknowledged but had not yet sent to the replica that took over
(replication is asynchronous). What reached Postgres can be put back; what never left Redis is
gone with it (holds made in the last moments before the loss: the persistence lag, 20 ms at p99
under load in BENCHMARKS.md).

What recover does, in this order:

1. If Redis has none of the sale's keys, the sale is loaded again from its Postgres rows (window,
   hold length, items with their stock and limits), paused, with every unit available. (If the
   sale hash is gone but other keys of the sale are left, recover changes nothing and says what
   to do: loading it again would reset those keys' counters.) If only extra slots of a sharded
   item are gone (their master lost them), each is made again while the sale is paused, with the
   units its item's other shards do not account for.
2. Every reservation Postgres has is put back through ``lua/recover_hold.lua``, one atomic call
   each: one Redis lost entirely comes back with its status, its expiry (a hold comes back into
   the sweeper's due-time index), its units in the item's counters and the user's count, and its
   idempotency key; one Redis still has as held while Postgres has its final status gets that
   status. One Redis knows as well or better (Postgres trails Redis) is left alone, and so is
   every reservation only Redis has: the persister has still to write it.

3. A sale loaded again is then resumed, or ended, as Postgres has it: nobody could reserve a unit
   Postgres counts as taken while the holds were being put back.

Each call is atomic and moves the counters as reserve and settle do, so recover may run while
the sale takes traffic, and running it twice changes nothing the second time. Each client's
units (client budgets) are counted again too, for a sharded item as a charge in the slot that
counts the client (``lua/budget_restore.lua``). What it cannot restore: the attempts and
rejection counters and the per-user and per-ip rate windows (Postgres never had them). If
units lost in Redis were sold again before recover ran (a lost hold's unit looked available),
the item ends with ``available`` below zero: that many units were promised twice.
Recover says so, and nothing more is sold until ops restock or cancel.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import cast

import asyncpg
import msgspec

from . import budgets, shards
from .connection import Client
from .keys import GROUPS, Keys
from .reservations import fingerprint, slot_of
from .sales import Sales, limits, ms, now_ms
from .schemas import ItemIn, SaleDoc, WaitingRoom
from .scripts import Scripts

BATCH = 500  # reservations put back per round of calls


def _ms(at: datetime | None) -> str:
    return "" if at is None else str(ms(at))


@dataclass
class Recovery:
    sale_id: str
    sale_reloaded: bool = False
    slots_remade: list[str] = field(default_factory=list)  # extra slots of sharded items made again
    outcomes: Counter[str] = field(default_factory=Counter)  # added / settled / kept
    oversold: dict[str, int] = field(default_factory=dict)  # sku -> units promised twice
    problems: list[str] = field(default_factory=list)

    def table(self) -> str:
        lines = [f"sale {self.sale_id}"]
        lines.append("sale reloaded from Postgres" if self.sale_reloaded else "sale found in Redis")
        if self.slots_remade:
            lines.append(f"slots made again: {', '.join(self.slots_remade)}")
        lines.append(
            f"reservations from Postgres: {self.outcomes['added']} restored, {self.outcomes['settled']} given"
            f" their final status, {self.outcomes['kept']} already in Redis"
        )
        lines += [f"OVERSOLD: {sku}: {n} units promised twice (available {-n})" for sku, n in self.oversold.items()]
        lines += [f"NOT RESTORED: {p}" for p in self.problems]
        lines.append("not restored (never in Postgres): attempts and rejection counters, per-user rate windows")
        return "\n".join(lines)


async def recover(
    redis: Client,
    conn: asyncpg.Connection,
    keys: Keys,
    scripts: Scripts,
    sale_id: str,
    say: Callable[[str], None] = lambda line: None,
) -> Recovery:
    report = Recovery(sale_id)
    sale = await conn.fetchrow("SELECT * FROM sales WHERE id = $1", sale_id)
    if sale is None:
        report.problems.append(f"no sale {sale_id!r} in Postgres: nothing to recover from")
        return report
    items = await conn.fetch("SELECT * FROM items WHERE sale_id = $1 ORDER BY sku", sale_id)
    sales = Sales(redis, keys, scripts)
    doc = _document(sale, items)
    slots = [sale_id, *doc.slots]
    pipe = redis.pipeline(transaction=False)
    for slot in slots:
        pipe.exists(keys.sale(slot))
    present = [slot for slot, there in zip(slots, await pipe.execute(), strict=True) if there]
    lost = [s for s in slots if s not in present]
    resume_after = False
    if present and lost and sale_id in lost:
        report.problems.append(
            f"the sale's own slot is gone and its extra slots {', '.join(present)} are not (a partial loss):"
            " loading it again would reset the counters left. Let the persister drain the streams, delete"
            f" the sale's keys ({', '.join(keys.sale_pattern(s) for s in slots)}), then run recover again"
        )
        return report
    if present and lost:
        # Extra slots of a sharded item lost with their master: made again, with the units no
        # surviving shard accounts for, while the sale is paused (if it still sells: holds of an
        # ended sale come back too, to be confirmed or expired); their holds come back below.
        state, ends = cast(list[str], await redis.hmget(keys.sale(sale_id), ["state", "ends_ms"]))
        resume_after = state == "active" and int(ends) > now_ms()
        if resume_after:
            await sales.pause(sale_id)
        try:
            await _remake(redis, keys, scripts, sale_id, lost)
        except BaseException:
            if resume_after:  # nothing was made again: the sale sells as it did before recover
                await sales.resume(sale_id)
            raise
        report.slots_remade = lost
        say(f"slots {', '.join(lost)} of sale {sale_id} made again, the sale paused while their holds come back")
    if not present:
        left = [k for slot in slots async for k in redis.scan_iter(match=keys.sale_pattern(slot), count=1000)]
        if left:
            report.problems.append(
                f"the sale's hash is gone but {len(left)} of its keys are left (a partial loss): loading it again"
                " would reset their counters. Let the persister drain its stream, delete the sale's keys"
                f" ({', '.join(keys.sale_pattern(s) for s in slots)}), then run recover again"
            )
            return report
        await sales.load(doc, state="paused")  # sells nothing until its holds are back
        report.sale_reloaded = True
        say(f"sale {sale_id} loaded again from Postgres, paused while its reservations are restored")
    total = await conn.fetchval("SELECT count(*) FROM reservations WHERE sale_id = $1", sale_id)
    done = 0
    async with conn.transaction():  # a cursor needs one; it only reads
        cursor = conn.cursor("SELECT * FROM reservations WHERE sale_id = $1 ORDER BY created_at, id", sale_id)
        batch: list[asyncpg.Record] = []
        async for row in cursor:
            batch.append(row)
            if len(batch) == BATCH:
                report.outcomes.update(await _put_back(scripts, keys, sale_id, batch, doc))
                done += len(batch)
                say(f"  {done:,} / {total:,} reservations")
                batch = []
        report.outcomes.update(await _put_back(scripts, keys, sale_id, batch, doc))
    for item in doc.items:  # while still paused: a shard left short must not sell first
        available = await _balance(redis, keys, scripts, shards.slots_of(doc, item), item.sku)
        if available < 0:
            report.oversold[item.sku] = -available
    if (report.sale_reloaded and sale["state"] == "active") or resume_after:
        await sales.resume(sale_id)
    elif report.sale_reloaded and sale["state"] == "ended":
        await sales.end(sale_id)
    return report


async def _remake(redis: Client, keys: Keys, scripts: Scripts, sale_id: str, lost: list[str]) -> None:
    """Each lost extra slot made again (lua/shard_create.lua) with, for each item sharded into it,
    the units its other shards do not hold: the stock (the sale hash's document, restocks and all)
    less their available, held, confirmed and in flight. A move into the lost slot that the
    sweeper finishes later adds its units then; one out of it that never arrived is in that share."""
    raw = cast(str, await redis.hget(keys.sale(sale_id), "doc"))
    doc = msgspec.json.decode(raw, type=SaleDoc)
    window = cast(list[str], await redis.hmget(keys.sale(sale_id), ["starts_ms", "ends_ms", "hold_ms"]))
    for slot in lost:
        here = [i for i in doc.items if slot in shards.slots_of(doc, i)]
        args: list[str | int] = [sale_id, *window, "paused", GROUPS, raw, doc.ip_rate_per_s or 0]
        for item in here:
            pipe = redis.pipeline(transaction=False)
            others = [s for s in shards.slots_of(doc, item) if s not in lost]
            for other in others:
                pipe.hmget(keys.item(other, item.sku), ["available", "held", "confirmed", "in_flight"])
            elsewhere = sum(int(v or 0) for values in await pipe.execute() for v in values)
            args += [item.sku, max(0, item.stock - elsewhere), *limits(item)]
        result = await scripts.shard_create(
            keys=[keys.sale(slot), keys.events(slot), *(keys.item(slot, i.sku) for i in here)], args=args
        )
        if result[0] == "err":
            raise RuntimeError(f"slot {slot} could not be made again: {result[1]}")
        await shards.sync(redis, keys, scripts, sale_id, [slot])


async def _balance(redis: Client, keys: Keys, scripts: Scripts, slots: list[str], sku: str) -> int:
    """The item's available units. A sharded item loaded again has its stock split evenly, and
    the holds put back where their users are: a shard left below zero takes from the others."""
    pipe = redis.pipeline(transaction=False)
    for slot in slots:
        pipe.hget(keys.item(slot, sku), "available")
    available = dict(zip(slots, (int(v or 0) for v in await pipe.execute()), strict=True))
    mover = shards.Mover(redis, keys, scripts)
    for short in [s for s in slots if available[s] < 0]:
        for rich in sorted(slots, key=lambda s: -available[s]):
            if available[short] >= 0 or available[rich] <= 0:
                break
            moved = await mover.move(sku, rich, short, min(available[rich], -available[short]))
            available[rich] -= moved
            available[short] += moved
    return sum(available.values())


def _document(sale: asyncpg.Record, items: list[asyncpg.Record]) -> SaleDoc:
    """The sale as it was created, its stock as Postgres last knew it (restocks included), its
    extra slots where they were (every reservation id names its slot)."""
    room = sale["waiting_room"]
    return SaleDoc(
        id=sale["id"],
        slots=list(sale["slots"]),
        waiting_room=None if room is None else msgspec.json.decode(room, type=WaitingRoom),
        ip_rate_per_s=sale["ip_rate_per_s"],
        name=sale["name"],
        starts_at=sale["starts_at"],
        ends_at=sale["ends_at"],
        hold_seconds=sale["hold_seconds"],
        max_extensions=sale["max_extensions"],
        max_extension_seconds=sale["max_extension_seconds"],
        items=[
            ItemIn(
                sku=i["sku"],
                name=i["name"],
                price_cents=i["price_cents"],
                stock=i["stock_total"],
                per_user_limit=i["per_user_limit"],
                shards=i["shards"],
                per_ip_limit=i["per_ip_limit"],
                per_device_limit=i["per_device_limit"],
            )
            for i in items
        ],
    )


async def _put_back(scripts: Scripts, keys: Keys, sale_id: str, rows: list[asyncpg.Record], doc: SaleDoc) -> list[str]:
    """One recover_hold call per row, all sent together (the tick's pipeline); then the client
    budget charges of the holds of sharded items counted in other slots (budgets.py), once each."""
    items = {i.sku: i for i in doc.items}

    def counted(r: asyncpg.Record) -> dict[str, tuple[str, str, str]]:
        """Where the row's client is counted, if that is not the slot its hold is in."""
        item = items.get(r["sku"])
        if item is None or item.shards == 1:
            return {}
        ip = (r["client_ip"] or "") if item.per_ip_limit else ""
        device = (r["client_device"] or "") if item.per_device_limit else ""
        where = budgets.places(shards.slots_of(doc, item), ip, device)
        return where if where and set(where) != {slot_of(r["id"])[0]} else {}

    def call(r: asyncpg.Record) -> asyncio.Future[list[str]]:
        final = r["confirmed_at"] or r["released_at"] or r["expired_at"]
        idem = r["idempotency_key"] or ""
        slot = slot_of(r["id"])[0]  # a sharded item's: the shard of its user
        return asyncio.ensure_future(
            scripts.recover_hold(
                keys=[
                    keys.item(slot, r["sku"]),
                    keys.users(slot, r["sku"]),
                    keys.holds(slot, r["sku"]),
                    keys.reservation(slot, r["id"]),
                    keys.idempotency(slot, r["user_id"], idem),
                    keys.user_reservations(slot, r["user_id"]),
                    keys.ips(slot, r["sku"]),
                    keys.devices(slot, r["sku"]),
                    keys.refunds(slot),
                ],
                args=[
                    r["id"],
                    r["sku"],
                    r["user_id"],
                    r["quantity"],
                    r["status"],
                    _ms(r["created_at"]),
                    _ms(r["expires_at"]),
                    _ms(final),
                    r["payment_ref"] or "",
                    idem,
                    f"{r['id']}|{fingerprint(r['sku'], r['quantity'])}",  # as reserve.lua writes it
                    keys.changes,
                    sale_id,
                    r["client_ip"] or "",
                    r["client_device"] or "",
                    "1" if counted(r) else "",
                    r["extensions"],
                    r["extended_s"],
                ],
            )
        )

    results = await asyncio.gather(*(call(r) for r in rows))
    restore = []
    for r, (_, status) in zip(rows, results, strict=True):
        if status in ("held", "confirmed"):  # units still out: their client's charge must be there
            for place, (ip, device, _rate) in counted(r).items():
                restore.append(
                    scripts.budget_restore(
                        keys=[keys.charges(place, r["sku"]), keys.ips(place, r["sku"]), keys.devices(place, r["sku"])],
                        args=[r["id"], r["quantity"], ip, device],
                    )
                )
    await asyncio.gather(*restore)
    return [outcome for outcome, _ in results]
